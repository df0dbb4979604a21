"""engine/auth/jwtauth.py: real tokens signed with PyJWT (HS256) and with keys made here with
cryptography (RS256, EdDSA) published in a JWKS file; every refusal names its problem."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from engine.auth.errors import AuthError
from engine.auth.gate import Gate
from engine.auth.jwtauth import JwtConfigError, JwtVerifier, read_secret_file
from engine.auth.limits import Limits

SECRET = "s" * 40
AUDIENCE = "neuralpipe"
ISSUER = "https://issuer.example"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


def _public_jwk(private, kid: str) -> dict:
    algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else OKPAlgorithm
    jwk = json.loads(algorithm.to_jwk(private.public_key()))
    jwk["kid"] = kid
    return jwk


@pytest.fixture
def jwks(tmp_path, rsa_key, ed_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "rsa-1"), _public_jwk(ed_key, "ed-1")]}))
    return str(path)


DAY_S = 86400


def _claims(**extra) -> dict:
    # a day either way: parametrized claims are made when the suite is collected, and a full run
    # reaches these tests minutes later (with +300 s every case but "expired" failed as expired)
    claims = {"sub": "alice", "exp": int(time.time()) + DAY_S, "aud": AUDIENCE, "iss": ISSUER}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def _verifier(jwks: str | None = None, secret: str | None = SECRET) -> JwtVerifier:
    return JwtVerifier(secret, jwks, AUDIENCE, ISSUER)


def test_hs256(jwks):
    token = jwt.encode(_claims(np_rpm=10, np_budget_tokens=5000), SECRET, algorithm="HS256")
    principal = _verifier().verify(token)
    assert (principal.name, principal.kind) == ("alice", "jwt")
    assert principal.limits == Limits(rpm=10, budget_tokens=5000)
    assert principal.label == "jwt:alice"


def test_rs256_and_eddsa_from_a_jwks_picked_by_kid(jwks, rsa_key, ed_key):
    verifier = _verifier(jwks, secret=None)
    rs = jwt.encode(_claims(sub="rs-user", np_tpm=100), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    ed = jwt.encode(_claims(sub="ed-user", np_max_streams=3), ed_key, algorithm="EdDSA", headers={"kid": "ed-1"})
    assert verifier.verify(rs).name == "rs-user" and verifier.verify(rs).limits.tpm == 100
    assert verifier.verify(ed).name == "ed-user" and verifier.verify(ed).limits.max_streams == 3
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(AuthError, match="signature does not verify"):
        verifier.verify(forged)
    unknown = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-9"})
    with pytest.raises(AuthError, match="key id 'rsa-9' is not in the JWKS"):
        verifier.verify(unknown)
    swapped = jwt.encode(_claims(), ed_key, algorithm="EdDSA", headers={"kid": "rsa-1"})
    with pytest.raises(AuthError, match="algorithm EdDSA does not match its key's \\(RS256\\)"):
        verifier.verify(swapped)


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        (_claims(exp=int(time.time()) - 60), "JWT expired"),
        (_claims(aud="someone-else"), "audience \\(aud\\) must be 'neuralpipe'"),
        (_claims(aud=None), "no 'aud' claim"),
        (_claims(iss="https://evil.example"), "issuer \\(iss\\) must be"),
        (_claims(sub=None), "no 'sub' claim"),
        (_claims(exp=None), "no 'exp' claim"),
        (_claims(nbf=int(time.time()) + DAY_S), "not valid yet"),
        (_claims(sub="x" * 201), "sub must be 1-200 bytes of printable UTF-8"),
        (_claims(sub="é" * 101), "sub must be 1-200 bytes"),
        (_claims(sub="a\nb"), "sub must be 1-200 bytes"),
        (_claims(np_rpm=0), "np_rpm: must be 1.."),
        (_claims(np_tpm="100"), "np_tpm: must be an integer"),
        (_claims(np_max_streams=True), "np_max_streams: must be an integer"),
        (_claims(np_budget_tokens=10**20), "np_budget_tokens: must be 1.."),
    ],
)
def test_bad_claims_are_refused_naming_the_problem(claims, problem):
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match=problem) as caught:
        _verifier().verify(token)
    assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
    assert token not in caught.value.message


def test_tampered_payload_is_refused():
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthError, match="signature does not verify"):
        _verifier().verify(f"{header}.{forged}.{signature}")


def _unsigned(header: dict, claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def test_algorithm_none_and_unlisted_algorithms_are_refused(jwks, rsa_key):
    verifier = _verifier(jwks)
    with pytest.raises(AuthError, match="algorithm 'none' not accepted \\(accepted: HS256, RS256, EdDSA\\)"):
        verifier.verify(_unsigned({"alg": "none", "typ": "JWT"}, _claims()))
    hs512 = jwt.encode(_claims(), SECRET * 2, algorithm="HS512")
    with pytest.raises(AuthError, match="algorithm 'HS512' not accepted"):
        verifier.verify(hs512)
    rs_only = _verifier(jwks, secret=None)
    with pytest.raises(AuthError, match="algorithm 'HS256' not accepted \\(accepted: RS256, EdDSA\\)"):
        rs_only.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"))


def test_the_public_key_used_as_an_hmac_secret_is_refused(tmp_path, jwks, rsa_key):
    """HS/RS confusion: an attacker signs HS256 with the (public) RSA key as the secret."""
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"rsa-1"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(_claims()).encode()).rstrip(b"=")
    mac = hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()
    token = b".".join([header, body, base64.urlsafe_b64encode(mac).rstrip(b"=")]).decode()
    with pytest.raises(AuthError, match="algorithm 'HS256' not accepted"):
        _verifier(jwks, secret=None).verify(token)
    with pytest.raises(AuthError, match="signature does not verify"):
        _verifier(jwks).verify(token)  # with a secret configured, HS256 is checked with it only


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "e30.e30.", "x" * 10_000, "....", "\x00.\x00.\x00"])
def test_malformed_tokens_are_refused(token):
    with pytest.raises(AuthError, match="JWT"):
        _verifier().verify(token)


def test_unusable_configuration_is_refused(tmp_path, rsa_key):
    with pytest.raises(JwtConfigError, match="needs an HS256 secret"):
        JwtVerifier(None, None)
    with pytest.raises(JwtConfigError, match="at least 32 bytes"):
        JwtVerifier("short", None)
    path = tmp_path / "jwks.json"
    cases = [
        (b"not json", "not a JWKS"),
        (b'{"keys": []}', "array of 1-100 keys"),
        (json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]}).encode(), "unusable key"),
        (json.dumps({"keys": [json.loads(RSAAlgorithm.to_jwk(rsa_key))]}).encode(), "holds a private key"),
        (json.dumps({"keys": [_public_jwk(rsa_key, "a") | {"use": "enc"}]}).encode(), "no signing key"),
        (json.dumps({"keys": [_public_jwk(rsa_key, "a"), _public_jwk(rsa_key, "a")]}).encode(), "unique"),
        (json.dumps({"keys": [_public_jwk(rsa_key, "a") | {"alg": "RS512"}]}).encode(), "algorithm RS512"),
    ]
    for data, problem in cases:
        path.write_bytes(data)
        with pytest.raises(JwtConfigError, match=problem):
            JwtVerifier(None, str(path))
    with pytest.raises(JwtConfigError, match="cannot read the JWKS"):
        JwtVerifier(None, str(tmp_path / "missing.json"))


def test_a_rotated_jwks_is_picked_up(tmp_path, rsa_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "old")]}))
    verifier = JwtVerifier(None, str(path))
    fresh = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(aud=None, iss=None), fresh, algorithm="RS256", headers={"kid": "new"})
    with pytest.raises(AuthError, match="not in the JWKS"):
        verifier.verify(token)
    path.write_text(json.dumps({"keys": [_public_jwk(fresh, "new")]}))
    verifier._jwks_checked = float("-inf")  # as if the recheck interval had passed
    assert verifier.verify(token).name == "alice"


def test_a_broken_rotated_jwks_is_reported_once_and_the_keys_before_it_stay(tmp_path, rsa_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "old")]}))
    errors: list[str] = []
    verifier = JwtVerifier(None, str(path), on_error=errors.append)
    token = jwt.encode(_claims(aud=None, iss=None), rsa_key, algorithm="RS256", headers={"kid": "old"})
    path.write_text('{"keys": [')  # a rotation cut short
    os.utime(path, (time.time() + 1, time.time() + 1))  # a new mtime even on a coarse clock
    for _ in range(3):
        verifier._jwks_checked = float("-inf")  # as if the recheck interval had passed
        assert verifier.verify(token).name == "alice"
    assert len(errors) == 1, errors
    assert str(path) in errors[0] and "stay in use" in errors[0]
    fresh = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_text(json.dumps({"keys": [_public_jwk(fresh, "new")]}))
    os.utime(path, (time.time() + 2, time.time() + 2))
    verifier._jwks_checked = float("-inf")
    token = jwt.encode(_claims(aud=None, iss=None), fresh, algorithm="RS256", headers={"kid": "new"})
    assert verifier.verify(token).name == "alice"
    assert len(errors) == 1


@pytest.mark.timeout(20)
def test_a_jwks_replaced_by_a_fifo_keeps_the_keys_before_it_and_never_blocks(tmp_path, rsa_key):
    """The reload opened the file on the gateway's event loop: a FIFO there (or a secret file that
    is one at start) blocked it for good, and the supervisor restarted a gateway that blocked again."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "old")]}))
    errors: list[str] = []
    verifier = JwtVerifier(None, str(path), on_error=errors.append)
    token = jwt.encode(_claims(aud=None, iss=None), rsa_key, algorithm="RS256", headers={"kid": "old"})
    path.unlink()
    os.mkfifo(path)
    verifier._jwks_checked = float("-inf")  # as if the recheck interval had passed
    assert verifier.verify(token).name == "alice"
    assert len(errors) == 1 and "not a regular file but a FIFO" in errors[0], errors
    with pytest.raises(JwtConfigError, match="not a regular file but a FIFO"):
        JwtVerifier(None, str(path))
    with pytest.raises(JwtConfigError, match="not a regular file but a FIFO"):
        read_secret_file(str(path))


