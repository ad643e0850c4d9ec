"""Client auth: keys, JWTs, minted `ek_` tokens and Origin, with no sockets."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.auth.credentials import ANONYMOUS, Authenticator, CredentialKind, Identity, credential_from
from app.auth.origin import check_origin
from app.auth.tokens import EK_AUDIENCE
from app.config import ConfigError
from app.errors import OriginNotAllowedError, UnauthorizedError
from tests.helpers import (
    FREE_KEY,
    JWT_SECRET,
    PRO_KEY,
    TOKEN_SECRET,
    auth_settings,
    hs256,
    jwt_claims,
)

pytestmark = pytest.mark.timeout(60)


def public_pem(private_key: Any) -> str:
    return str(
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(auth_settings(jwt={"secret": JWT_SECRET}))


# Client keys


def test_plain_and_hashed_keys_map_to_their_tiers(auth: Authenticator) -> None:
    """A plaintext key and a `sha256:` key each authenticate to their tier with a key-derived id."""
    pro = auth.authenticate(PRO_KEY)
    assert (pro.tier, pro.kind) == ("pro", CredentialKind.KEY)
    assert pro.client_id == "key:" + hashlib.sha256(PRO_KEY.encode()).hexdigest()[:16]
    free = auth.authenticate(FREE_KEY)
    assert free.tier == "free"
    assert free.client_id == "key:" + hashlib.sha256(FREE_KEY.encode()).hexdigest()[:16]
    assert PRO_KEY not in pro.client_id


def test_unknown_key_is_unauthorized(auth: Authenticator) -> None:
    """An unknown key is refused with `unauthorized` and a message that does not echo it."""
    with pytest.raises(UnauthorizedError) as refused:
        auth.authenticate("ck-nope")
    assert refused.value.code == "unauthorized"
    assert "ck-nope" not in refused.value.message


def test_no_credential_gets_the_anonymous_tier_or_is_refused() -> None:
    """No credential means the anonymous tier, or a refusal where there is none."""
    assert Authenticator(auth_settings()).authenticate(None) == Identity(
        "default", ANONYMOUS, CredentialKind.ANONYMOUS
    )
    with pytest.raises(UnauthorizedError):
        Authenticator(auth_settings(anonymous_tier="")).authenticate(None)


def test_credential_from_header_and_subprotocol() -> None:
    """The credential comes from `Authorization: Bearer` or the browser's key subprotocol."""
    assert credential_from([(b"authorization", b"Bearer abc")], []) == "abc"
    assert credential_from([], ["realtime", "openai-insecure-api-key.ek_x.y"]) == "ek_x.y"
    assert credential_from([(b"authorization", b"Basic abc")], []) is None


# JWTs


def test_jwt_valid(auth: Authenticator) -> None:
    """An HS256 JWT with `sub`, `exp` and a known tier authenticates as `sub:<sub>`."""
    identity = auth.authenticate(hs256(jwt_claims()))
    assert identity == Identity("pro", "sub:user-42", CredentialKind.JWT)


def test_jwt_expired(auth: Authenticator) -> None:
    """An expired JWT (past the leeway) is refused as expired."""
    with pytest.raises(UnauthorizedError, match="expired"):
        auth.authenticate(hs256(jwt_claims(exp=int(time.time()) - 60)))


def test_jwt_wrong_signature(auth: Authenticator) -> None:
    """A JWT signed with another secret is refused."""
    with pytest.raises(UnauthorizedError, match="invalid token"):
        auth.authenticate(hs256(jwt_claims(), secret="another-secret-0123456789-0123456789"))


def test_jwt_unknown_or_missing_tier(auth: Authenticator) -> None:
    """A JWT naming a tier the relay does not serve, or no tier at all, is refused."""
    with pytest.raises(UnauthorizedError, match="tier"):
        auth.authenticate(hs256(jwt_claims(tier="platinum")))
    with pytest.raises(UnauthorizedError, match="'tier' claim"):
        auth.authenticate(hs256(jwt_claims(tier=None)))


def test_jwt_requires_exp_and_sub(auth: Authenticator) -> None:
    """A JWT without `exp` or without `sub` is refused."""
    for token in (
        hs256(jwt_claims(exp=None)),
        hs256(jwt_claims(sub=None)),
        hs256(jwt_claims(sub="")),
    ):
        with pytest.raises(UnauthorizedError):
            auth.authenticate(token)


