"""Capability tokens: signing, offline verification, key files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from twisted.internet.task import Clock

from treadmill.common.captoken import (
    MAX_TTL,
    Access,
    CapabilityError,
    CapabilityKeyError,
    CapabilitySigner,
    CapabilityVerifier,
    Claims,
    bearer_token,
    key_id,
    load_or_create_signing_key,
    load_public_keys,
    parse_jwks,
    public_jwk,
)

START = 1_700_000_000.25
ISSUER = "treadmill-switchboard"
AUDIENCE = "imagestore"
PULL = Access("repository", "lab/fw", ("pull",))


def _clock(at: float = START) -> Clock:
    clock = Clock()
    clock.advance(at)
    return clock


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(token: str) -> tuple[dict, dict, str]:
    header, payload, signature = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
        signature,
    )


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def clock() -> Clock:
    return _clock()


@pytest.fixture
def signer(key, clock) -> CapabilitySigner:
    return CapabilitySigner(key, ISSUER, clock)


@pytest.fixture
def verifier(key, clock) -> CapabilityVerifier:
    return CapabilityVerifier({key_id(key.public_key()): key.public_key()}, ISSUER, AUDIENCE, clock)


def _reason(verifier: CapabilityVerifier, token, *scope) -> str:
    """The reason *verifier* refuses *token* (for *scope*, else with ``verify_any``)."""
    with pytest.raises(CapabilityError) as info:
        if scope:
            verifier.verify(token, *scope)
        else:
            verifier.verify_any(token)
    if isinstance(token, str) and len(token) > 20:
        assert token not in str(info.value), "the message must not echo the token"
    return info.value.reason


# -- round trip --------------------------------------------------------------


def test_round_trip(signer, verifier):
    access = [
        Access("repository", "lab/fw", ("pull", "push")),
        Access("job", "5b0c5a9e-6d3f-4c39-9a8b-1f8f0a3e2d11", ("append",)),
    ]
    token = signer.sign("alice", AUDIENCE, access, ttl=300, extra={"host": "rig-1"})

    claims = verifier.verify(token, "repository", "lab/fw", "push")

    assert isinstance(claims, Claims)
    assert claims.subject == "alice"
    assert claims.audience == (AUDIENCE,)
    assert claims.expires_at == 1_700_000_301  # now + ttl, rounded up
    assert claims.access == tuple(access)
    assert claims.raw["iss"] == ISSUER
    assert claims.raw["host"] == "rig-1"
    assert verifier.verify_any(token) == claims


def test_token_shape(signer):
    token = signer.sign("alice", [AUDIENCE, "logserver"], [PULL], ttl=60)
    header, payload, _ = _segments(token)

    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": signer.key_id}
    assert payload["iss"] == ISSUER
    assert payload["sub"] == "alice"
    assert payload["aud"] == [AUDIENCE, "logserver"]
    assert payload["iat"] == payload["nbf"] == 1_700_000_000
    assert payload["exp"] == 1_700_000_061
    assert all(isinstance(payload[c], int) for c in ("iat", "nbf", "exp"))
    assert payload["access"] == [{"type": "repository", "name": "lab/fw", "actions": ["pull"]}]
    assert isinstance(payload["jti"], str) and len(payload["jti"]) >= 16
    assert _segments(signer.sign("alice", AUDIENCE, [PULL], ttl=60))[1]["jti"] != payload["jti"]


def test_audience_list_accepted(signer, verifier):
    token = signer.sign("alice", ["logserver", AUDIENCE], [PULL], ttl=60)
    assert verifier.verify(token, "repository", "lab/fw", "pull").audience == (
        "logserver",
        AUDIENCE,
    )


def test_bytes_token_accepted(signer, verifier):
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=60)
    assert verifier.verify_any(token.encode("ascii")).subject == "alice"


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL + 1, float("inf"), float("nan"), True, "60"])
def test_ttl_bounded(signer, ttl):
    with pytest.raises(ValueError):
        signer.sign("alice", AUDIENCE, [PULL], ttl=ttl)


def test_ttl_of_a_day_allowed(signer, verifier):
    signer.sign("alice", AUDIENCE, [PULL], ttl=MAX_TTL)


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "access", "jti"])
def test_extra_cannot_override_standard_claims(signer, claim):
    with pytest.raises(ValueError, match=claim):
        signer.sign("alice", AUDIENCE, [PULL], ttl=60, extra={claim: "x"})


@pytest.mark.parametrize(
    ("subject", "audience"), [("", AUDIENCE), ("alice", ""), ("alice", []), (None, AUDIENCE)]
)
def test_sign_rejects_empty_subject_or_audience(signer, subject, audience):
    with pytest.raises(ValueError):
        signer.sign(subject, audience, [PULL], ttl=60)


def test_access_validation():
    assert Access("job", "j1", ["append", "read"]).actions == ("append", "read")
    with pytest.raises(TypeError):
        Access("job", "j1", "read")
    with pytest.raises(ValueError):
        Access("", "j1", ("read",))
    with pytest.raises(ValueError):
        Access("job", "j1", ("",))


# -- time --------------------------------------------------------------------


def test_expired_after_exp_plus_leeway(signer, verifier, clock):
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=60)  # exp = START rounded up + 60
    exp = 1_700_000_061
    clock.advance(exp + verifier.leeway - clock.seconds() - 0.5)
    verifier.verify(token, "repository", "lab/fw", "pull")

    clock.advance(0.5)
    assert _reason(verifier, token, "repository", "lab/fw", "pull") == "expired"
    assert _reason(verifier, token) == "expired"


def test_not_yet_valid_when_verifier_clock_is_behind(key, signer):
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=60)
    keys = {key_id(key.public_key()): key.public_key()}
    slightly_behind = CapabilityVerifier(keys, ISSUER, AUDIENCE, _clock(START - 4))
    far_behind = CapabilityVerifier(keys, ISSUER, AUDIENCE, _clock(START - 10))

    slightly_behind.verify_any(token)
    assert _reason(far_behind, token) == "not_yet_valid"


def test_leeway_bounds(key):
    with pytest.raises(ValueError):
        CapabilityVerifier({}, ISSUER, AUDIENCE, Clock(), leeway=-1)


# -- issuer, audience, scope ---------------------------------------------------


def test_wrong_audience(signer, verifier):
    token = signer.sign("alice", "logserver", [PULL], ttl=60)
    assert _reason(verifier, token) == "wrong_audience"
    assert _reason(verifier, token, "repository", "lab/fw", "pull") == "wrong_audience"


def test_wrong_issuer(key, clock, verifier):
    other = CapabilitySigner(key, "someone-else", clock)
    token = other.sign("alice", AUDIENCE, [PULL], ttl=60)
    assert _reason(verifier, token) == "wrong_issuer"


@pytest.mark.parametrize(
    "scope",
    [
        ("job", "lab/fw", "pull"),  # type
        ("repository", "lab/other", "pull"),  # name
        ("repository", "lab/fw", "push"),  # action
        ("repository", "lab/fw*", "pull"),  # no wildcards
        ("repository", "lab", "pull"),  # no prefixes
    ],
    ids=["type", "name", "action", "no-wildcard", "no-prefix"],
)
def test_insufficient_scope(signer, verifier, scope):
    token = signer.sign("alice", AUDIENCE, [PULL, Access("job", "j1", ("read",))], ttl=60)
    assert _reason(verifier, token, *scope) == "insufficient_scope"
    verifier.verify_any(token)  # the scope is not verify_any's business


def test_empty_access_verifies_but_grants_nothing(signer, verifier):
    token = signer.sign("alice", AUDIENCE, [], ttl=60)
    assert verifier.verify_any(token).access == ()
    assert _reason(verifier, token, "repository", "lab/fw", "pull") == "insufficient_scope"


# -- keys and signatures -------------------------------------------------------


def test_other_key_is_unknown_key(clock, verifier):
    other = CapabilitySigner(Ed25519PrivateKey.generate(), ISSUER, clock)
    token = other.sign("alice", AUDIENCE, [PULL], ttl=60)
    assert _reason(verifier, token) == "unknown_key"


def test_other_key_with_our_kid_is_bad_signature(signer, clock, verifier):
    other = Ed25519PrivateKey.generate()
    _, payload, _ = _segments(signer.sign("alice", AUDIENCE, [PULL], ttl=60))
    token = jwt.encode(payload, other, algorithm="EdDSA", headers={"kid": signer.key_id})
    assert _reason(verifier, token) == "bad_signature"


def test_missing_kid_is_unknown_key(key, signer, verifier):
    _, payload, _ = _segments(signer.sign("alice", AUDIENCE, [PULL], ttl=60))
    token = jwt.encode(payload, key, algorithm="EdDSA")
    assert _reason(verifier, token) == "unknown_key"


def test_tampered_payload_is_bad_signature(signer, verifier):
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=60)
    header_segment, _, signature = token.split(".")
    _, payload, _ = _segments(token)
    payload["access"][0]["actions"].append("push")
    forged = ".".join([header_segment, _b64(json.dumps(payload).encode()), signature])
    assert _reason(verifier, forged, "repository", "lab/fw", "push") == "bad_signature"


def test_tampered_signature_is_bad_signature(signer, verifier):
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=60)
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[0] ^= 1
    assert _reason(verifier, f"{head}.{payload}.{_b64(bytes(raw))}") == "bad_signature"


def _hand_made(alg: str, kid: str, payload: dict, secret: bytes | None) -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(payload).encode())
    signing_input = f"{header}.{body}".encode()
    signature = b"" if secret is None else hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_rejected(signer, verifier, alg):
    _, payload, _ = _segments(signer.sign("alice", AUDIENCE, [PULL], ttl=60))
    token = _hand_made(alg, signer.key_id, payload, None)
    assert _reason(verifier, token, "repository", "lab/fw", "pull") == "bad_signature"


@pytest.mark.parametrize(
    "encoding",
    [
        (serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
    ids=["raw", "pem"],
)
def test_hs256_with_public_key_as_secret_rejected(key, signer, verifier, encoding):
    """Algorithm confusion: an HMAC keyed with the (public) verification key."""
    _, payload, _ = _segments(signer.sign("alice", AUDIENCE, [PULL], ttl=60))
    secret = key.public_key().public_bytes(*encoding)
    token = _hand_made("HS256", signer.key_id, payload, secret)
    assert _reason(verifier, token, "repository", "lab/fw", "pull") == "bad_signature"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "....",
        "é.é.é",
        "eyJhbGciOiJFZERTQSJ9.e30",
        "eyJhbGciOiJFZERTQSJ9.!!!.AAAA",
        _b64(b"[1]") + ".e30.AAAA",
        "x" * 10_000,
        None,
        42,
        b"\xff.\xff.\xff",
    ],
)
def test_garbage_is_malformed(verifier, garbage):
    assert _reason(verifier, garbage) == "malformed"


@pytest.mark.parametrize(
    "payload",
    [
        {"sub": "alice", "aud": AUDIENCE, "iat": 0},  # no exp
        {"sub": "alice", "aud": AUDIENCE, "exp": "tomorrow", "iat": 0},
        {"sub": "alice", "aud": AUDIENCE, "exp": True, "iat": 0},
        {"sub": "alice", "aud": AUDIENCE, "exp": 2e9},  # no iat
        {"sub": "", "aud": AUDIENCE, "exp": 2e9, "iat": 0},
        {"sub": "alice", "aud": [AUDIENCE, 1], "exp": 2e9, "iat": 0},
        {"sub": "alice", "aud": AUDIENCE, "exp": 2e9, "iat": 0, "access": {}},
        {"sub": "alice", "aud": AUDIENCE, "exp": 2e9, "iat": 0, "access": [{"type": "job"}]},
        {"sub": "alice", "aud": AUDIENCE, "exp": 2e9, "iat": 0, "access": ["job:j1:read"]},
    ],
)
def test_signed_but_malformed_claims(key, signer, verifier, payload):
    token = jwt.encode({"iss": ISSUER, **payload}, key, "EdDSA", headers={"kid": signer.key_id})
    assert _reason(verifier, token) == "malformed"


NOW = int(START)


def _forged(key, signer, **claims) -> str:
    """A token signed by the real key with hand-written time claims."""
    payload = {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "access": [PULL.to_json()],
               "iat": NOW, "nbf": NOW, "exp": NOW + 60}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, "EdDSA", headers={"kid": signer.key_id})


def test_forged_baseline_verifies(key, signer, verifier):
    assert verifier.verify_any(_forged(key, signer)).expires_at == NOW + 60


@pytest.mark.parametrize("claims", [
    {"exp": 1e300},                                  # the finding: valid for ever
    {"exp": float("nan")},
    {"exp": float("inf")},
    {"exp": NOW + 60.5},                             # not a whole number
    {"exp": float(NOW + 60)},                        # a float, even if whole
    {"exp": 10**30},                                 # huge integer
    {"exp": -1, "iat": -100, "nbf": -100},           # negative
    {"iat": -5},
    {"iat": 1.5},
    {"nbf": "now"},
    {"exp": NOW + int(MAX_TTL) + 2},                 # longer than eight days
    {"iat": 0, "nbf": 0, "exp": NOW + 60},           # issued long ago, lifetime of years
    {"exp": NOW},                                    # exp not after iat
    {"exp": NOW - 10},
    {"nbf": NOW - 1},                                # nbf before iat
    {"nbf": NOW + 60},                               # nbf not before exp
])
def test_forged_time_claims_are_malformed(key, signer, verifier, claims):
    assert _reason(verifier, _forged(key, signer, **claims)) == "malformed"


def test_longest_lifetime_the_signer_makes_verifies(key, clock, verifier):
    signer = CapabilitySigner(key, ISSUER, clock)  # START has a fraction: exp - iat = MAX + 1
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=MAX_TTL)
    _, payload, _ = _segments(token)
    assert payload["exp"] - payload["iat"] == MAX_TTL + 1
    assert verifier.verify_any(token).subject == "alice"


def test_token_without_nbf_still_verifies(key, signer, verifier):
    assert verifier.verify_any(_forged(key, signer, nbf=None)).subject == "alice"


def test_crit_header_is_malformed(key, signer, verifier):
    _, payload, _ = _segments(signer.sign("alice", AUDIENCE, [PULL], ttl=60))
    token = jwt.encode(
        payload, key, "EdDSA", headers={"kid": signer.key_id, "crit": ["exp"], "exp": 1}
    )
    assert _reason(verifier, token) == "malformed"


def test_error_reason_is_checked():
    with pytest.raises(ValueError):
        CapabilityError("nope")
    assert str(CapabilityError("expired")) == "expired"
    assert CapabilityError("expired", "token has expired").reason == "expired"


def test_verifier_rejects_non_ed25519_keys():
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TypeError):
        CapabilityVerifier({"k": rsa.public_key()}, ISSUER, AUDIENCE, Clock())


# -- key files -----------------------------------------------------------------


def test_signing_key_created_0600_and_reused(tmp_path):
    path = tmp_path / "capability.key"
    first = load_or_create_signing_key(str(path))

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in tmp_path.iterdir()] == ["capability.key"]  # no temp file left

    second = load_or_create_signing_key(str(path))
    assert key_id(first.public_key()) == key_id(second.public_key())


def test_signing_key_created_by_racing_processes_is_one_key(tmp_path):
    # Two instances started at once on one key file (a shared mount) must not each
    # write their own key: one wins, the other loads it.
    path = str(tmp_path / "capability.key")
    script = ("import sys; from treadmill.common.captoken import load_or_create_signing_key, "
              "key_id; print(key_id(load_or_create_signing_key(sys.argv[1]).public_key()))")
    procs = [subprocess.Popen([sys.executable, "-c", script, path], stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    kids = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert kids == {key_id(load_or_create_signing_key(path).public_key())}
    assert [p.name for p in tmp_path.iterdir()] == ["capability.key"]


def test_signing_key_created_0600_despite_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        load_or_create_signing_key(str(tmp_path / "k.pem"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600


def test_group_readable_signing_key_still_loads(tmp_path):
    path = tmp_path / "capability.key"
    first = load_or_create_signing_key(str(path))
    path.chmod(0o644)  # logged as a warning, not refused
    assert key_id(load_or_create_signing_key(str(path)).public_key()) == key_id(first.public_key())


def test_signing_key_in_missing_directory(tmp_path):
    path = tmp_path / "missing" / "k.pem"
    with pytest.raises(CapabilityKeyError, match=str(path)):
        load_or_create_signing_key(str(path))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "text", "bad-pem"],
)
def test_corrupt_signing_key_names_path(tmp_path, content):
    path = tmp_path / "capability.key"
    path.write_bytes(content)
    with pytest.raises(CapabilityKeyError, match=str(path)) as info:
        load_or_create_signing_key(str(path))
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == content  # never overwritten


def test_rsa_signing_key_refused(tmp_path):
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CapabilityKeyError, match=rf"{path}.*not Ed25519"):
        load_or_create_signing_key(str(path))


def test_encrypted_signing_key_refused(tmp_path, key):
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CapabilityKeyError, match=rf"{path}.*encrypted"):
        load_or_create_signing_key(str(path))


def test_unreadable_signing_key_names_path(tmp_path):
    path = tmp_path / "dir.key"
    path.mkdir()  # reading a directory fails with IsADirectoryError
    with pytest.raises(CapabilityKeyError, match=str(path)):
        load_or_create_signing_key(str(path))


def _verifies(keys, signer):
    verifier = CapabilityVerifier(keys, ISSUER, AUDIENCE, _clock())
    token = signer.sign("alice", AUDIENCE, [PULL], ttl=60)
    return verifier.verify(token, "repository", "lab/fw", "pull").subject == "alice"


def test_public_keys_from_public_pem(tmp_path, key, signer):
    path = tmp_path / "capability.pub"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    keys = load_public_keys(str(path))
    assert list(keys) == [signer.key_id]
    assert _verifies(keys, signer)
    assert load_public_keys(path).keys() == keys.keys()  # a Path works too
    assert load_public_keys(path.read_text()).keys() == keys.keys()  # and the text itself


def test_public_keys_from_private_key_file(tmp_path):
    path = tmp_path / "capability.key"
    private = load_or_create_signing_key(str(path))
    signer = CapabilitySigner(private, ISSUER, _clock())
    keys = load_public_keys(str(path))
    assert list(keys) == [signer.key_id]
    assert _verifies(keys, signer)


def test_public_keys_from_jwks(tmp_path, signer):
    path = tmp_path / "capability-keys.json"
    path.write_text(json.dumps(signer.jwks()))
    keys = load_public_keys(str(path))
    assert list(keys) == [signer.key_id]
    assert _verifies(keys, signer)
    assert load_public_keys(json.dumps(signer.jwks())).keys() == keys.keys()


def test_several_pem_keys_in_one_file(tmp_path, key, signer):
    other = Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "keys.pem"
    path.write_bytes(
        b"".join(
            k.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for k in (other, key.public_key())
        )
    )
    assert set(load_public_keys(str(path))) == {key_id(other), signer.key_id}


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"{not json", b'{"keys": []}', b'{"keys": "x"}', b"[]"],
)
def test_bad_public_key_file_names_path(tmp_path, content):
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(CapabilityKeyError, match=str(path)):
        load_public_keys(str(path))


def test_missing_public_key_file_names_path(tmp_path):
    path = tmp_path / "absent.pem"
    with pytest.raises(CapabilityKeyError, match=str(path)):
        load_public_keys(str(path))


def test_public_jwk(key):
    jwk = public_jwk(key.public_key())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64(raw),
        "kid": hashlib.sha256(raw).hexdigest()[:16],
        "alg": "EdDSA",
        "use": "sig",
    }
    # PyJWT reads it back as the same key.
    restored = jwt.PyJWK(jwk).key
    assert isinstance(restored, Ed25519PublicKey)
    assert key_id(restored) == jwk["kid"]


def test_jwks_rotation(key, clock):
    old = Ed25519PrivateKey.generate()
    old_token = CapabilitySigner(old, ISSUER, clock).sign("alice", AUDIENCE, [PULL], ttl=60)
    signer = CapabilitySigner(
        key, ISSUER, clock, published_keys=[old.public_key(), key.public_key()]
    )

    jwks = signer.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [signer.key_id, key_id(old.public_key())]

    verifier = CapabilityVerifier(parse_jwks(jwks), ISSUER, AUDIENCE, clock)
    verifier.verify(old_token, "repository", "lab/fw", "pull")
    verifier.verify(signer.sign("bob", AUDIENCE, [PULL], ttl=60), "repository", "lab/fw", "pull")


def test_parse_jwks_skips_foreign_keys_and_refuses_bad_ones(key):
    jwk = public_jwk(key.public_key())
    foreign = [
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "OKP", "crv": "X25519", "x": jwk["x"]},
        {**jwk, "use": "enc", "kid": "enc"},
        {**jwk, "alg": "HS256", "kid": "hs"},
    ]
    assert list(parse_jwks({"keys": [*foreign, jwk]})) == [jwk["kid"]]
    no_kid = {k: v for k, v in jwk.items() if k != "kid"}
    assert list(parse_jwks({"keys": [no_kid]})) == [jwk["kid"]]

    bad = [
        {"keys": foreign},  # nothing usable
        {"keys": [{**jwk, "x": "AAAA"}]},
        {"keys": [{**jwk, "x": "!!!"}]},
        {"keys": [{**jwk, "x": None}]},
        {"keys": [{**jwk, "d": jwk["x"]}]},
        {"keys": [{**jwk, "kid": 7}]},
        {
            "keys": [
                jwk,
                {**public_jwk(Ed25519PrivateKey.generate().public_key()), "kid": jwk["kid"]},
            ]
        },
        {"keys": ["x"]},
        {},
    ]
    for obj in bad:
        with pytest.raises(CapabilityKeyError):
            parse_jwks(obj)


# -- Authorization header ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (b"", None),
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        (b"Bearer abc.def.ghi", "abc.def.ghi"),
        (b"bearer   abc-_.~+/==  ", "abc-_.~+/=="),
        (b"BEARER abc", "abc"),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Basic YWxpY2U6c2VjcmV0", None),
        (b"Bearer a b", None),
        (b"Bearer a,b", None),
        (b"Bearer =abc", None),
        (b"Bearer \xff", None),
        (b"abc.def.ghi", None),
    ],
)
def test_bearer_token(value, expected):
    assert bearer_token(value) == expected