def test_the_gate_reports_a_broken_rotated_jwks(tmp_path, rsa_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "old")]}))
    errors: list[str] = []
    params = {"auth": "jwt", "jwks_file": str(path)}
    gate = Gate.from_config(params, str(tmp_path / "state"), on_error=errors.append)
    try:
        token = jwt.encode(_claims(aud=None, iss=None), rsa_key, algorithm="RS256", headers={"kid": "old"})
        path.write_text("not json")
        os.utime(path, (time.time() + 1, time.time() + 1))
        gate._verifier._jwks_checked = float("-inf")
        assert gate.authenticate(f"Bearer {token}").name == "alice"
        assert len(errors) == 1 and "JWKS" in errors[0]
    finally:
        gate.close()


def test_gate_with_jwt(tmp_path, jwks, ed_key):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    params = {"auth": "jwt", "jwt_secret_file": str(secret_file), "jwks_file": jwks}
    params |= {"audience": AUDIENCE, "issuer": ISSUER}
    gate = Gate.from_config(params, str(tmp_path / "state"))
    try:
        ed = jwt.encode(_claims(sub="bob"), ed_key, algorithm="EdDSA", headers={"kid": "ed-1"})
        hs = jwt.encode(_claims(sub="carol"), SECRET, algorithm="HS256")
        assert gate.authenticate(f"Bearer {ed}").name == "bob"
        assert gate.authenticate(f"bearer  {hs} ").name == "carol"
        for header, problem in [(None, "missing credentials"), ("Basic abc", "Bearer <key>"), ("Bearer", "Bearer")]:
            with pytest.raises(AuthError, match=problem):
                gate.authenticate(header)
        gate.admit(gate.authenticate(f"Bearer {hs}")).close(3, 4, 0)
        assert gate.flush()
        assert gate.store.usage(kind="jwt")["carol"]["completion_tokens"] == 4
    finally:
        gate.close()