def test_jwt_custom_claim_audience_and_issuer() -> None:
    """The tier claim's name, the audience and the issuer come from the settings."""
    auth = Authenticator(
        auth_settings(
            jwt={"secret": JWT_SECRET, "tier_claim": "plan", "audience": "relay", "issuer": "app"}
        )
    )
    good = jwt_claims(tier=None, plan="free", aud="relay", iss="app")
    assert auth.authenticate(hs256(good)).tier == "free"
    for bad in (
        {**good, "aud": "other"},
        {**good, "iss": "other"},
        jwt_claims(tier=None, plan="free"),
    ):
        with pytest.raises(UnauthorizedError):
            auth.authenticate(hs256(bad))


def test_jwt_rs256_and_es256_with_public_keys() -> None:
    """RS256 and ES256 JWTs verify against the configured public key; other keys' do not."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_auth = Authenticator(
        auth_settings(jwt={"public_key": public_pem(rsa_key), "algorithms": ["RS256"]})
    )
    ec_auth = Authenticator(
        auth_settings(jwt={"public_key": public_pem(ec_key), "algorithms": ["ES256"]})
    )
    rs_token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256")
    es_token = jwt.encode(jwt_claims(), ec_key, algorithm="ES256")
    assert rsa_auth.authenticate(rs_token).client_id == "sub:user-42"
    assert ec_auth.authenticate(es_token).client_id == "sub:user-42"
    with pytest.raises(UnauthorizedError):
        rsa_auth.authenticate(es_token)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(UnauthorizedError):
        rsa_auth.authenticate(jwt.encode(jwt_claims(), other, algorithm="RS256"))


def test_jwt_algorithm_confusion_is_refused() -> None:
    """An HS256 token 'signed' with the public key as secret is refused when only RS256 is on."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = public_pem(rsa_key)
    auth = Authenticator(auth_settings(jwt={"public_key": pem, "algorithms": ["RS256", "HS256"]}))
    forged = jwt.api_jws.PyJWS().encode(
        json.dumps(jwt_claims()).encode(), b"x" * 32, algorithm="HS256"
    )
    with pytest.raises(UnauthorizedError):
        auth.authenticate(forged)


def test_bad_jwt_configuration_fails_at_startup() -> None:
    """A short HS256 secret or an unusable public key is a configuration error."""
    with pytest.raises(ConfigError, match="RELAY_JWT__SECRET"):
        Authenticator(auth_settings(jwt={"secret": "short"}))
    with pytest.raises(ConfigError, match="RELAY_JWT__PUBLIC_KEY"):
        Authenticator(auth_settings(jwt={"public_key": "not a key", "algorithms": ["RS256"]}))
    ec_pem = public_pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="fits none"):
        Authenticator(auth_settings(jwt={"public_key": ec_pem, "algorithms": ["RS256"]}))


# Minted tokens


def test_minted_token_authenticates_as_its_client(auth: Authenticator) -> None:
    """A minted `ek_` token authenticates to the minting client's tier and id, on any replica
    that shares the token secret."""
    owner = auth.authenticate(PRO_KEY)
    token, expires_at = auth.mint(owner)
    assert token.startswith("ek_")
    assert time.time() + 590 < expires_at <= time.time() + 600
    replica = Authenticator(auth_settings())
    assert replica.authenticate(token) == Identity("pro", owner.client_id, CredentialKind.MINTED)


def test_minted_token_is_a_jws_with_its_own_audience(auth: Authenticator) -> None:
    """An `ek_` token is `ek_` + an HS256 JWS whose claims name the client, tier, lifetime, an id
    and the ek audience, and no model unless it was minted for one."""
    owner = auth.authenticate(PRO_KEY)
    token, expires_at = auth.mint(owner, 60)
    assert jwt.get_unverified_header(token[3:])["alg"] == "HS256"
    body = jwt.decode(token[3:], options={"verify_signature": False})
    assert body["aud"] == EK_AUDIENCE
    assert (body["sub"], body["tier"], body["exp"]) == (owner.client_id, "pro", expires_at)
    assert body["exp"] - body["iat"] == 60
    again = jwt.decode(auth.mint(owner, 60)[0][3:], options={"verify_signature": False})
    assert body["jti"] != again["jti"]
    assert "model" not in body


def test_minted_token_carries_its_model(auth: Authenticator) -> None:
    """A token minted for a model authenticates to an identity bound to that model."""
    token, _ = auth.mint(auth.authenticate(PRO_KEY), model="gpt-realtime-mini")
    identity = auth.authenticate(token)
    assert (identity.kind, identity.model) == (CredentialKind.MINTED, "gpt-realtime-mini")
    assert auth.authenticate(auth.mint(auth.authenticate(PRO_KEY))[0]).model is None


