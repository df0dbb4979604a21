"""JWT bearer tokens, verified with PyJWT: HS256 with a shared secret, RS256 and EdDSA with the
public keys of a JWKS file (picked by the token's ``kid``).

Algorithms are pinned per key: an HS256 token is checked with the secret only, an RS256 or EdDSA
token only with a JWKS key of that algorithm (PyJWK binds each key to one), so neither "none" nor a
public key used as an HMAC secret gets through. ``exp`` and ``sub`` are required, ``aud`` and ``iss``
when configured. Claims may lower or set the caller's limits: ``np_rpm``, ``np_tpm``,
``np_max_streams``, ``np_budget_tokens`` (integers >= 1). Every refusal is an
:class:`~engine.auth.errors.AuthError` naming the problem, never echoing the token.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jwt
from jwt import PyJWK
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWTError,
)

from engine.auth.errors import AuthConfigError, AuthError
from engine.auth.keystore import MAX_SUBJECT_BYTES, valid_subject
from engine.auth.limits import Limits
from engine.auth.principal import Principal
from engine.files import UnusableFile, read_regular_file

HMAC_ALGORITHM = "HS256"
JWKS_ALGORITHMS = ("RS256", "EdDSA")
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
MAX_TOKEN = 8192
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
LEEWAY_S = 5.0  # clock skew tolerated on exp/nbf/iat
JWKS_RECHECK_S = 5.0  # how often the JWKS file's mtime is looked at (key rotation without a restart)
LIMIT_CLAIMS = {"np_rpm": "rpm", "np_tpm": "tpm", "np_max_streams": "max_streams", "np_budget_tokens": "budget_tokens"}


class JwtConfigError(AuthConfigError):
    """The secret or the JWKS file cannot be used (one line naming it)."""


def _read_bounded(path: str, what: str, name: str) -> bytes:
    """The bytes of a key file, at most MAX_JWKS_BYTES; JwtConfigError naming ``what`` otherwise."""
    try:
        return read_regular_file(path, MAX_JWKS_BYTES)
    except OSError as exc:
        raise JwtConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except UnusableFile as exc:
        raise JwtConfigError(f"{name}: {exc}") from None


def read_secret_file(path: str) -> str:
    """An HS256 secret from a file (surrounding whitespace dropped), at least 32 bytes."""
    data = _read_bounded(path, "the JWT secret", "JWT secret file")
    try:
        return data.strip().decode()
    except UnicodeDecodeError:
        raise JwtConfigError(f"{path}: JWT secret is not UTF-8 text") from None


def load_jwks(path: str) -> dict[str, PyJWK]:
    """kid -> key, for the RS256 and EdDSA public keys of a JWKS file ({"keys": [...]})."""
    raw = _read_bounded(path, "the JWKS", "JWKS")
    try:
        entries = json.loads(raw)["keys"]
    except (ValueError, KeyError, TypeError):
        raise JwtConfigError(f'{path}: not a JWKS (a JSON object with a "keys" array)') from None
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_JWKS_KEYS:
        raise JwtConfigError(f'{path}: "keys" must be an array of 1-{MAX_JWKS_KEYS} keys')
    keys: dict[str, PyJWK] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise JwtConfigError(f"{where}: not a JSON object")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key of the same set: not ours to use
        if "d" in entry:
            raise JwtConfigError(f"{where}: holds a private key; give the gateway public keys only")
        try:
            key = PyJWK(entry)
        except PyJWTError as exc:
            raise JwtConfigError(f"{where}: unusable key: {str(exc)[:200]}") from None
        if key.algorithm_name not in JWKS_ALGORITHMS:
            raise JwtConfigError(f"{where}: algorithm {key.algorithm_name} (accepted: {', '.join(JWKS_ALGORITHMS)})")
        kid = entry.get("kid", "")
        if not isinstance(kid, str) or kid in keys:
            raise JwtConfigError(f"{where}: kid must be a string, unique in the set (got {str(kid)[:80]!r})")
        keys[kid] = key
    if not keys:
        raise JwtConfigError(f"{path}: no signing key (RS256 or EdDSA) in the set")
    return keys


class JwtVerifier:
    """Verifies bearer JWTs (``secret``: the HS256 secret; ``jwks_path``: a JWKS file of RS256 and
    EdDSA public keys; at least one of them)."""

    def __init__(
        self,
        secret: str | None = None,
        jwks_path: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """``on_error``: told (once per version of the file) when a changed JWKS file cannot be
        used, so a rotation cut short shows in the log instead of as refused tokens alone."""
        if not secret and not jwks_path:
            raise JwtConfigError("JWT auth needs an HS256 secret (jwt_secret_file) or a JWKS file (jwks_file)")
        if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
            raise JwtConfigError(f"the HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret or None
        self._jwks_path = jwks_path
        self._jwks: dict[str, PyJWK] = load_jwks(jwks_path) if jwks_path else {}
        self._jwks_mtime = _mtime(jwks_path) if jwks_path else 0
        self._jwks_checked = time.monotonic()
        self._on_error = on_error
        self._reported_mtime = -1  # the broken version last reported
        self.audience = audience or None
        self.issuer = issuer or None
        self._require = ["exp", "sub"] + (["aud"] if self.audience else []) + (["iss"] if self.issuer else [])

    def verify(self, token: str) -> Principal:
        """The token's principal (kind "jwt", name its ``sub``); raises AuthError."""
        if len(token) > MAX_TOKEN:
            raise AuthError(f"JWT longer than {MAX_TOKEN} characters")
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise AuthError("malformed JWT (not header.payload.signature in base64url JSON)") from None
        key, algorithm = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": self._require, "enforce_minimum_key_length": True},
            )
        except PyJWTError as exc:
            raise AuthError(self._reason(exc)) from None
        return Principal(_subject(claims), "jwt", _claimed_limits(claims))

    def _key_for(self, header: dict) -> tuple[str | PyJWK, str]:
        algorithm = header.get("alg")
        if algorithm == HMAC_ALGORITHM and self._secret:
            return self._secret, algorithm
        if algorithm in JWKS_ALGORITHMS and self._jwks_path:
            self._maybe_reload()
            kid = header.get("kid")
            if kid is None and len(self._jwks) == 1:
                key = next(iter(self._jwks.values()))
            elif isinstance(kid, str) and kid in self._jwks:
                key = self._jwks[kid]
            else:
                raise AuthError(f"JWT key id {str(kid)[:64]!r} is not in the JWKS")
            if key.algorithm_name != algorithm:
                raise AuthError(f"JWT algorithm {algorithm} does not match its key's ({key.algorithm_name})")
            return key, algorithm
        accepted = ([HMAC_ALGORITHM] if self._secret else []) + (list(JWKS_ALGORITHMS) if self._jwks_path else [])
        raise AuthError(f"JWT algorithm {str(algorithm)[:20]!r} not accepted (accepted: {', '.join(accepted)})")

    def _maybe_reload(self) -> None:
        """Pick up a rotated JWKS file (checked every few seconds). A broken new version keeps
        the keys in use, is reported once through ``on_error`` and read again at the next check
        (a write still under way can end within the file system's timestamp granularity)."""
        now = time.monotonic()
        if now - self._jwks_checked < JWKS_RECHECK_S:
            return
        self._jwks_checked = now
        mtime = _mtime(self._jwks_path)
        if mtime == self._jwks_mtime:
            return
        try:
            self._jwks = load_jwks(self._jwks_path)
            self._jwks_mtime = mtime
        except JwtConfigError as exc:
            if self._on_error is not None and mtime != self._reported_mtime:
                self._on_error(f"the changed JWKS file cannot be used, the keys before it stay in use: {exc}")
            self._reported_mtime = mtime

    def _reason(self, exc: PyJWTError) -> str:
        if isinstance(exc, ExpiredSignatureError):
            return "JWT expired (exp is in the past)"
        if isinstance(exc, ImmatureSignatureError):
            return "JWT not valid yet (nbf or iat is in the future)"
        if isinstance(exc, MissingRequiredClaimError):
            return f"JWT has no {exc.claim!r} claim (required: {', '.join(self._require)})"
        if isinstance(exc, InvalidAudienceError):
            wanted = f"must be {self.audience!r}" if self.audience else "is set but no audience is configured"
            return f"JWT audience (aud) {wanted}"
        if isinstance(exc, InvalidIssuerError):
            return f"JWT issuer (iss) must be {self.issuer!r}"
        if isinstance(exc, InvalidSignatureError):
            return "JWT signature does not verify"
        if isinstance(exc, InvalidAlgorithmError):
            return f"JWT algorithm not accepted: {exc}"
        if isinstance(exc, DecodeError):
            return "malformed JWT (bad base64url, JSON or signature encoding)"
        if isinstance(exc, InvalidTokenError):
            return f"invalid JWT: {str(exc)[:120]}"
        return "invalid JWT"


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _subject(claims: dict) -> str:
    sub = claims["sub"]  # required: PyJWT checked it is there (and a string)
    if not valid_subject(sub):
        raise AuthError(f"JWT sub must be 1-{MAX_SUBJECT_BYTES} bytes of printable UTF-8")
    return sub


def _claimed_limits(claims: dict) -> Limits:
    values = {}
    for claim, field in LIMIT_CLAIMS.items():
        if claim in claims:
            values[field] = claims[claim]
    try:
        return Limits(**values)
    except ValueError as exc:
        raise AuthError(f"JWT claim np_{exc}") from None