EXAMPLES = int(os.environ.get("NEURALPIPE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=EXAMPLES <= 1000, deadline=None, database=None)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
HEADERS = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "RS256", "EdDSA", "none", "HS512", "", None, 7])},
    optional={"kid": st.sampled_from(["rsa-1", "ed-1", "zz", None, 3]), "typ": JSON_VALUES},
)
CLAIMS = st.dictionaries(
    st.sampled_from(["sub", "exp", "aud", "iss", "nbf", "iat", "np_rpm", "np_tpm", "np_budget_tokens", "x"]),
    JSON_VALUES,
    max_size=8,
)


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@FUZZ
@given(header=HEADERS, claims=CLAIMS, signature=st.binary(max_size=300), sign=st.booleans())
def test_fuzzed_tokens_are_accepted_or_refused_with_auth_error(fuzz_verifier, header, claims, signature, sign):
    """Near-valid tokens (any header, any claims, signed with the secret or junk): a principal or an
    AuthError, never another exception."""
    sig = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    token = f"{_b64(header)}.{_b64(claims)}.{sig}"
    if sign and header.get("alg") == "HS256":  # a valid signature over the same parts
        mac = hmac.new(SECRET.encode(), token.rsplit(".", 1)[0].encode(), hashlib.sha256).digest()
        token = token.rsplit(".", 1)[0] + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    try:
        principal = fuzz_verifier.verify(token)
    except AuthError as exc:
        assert exc.status == 401 and exc.message
    else:
        assert principal.kind == "jwt" and isinstance(principal.name, str)


@FUZZ
@given(authorization=st.one_of(st.none(), st.text(max_size=200), st.builds("Bearer {}".format, st.text(max_size=80))))
def test_fuzzed_authorization_headers(fuzz_gate, authorization):
    try:
        fuzz_gate.authenticate(authorization)
    except AuthError as exc:
        assert exc.status == 401
        if authorization and len(authorization) > 12:
            assert authorization.strip() not in exc.message


@pytest.fixture(scope="module")
def fuzz_verifier(tmp_path_factory, rsa_key, ed_key):
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "rsa-1"), _public_jwk(ed_key, "ed-1")]}))
    return JwtVerifier(SECRET, str(path), None, None)


@pytest.fixture(scope="module")
def fuzz_gate(tmp_path_factory):
    gate = Gate.from_config({"auth": "keys"}, str(tmp_path_factory.mktemp("state")))
    yield gate
    gate.close()


def test_the_longest_subject_fits_ingest_as_a_client_name():
    from engine.protocol.requests import MAX_CLIENT_BYTES

    principal = _verifier().verify(jwt.encode(_claims(sub="é" * 100), SECRET, algorithm="HS256"))
    assert len(principal.label.encode()) <= MAX_CLIENT_BYTES