def test_mint_lifetime_is_openais_range_capped_by_the_setting(auth: Authenticator) -> None:
    """`mint` takes 10-7200 s, as OpenAI does, capped at `token_ttl_seconds`."""
    owner = auth.authenticate(PRO_KEY)
    now = time.time()
    assert auth.mint(owner, 10, now=now)[1] == int(now) + 10
    assert auth.mint(owner, 7200, now=now)[1] == int(now) + 600
    long_lived = Authenticator(auth_settings(token_ttl_seconds=7200))
    assert long_lived.mint(owner, 7200, now=now)[1] == int(now) + 7200
    for ttl in (0, 9, 7201):
        with pytest.raises(ValueError, match="10-7200"):
            auth.mint(owner, ttl)


def test_minted_token_expires(auth: Authenticator) -> None:
    """A minted token is refused as expired once its lifetime (and a few seconds' leeway) has
    passed, and accepted within it."""
    owner = auth.authenticate(PRO_KEY)
    expired, _ = auth.mint(owner, 10, now=time.time() - 40)
    with pytest.raises(UnauthorizedError, match="expired") as refused:
        auth.authenticate(expired)
    assert refused.value.code == "unauthorized"
    fresh, _ = auth.mint(owner, 10, now=time.time() - 8)
    assert auth.authenticate(fresh).tier == "pro"


def test_tampered_minted_token_is_refused(auth: Authenticator) -> None:
    """Changing a minted token's claims, header or signature, or signing it with the raw token
    secret instead of the derived key, makes it invalid."""
    token, _ = auth.mint(auth.authenticate(FREE_KEY))
    header, payload, signature = token[3:].split(".")
    claims_ = json.loads(jwt.utils.base64url_decode(payload))

    def segment(value: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(value).encode()).decode()

    middle = len(signature) // 2
    flipped = (
        signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    )
    unsigned = jwt.encode(claims_, "", algorithm="none")
    for forged in (
        f"ek_{header}.{segment({**claims_, 'tier': 'pro'})}.{signature}",
        f"ek_{header}.{segment({**claims_, 'model': 'gpt-realtime'})}.{signature}",
        f"ek_{header}.{payload}.{flipped}",
        f"ek_{header}.{payload}",
        f"ek_{unsigned}",
        "ek_" + jwt.encode(claims_, TOKEN_SECRET, algorithm="HS256"),
        "ek_",
        "ek_é.é",
    ):
        with pytest.raises(UnauthorizedError, match="invalid token") as refused:
            auth.authenticate(forged)
        assert refused.value.code == "unauthorized"


def test_minted_token_missing_a_claim_is_refused(auth: Authenticator) -> None:
    """A token signed with the right key but missing a required claim, carrying another
    audience or a non-string model, is refused."""
    token, _ = auth.mint(auth.authenticate(PRO_KEY), model="gpt-realtime")
    good = jwt.decode(token[3:], options={"verify_signature": False})
    key = auth._minted._key  # the derived key, to sign what a buggy minter might have signed
    variants = [{k: v for k, v in good.items() if k != claim} for claim in good if claim != "model"]
    variants += [{**good, "aud": "other"}, {**good, "model": 7}, {**good, "sub": ""}]
    for variant in variants:
        with pytest.raises(UnauthorizedError, match="invalid token"):
            auth.authenticate("ek_" + jwt.encode(variant, key, algorithm="HS256"))


def test_app_jwt_and_ek_token_never_pass_as_each_other() -> None:
    """With one secret configured for both app JWTs and ek_ tokens, an app JWT given the ek_
    prefix, and an ek_ token's JWS without it, are refused with `unauthorized`, even when the
    app JWT claims the ek audience or the JWT settings expect it."""
    auth = Authenticator(auth_settings(token_secret=JWT_SECRET, jwt={"secret": JWT_SECRET}))
    minted, _ = auth.mint(auth.authenticate(PRO_KEY))
    expecting_ek = Authenticator(
        auth_settings(token_secret=JWT_SECRET, jwt={"secret": JWT_SECRET, "audience": EK_AUDIENCE})
    )
    for verifier in (auth, expecting_ek):
        for credential in (
            "ek_" + hs256(jwt_claims()),
            "ek_" + hs256(jwt_claims(aud=EK_AUDIENCE, iat=int(time.time()), jti="x")),
            minted[3:],
        ):
            with pytest.raises(UnauthorizedError) as refused:
                verifier.authenticate(credential)
            assert refused.value.code == "unauthorized"
    assert auth.authenticate(hs256(jwt_claims())).kind is CredentialKind.JWT
    assert auth.authenticate(minted).kind is CredentialKind.MINTED


