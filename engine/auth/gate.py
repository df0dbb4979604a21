"""The gateway's front door: who is calling (``authenticate``), may they start a stream now
(``admit``), and what they used (the :class:`Lease` of each admitted stream, closed at its end,
which writes the ledger).

    gate = Gate.from_config(params, state_dir)        # [gateway] auth = "off" | "keys" | "jwt"
    principal = gate.authenticate(request.headers.get("Authorization"))   # AuthError -> 401
    lease = gate.admit(principal)                                          # LimitExceeded -> 429
    try:
        ... lease.tokens(n) for each n tokens sent ...
    finally:
        lease.close(prompt_tokens, completion_tokens, cached_tokens)       # also for partial streams

Everything here runs on the gateway's event loop and never raises from ``tokens`` or ``close``;
the ledger is written by a thread of its own (engine/auth/ledger.py), which reports a failed write
through ``on_error`` and tries it again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from engine.auth.errors import AuthConfigError, AuthError
from engine.auth.keystore import HOUR_S, KeyStore, KeyStoreError, keystore_path
from engine.auth.ledger import LedgerWriter
from engine.auth.limiter import MAX_PRINCIPALS, Limiter, PrincipalState
from engine.auth.limits import MAX_LIMIT
from engine.auth.principal import ANONYMOUS, Principal

if TYPE_CHECKING:
    from engine.auth.jwtauth import JwtVerifier

MODES = ("off", "keys", "jwt")
MAX_AUTHORIZATION = 8192 + 16
# The event loop's reads (a key, a budget) wait at most this long for a lock (WAL readers rarely
# wait at all: only while a crashed writer's WAL is recovered).
READ_BUSY_TIMEOUT_S = 0.25


class Lease:
    """One admitted request (its ``streams``: one per choice): report delivered tokens with
    :meth:`tokens`, end it with :meth:`close` (exactly once counts; later calls do nothing)."""

    __slots__ = ("_closed", "_delivered", "_gate", "_state", "_streams", "headers", "principal")

    def __init__(self, gate: Gate, principal: Principal, state: PrincipalState | None, streams: int = 1) -> None:
        self.principal = principal
        # the answer's x-ratelimit-* headers, as they stood once this request was counted
        self.headers = gate._limiter.rate_headers(principal, state) if state is not None else {}
        self._gate = gate
        self._state = state
        self._streams = streams
        self._delivered = 0
        self._closed = False

    def tokens(self, n: int) -> None:
        """``n`` more tokens went to the client (for tokens per minute and the budget)."""
        if n > 0 and not self._closed:
            self._delivered += n
            if self._state is not None:
                self._gate._limiter.delivered(self._state, n)

    def close(self, prompt_tokens: int = 0, completion_tokens: int = 0, cached_tokens: int = 0) -> None:
        """The stream ended (completed, failed or cancelled): free its slot and add its use to the
        ledger. ``completion_tokens`` defaults up to what :meth:`tokens` was told; ``cached_tokens``
        are the completion tokens served from the engine's cache."""
        if self._closed:
            return
        self._closed = True
        prompt, cached = _clamp(prompt_tokens), _clamp(cached_tokens)
        completion = max(_clamp(completion_tokens), self._delivered)
        if self._state is not None:
            self._gate._limiter.release(self._state, self._delivered, prompt + completion, self._streams)
        self._gate._record(self.principal, prompt, completion, min(cached, completion))

    def __del__(self) -> None:
        # a lease dropped without close (a bug, a task cancelled at a bad moment) would hold its
        # stream slot for good: give it back with what was delivered
        if not self._closed:
            with contextlib.suppress(Exception):
                self.close()


class Gate:
    """Authentication, limits and the ledger of one gateway (see the module's text)."""

    def __init__(
        self,
        mode: str = "off",
        store: KeyStore | None = None,
        verifier: JwtVerifier | None = None,
        on_error: Callable[[str], None] | None = None,
        max_principals: int = MAX_PRINCIPALS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        ledger: LedgerWriter | None = None,
    ) -> None:
        if mode not in MODES:
            raise AuthConfigError(f"auth must be one of {', '.join(MODES)} (got {mode!r})")
        if mode == "keys" and store is None:
            raise AuthConfigError('auth = "keys" needs the key store')
        if mode == "jwt" and verifier is None:
            raise AuthConfigError('auth = "jwt" needs jwt_secret_file or jwks_file')
        self.mode = mode
        self.store = store
        self._verifier = verifier
        self._on_error = on_error
        self._wall = wall_clock
        self._limiter = Limiter(self._read_budget if store is not None else None, max_principals, clock, wall_clock)
        if ledger is None and store is not None:
            ledger = LedgerWriter(store.path, on_error, wall_clock=wall_clock)
        self._ledger = ledger

    @classmethod
    def from_config(
        cls, gateway_params: Any, state_dir: str | None, on_error: Callable[[str], None] | None = None
    ) -> Gate:
        """From the gateway's params (``auth``, ``jwt_secret_file``, ``jwks_file``, ``audience``,
        ``issuer``; attributes or a mapping) and the state directory (engine/statedir.py; the key
        database lives there, and so does the JWT subjects' ledger). Raises AuthConfigError."""
        mode = _param(gateway_params, "auth") or "off"
        if mode not in MODES:
            raise AuthConfigError(f"auth must be one of {', '.join(MODES)} (got {str(mode)[:40]!r})")
        if mode == "off":
            return cls("off", on_error=on_error)
        verifier = None
        if mode == "jwt":  # PyJWT (and cryptography) imported only here: 65-120 ms of a worker's start
            from engine.auth.jwtauth import JwtVerifier, read_secret_file

            secret_file = _param(gateway_params, "jwt_secret_file")
            verifier = JwtVerifier(
                read_secret_file(secret_file) if secret_file else None,
                _param(gateway_params, "jwks_file") or None,
                _param(gateway_params, "audience") or None,
                _param(gateway_params, "issuer") or None,
                on_error,
            )
        if not state_dir:
            raise AuthConfigError(f'auth = "{mode}" needs the state directory ([engine] state_dir)')
        try:
            store = KeyStore(keystore_path(state_dir), busy_timeout_s=READ_BUSY_TIMEOUT_S)
        except KeyStoreError as exc:
            raise AuthConfigError(str(exc)) from None
        return cls(mode, store, verifier, on_error)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every ended stream's use is in the ledger; False on timeout."""
        return self._ledger is None or self._ledger.flush(timeout_s)

    def close(self) -> None:
        """Write what is left of the ledger and close the database."""
        if self._ledger is not None:
            self._ledger.close()
        if self.store is not None:
            self.store.close()

    # -- who --------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization: Bearer ...`` header value; anyone when auth is
        off. Raises AuthError (401) naming what is wrong, never echoing the credential."""
        if self.mode == "off":
            return ANONYMOUS
        if not authorization:
            raise AuthError("missing credentials: send the header Authorization: Bearer <key>")
        if len(authorization) > MAX_AUTHORIZATION:
            raise AuthError("Authorization header too long")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("the Authorization header must be: Bearer <key>")
        if self.mode == "jwt":
            return self._verifier.verify(credential)
        try:
            principal = self.store.find(credential)
        except KeyStoreError as exc:
            if self._on_error:
                self._on_error(str(exc))
            unavailable = "the key database is unavailable; try again"
            raise AuthError(unavailable, status=503, code="service_unavailable") from None
        if principal is None:
            raise AuthError("invalid API key (unknown or revoked)")
        return principal

    # -- how much ---------------------------------------------------------------------------------

    def admit(self, principal: Principal, streams: int = 1) -> Lease:
        """A lease for one request of ``streams`` streams (its choices), or LimitExceeded (429)
        naming the limit, with Retry-After."""
        if principal.limits.unlimited:
            return Lease(self, principal, None)
        state = self._limiter.state(principal)
        self._limiter.admit(principal, state, streams)
        return Lease(self, principal, state, streams)

    def rate_headers(self, principal: Principal) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for ``principal`` now (a 429 carries them too)."""
        if principal.limits.rpm is None and principal.limits.tpm is None:
            return {}
        return self._limiter.rate_headers(principal, self._limiter.state(principal))

    def _read_budget(self, principal: Principal, period_s: int, budget: int) -> tuple[int, float]:
        """(tokens the ledger holds for the last ``period_s``, plus any not written yet; seconds until
        enough hours leave the window for the use to fall below ``budget``)."""
        now = self._wall()
        try:
            hours = self.store.budget_hours(principal.name, now - period_s, principal.kind)
        except KeyStoreError as exc:
            if self._on_error:
                self._on_error(str(exc))
            hours = []
        used = sum(tokens for _, tokens in hours) + self._ledger.unwritten_tokens(principal.kind, principal.name)
        remaining = used
        for hour, tokens in hours:
            if remaining < budget:
                break
            remaining -= tokens
            if remaining < budget:  # this hour leaves the window at its end + period
                return used, max(1.0, (hour + 1) * HOUR_S + period_s - now)
        return used, float(HOUR_S)  # what is left is not in the ledger yet: look again in a while

    # -- the ledger -------------------------------------------------------------------------------

    def _record(self, principal: Principal, prompt: int, completion: int, cached: int) -> None:
        if self._ledger is not None and principal.kind != "anonymous":
            self._ledger.add(principal.kind, principal.name, prompt, completion, cached)


def _param(params: Any, name: str) -> Any:
    if isinstance(params, Mapping):
        return params.get(name)
    return getattr(params, name, None)


def _clamp(value: Any) -> int:
    """A token count from the stream's accounting (an upstream's usage figures among them):
    an integer in 0..MAX_LIMIT whatever came in."""
    if type(value) is not int:
        try:
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            return 0
    return min(max(value, 0), MAX_LIMIT)