def test_minted_token_with_another_secret_is_refused(auth: Authenticator) -> None:
    """A token minted under another secret is refused."""
    other = Authenticator(auth_settings(token_secret="another-token-secret-0123456789-abcdef"))
    token, _ = other.mint(other.authenticate(PRO_KEY))
    with pytest.raises(UnauthorizedError, match="invalid token"):
        auth.authenticate(token)


def test_minted_token_for_a_removed_tier_is_refused() -> None:
    """A token whose tier the relay no longer serves is refused."""
    old = Authenticator(auth_settings())
    token, _ = old.mint(Identity("free", "key:abc"))
    tiers: dict[str, Any] = {"pro": {}, "default": {}}
    new = Authenticator(auth_settings(tiers=tiers, client_keys={PRO_KEY: "pro"}))
    with pytest.raises(UnauthorizedError, match="tier"):
        new.authenticate(token)


def test_without_a_token_secret_tokens_stay_on_their_replica(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no token secret, each process signs with its own secret and says so once."""
    first, second = (
        Authenticator(auth_settings(token_secret=None)),
        Authenticator(auth_settings(token_secret=None)),
    )
    with caplog.at_level(logging.WARNING, logger="app.auth.tokens"):
        token, _ = first.mint(first.authenticate(PRO_KEY))
        first.mint(first.authenticate(PRO_KEY))
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "RELAY_TOKEN_SECRET" in caplog.records[0].message
    assert first.authenticate(token).tier == "pro"
    with pytest.raises(UnauthorizedError):
        second.authenticate(token)
    with pytest.raises(ConfigError, match="RELAY_TOKEN_SECRET"):
        Authenticator(auth_settings(token_secret="short"))


# Origin


def headers(
    origin: str | None, host: str = "relay.example:8000", **extra: str
) -> list[tuple[bytes, bytes]]:
    result = [(b"host", host.encode())]
    if origin is not None:
        result.append((b"origin", origin.encode()))
    result += [(name.replace("_", "-").encode(), value.encode()) for name, value in extra.items()]
    return result


def test_listed_origin_is_allowed() -> None:
    """An origin in the list (exact scheme, host and port, case-insensitive) is allowed."""
    allowed = ["https://app.example", "http://localhost:5173"]
    check_origin(headers("https://app.example"), allowed)
    check_origin(headers("HTTPS://App.Example"), allowed)
    check_origin(headers("http://localhost:5173"), allowed)
    check_origin(headers("https://evil.example"), ["*"])


def test_unlisted_origin_is_refused() -> None:
    """An origin not listed, differing in scheme or port, or `null`, is refused."""
    allowed = ["https://app.example"]
    for origin in (
        "https://evil.example",
        "http://app.example",
        "https://app.example:8443",
        "null",
    ):
        with pytest.raises(OriginNotAllowedError) as refused:
            check_origin(headers(origin), allowed)
        assert refused.value.code == "origin_not_allowed"
        assert refused.value.close_code == 1008


def test_own_origin_is_allowed() -> None:
    """The relay's own origin on an IP or localhost (the bundled page) is allowed with an empty
    list, default ports included, and behind a proxy that sets X-Forwarded-Host."""
    check_origin(headers("http://127.0.0.1:8000", host="127.0.0.1:8000"), [])
    check_origin(headers("http://localhost", host="localhost:80"), [])
    check_origin(headers("http://[::1]:8000", host="[::1]:8000"), [])
    check_origin(
        headers("http://localhost:8080", host="10.0.0.5:8000", x_forwarded_host="localhost:8080"),
        [],
    )
    with pytest.raises(OriginNotAllowedError):
        check_origin(headers("http://127.0.0.1:9000", host="127.0.0.1:8000"), [])


def test_a_rebound_name_is_not_its_own_origin() -> None:
    """DNS rebinding: a page on an attacker's name pointed at the relay sends matching Origin
    and Host; a host name counts as the relay's own only when it is listed."""
    rebound = headers("http://evil.example:8000", host="evil.example:8000")
    with pytest.raises(OriginNotAllowedError):
        check_origin(rebound, [])
    check_origin(headers("https://relay.example", host="relay.example"), ["https://relay.example"])


def test_absent_origin_passes() -> None:
    """A request without Origin (not a browser) passes whatever the list says."""
    check_origin(headers(None), ["https://app.example"])
