"""shipyard_common.oidc in process: an identity provider's JWTs (tests/security/idp.py signs them)
verified against a JWKS file, each refusal saying why; the claims that name a holder and give a
role; the settings that switch it on. The same over HTTP, through the services, is in
tests/security/test_oidc.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import Unauthorized, Unavailable
from shipyard_common.oidc import JwksCache, JwtValidator, OidcSettings, validator
from shipyard_common.settings import PlatformSettings
from tests.security.idp import AUDIENCE, ISSUER, IdentityProvider, jwk, new_key


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def oidc_settings(jwks: Path, **options: Any) -> OidcSettings:
    values: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": jwks,
                              "group_roles": {"ml-trainers": "trainer", "ml-admins": "admin"}}
    values.update(options)
    return OidcSettings(**values)


@pytest.fixture
def idp() -> IdentityProvider:
    return IdentityProvider()


@pytest.fixture
def jwks_file(tmp_path: Path, idp: IdentityProvider) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(idp.jwks()))
    return path


def refusal(check: JwtValidator, token: str) -> str:
    with pytest.raises(Unauthorized) as refused:
        check.principal(token)
    return refused.value.message


def test_tokens_signed_with_each_algorithm_name_their_holder(tmp_path: Path, idp: IdentityProvider) -> None:
    algorithms = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "ES512"]
    for alg in algorithms[1:]:
        idp.add_key(f"key-{alg}", alg)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(idp.jwks()))
    check = JwtValidator(oidc_settings(path, algorithms=algorithms))
    for alg in algorithms:
        kid = "k1" if alg == "RS256" else f"key-{alg}"
        token = idp.token(kid=kid, alg=alg, sub=f"holder-{alg}")
        principal = check.principal(token)
        assert (principal.name, principal.role) == (f"holder-{alg}", Role.TRAINER), alg
    # An algorithm the platform does not take is refused even with a good signature.
    narrow = JwtValidator(oidc_settings(path))
    assert "'ES384' is not one this platform takes (RS256, ES256)" in refusal(
        narrow, idp.token(kid="key-ES384", alg="ES384"))


def test_each_refusal_says_what_is_wrong(jwks_file: Path, idp: IdentityProvider) -> None:
    check = JwtValidator(oidc_settings(jwks_file))
    public = json.dumps(idp.jwks()["keys"][0]).encode()
    other = new_key("RS256")
    cases = {
        "its issuer 'https://evil.example' is not": idp.token(iss="https://evil.example"),
        "its audience 'other-app' does not include 'shipyard'": idp.token(aud="other-app"),
        "it expired at": idp.token(exp=int(time.time()) - 3600),
        "it has no expiry ('exp')": idp.token(exp=None),
        "its signature does not verify": idp.token(key=other),
        "its key id 'k9' is unknown": idp.token(kid="k9", key=other, alg="RS256"),
        "it is not signed (alg 'none')": idp.token(alg="none"),
        "its algorithm 'HS256' is not one this platform takes": idp.token(alg="HS256", key=public),
        "it is not valid before": idp.token(nbf=int(time.time()) + 3600),
        "it was issued in the future": idp.token(iat=int(time.time()) + 3600),
        "critical header extensions": idp.token(header={"crit": ["b64"], "b64": False}),
        "its 'exp' is not a number": idp.token(exp="tomorrow"),
        "malformed: its payload is not a JSON object": "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
        "malformed: its signature is not base64url": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln!",
        "malformed: a JWT is three base64url parts": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln.x",
    }
    for expected, token in cases.items():
        message = refusal(check, token)
        assert message.startswith("JWT refused: ") and expected in message, (expected, message)
    assert "does not include 'shipyard'" in refusal(check, idp.token(aud=["shipyard-ui", "shipyard-x"]))
    assert check.principal(idp.token(aud=["other", AUDIENCE])).name == "alice@example.test"


def test_the_leeway_allows_a_little_clock_skew(jwks_file: Path, idp: IdentityProvider) -> None:
    clock = Clock()
    check = JwtValidator(oidc_settings(jwks_file, leeway_s=30), clock=clock)
    token = idp.token(exp=int(clock.now) - 10, iat=int(clock.now) - 100)
    assert check.principal(token).role == Role.TRAINER
    late = idp.token(exp=int(clock.now) - 31, iat=int(clock.now) - 100)
    assert "it expired at" in refusal(check, late)
    # A token that verified is remembered only until it expires (plus the leeway).
    clock.now += 25
    assert "it expired at" in refusal(check, token)


def test_roles_from_a_claim_from_groups_or_a_default(jwks_file: Path, idp: IdentityProvider) -> None:
    check = JwtValidator(oidc_settings(jwks_file, role_claim="realm_access.roles", name_claim="email"))
    nested = idp.token(email="bob@example.test", realm_access={"roles": ["offline_access", "Approver"]},
                       groups=[])
    assert (check.principal(nested).name, check.principal(nested).role) == ("bob@example.test", Role.APPROVER)
    # Several roles: the first of admin, approver, trainer, viewer.
    both = idp.token(email="carol@example.test", realm_access={"roles": ["trainer"]}, groups=["ml-admins"])
    assert check.principal(both).role == Role.ADMIN
    none = idp.token(email="dan@example.test", groups=["sales"])
    assert "grants no Shipyard role (no role in its 'realm_access.roles' claim and none of its 'groups' " \
           "is mapped to a role)" in refusal(check, none)
    assert "its 'email' claim, which names its holder, is missing" in refusal(check, idp.token())
    # A claim whose name holds dots (Auth0's namespaced claims) is read whole.
    namespaced = JwtValidator(oidc_settings(jwks_file, role_claim="https://shipyard.example/role",
                                            group_roles={}))
    token = idp.token(**{"https://shipyard.example/role": "viewer"})
    assert namespaced.principal(token).role == Role.VIEWER
    fallback = JwtValidator(oidc_settings(jwks_file, group_roles={}, default_role="viewer"))
    assert fallback.principal(idp.token(groups=None)).role == Role.VIEWER


def test_the_jwks_is_read_once_and_again_for_an_unknown_key_at_most_once_a_while(
    tmp_path: Path, idp: IdentityProvider
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(idp.jwks()))
    clock = Clock()
    keys = JwksCache(file=path, refresh_min_s=60, max_age_s=3600, clock=clock)
    check = JwtValidator(oidc_settings(path), keys=keys)
    for n in range(5):
        check.principal(idp.token(sub=f"user-{n}"))
    assert keys.reads == 1
    # The provider rotates in a key: a token that names it within refresh_min_s of the last read is
    # refused without a read (a flood of invented key ids costs the provider nothing)...
    idp.add_key("k2", "ES256")
    path.write_text(json.dumps(idp.jwks()))
    assert "its key id 'k2' is unknown" in refusal(check, idp.token(kid="k2"))
    assert keys.reads == 1
    # ...and after it, the first such token reads the keys again and passes.
    clock.now += 61
    assert check.principal(idp.token(kid="k2", sub="bob")).name == "bob"
    assert keys.reads == 2
    for n in range(3):
        clock.now += 10
        assert "its key id 'k9' is unknown" in refusal(check, idp.token(kid="k9", sub=f"x{n}"))
    assert keys.reads == 2
    clock.now += 31
    assert "its key id 'k9' is unknown" in refusal(check, idp.token(kid="k9", sub="x"))
    assert keys.reads == 3
    # After max_age_s the keys are read again even when every kid is known.
    clock.now += 3600
    check.principal(idp.token(sub="later"))
    assert keys.reads == 4


def test_an_unreadable_jwks_is_a_503_until_it_can_be_read(tmp_path: Path, idp: IdentityProvider) -> None:
    path = tmp_path / "jwks.json"
    clock = Clock()
    check = JwtValidator(oidc_settings(path), keys=JwksCache(file=path, refresh_min_s=10, clock=clock))
    with pytest.raises(Unavailable, match=r"identity provider's keys \(.*jwks.json\) cannot be read"):
        check.principal(idp.token())
    path.write_text(json.dumps(idp.jwks()))
    with pytest.raises(Unavailable):  # not read again within refresh_min_s
        check.principal(idp.token())
    clock.now += 11
    assert check.principal(idp.token()).role == Role.TRAINER


def test_weak_and_foreign_keys_in_the_jwks_are_skipped(tmp_path: Path, idp: IdentityProvider) -> None:
    weak = new_key("RS256", rsa_bits=1024)
    path = tmp_path / "jwks.json"
    keys = [jwk("weak", weak), {"kid": "sym", "kty": "oct", "k": "c2VjcmV0"},
            {**jwk("enc", idp.keys["k1"][0]), "use": "enc"}]
    path.write_text(json.dumps({"keys": keys}))
    check = JwtValidator(oidc_settings(path))
    assert "its key id 'weak' is unknown" in refusal(check, idp.token(kid=None, key=weak, alg="RS256",
                                                                    header={"kid": "weak"}))
    assert "its key id 'enc' is unknown" in refusal(check, idp.token(header={"kid": "enc"}))


def test_the_authenticator_tries_a_jwt_after_the_configured_tokens(
    jwks_file: Path, idp: IdentityProvider
) -> None:
    authenticator = TokenAuthenticator({"s3cret-1": Role.ADMIN}, jwt=JwtValidator(oidc_settings(jwks_file)))
    assert authenticator.authenticate("Bearer s3cret-1").role == Role.ADMIN
    token = idp.token()
    assert not authenticator.accepts_bearer(f"Bearer {token}".encode())  # the lane then authorizes
    assert authenticator.authorize(f"Bearer {token}", None, Role.TRAINER).name == "alice@example.test"
    assert authenticator.authenticate(None, token).role == Role.TRAINER  # X-API-Token too
    with pytest.raises(Unauthorized, match="unknown API token"):
        authenticator.authenticate("Bearer not-a-jwt")
    with pytest.raises(Unauthorized, match="JWT refused: malformed"):
        authenticator.authenticate("Bearer a.b.c")


def test_settings_switch_it_on_completely_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert validator(OidcSettings()) is None and not PlatformSettings().oidc.enabled
    for missing, options in [
        ("SHIPYARD_OIDC_AUDIENCE is needed", {"audience": None}),
        ("set one of SHIPYARD_OIDC_JWKS_URL or SHIPYARD_OIDC_JWKS_FILE", {"jwks_url": "https://idp/jwks"}),
        ("say where a token's role comes from", {"group_roles": {}}),
        ("must be an http(s) URL", {"jwks_file": None, "jwks_url": "file:///etc/jwks.json"}),
    ]:
        with pytest.raises(ValidationError, match=missing.replace("(", r"\(").replace(")", r"\)")):
            oidc_settings(tmp_path / "jwks.json", **options)
    monkeypatch.setenv("SHIPYARD_OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("SHIPYARD_OIDC_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("SHIPYARD_OIDC_JWKS_URL", "https://idp.example.test/certs")
    monkeypatch.setenv("SHIPYARD_OIDC_GROUP_ROLES", '{"ml-admins": "admin"}')
    monkeypatch.setenv("SHIPYARD_OIDC_ALGORITHMS", '["ES256"]')
    settings = PlatformSettings(state_dir=tmp_path)
    assert settings.oidc.enabled and settings.oidc.group_roles == {"ml-admins": Role.ADMIN}
    env = settings.as_env()
    for name in ("ISSUER", "AUDIENCE", "JWKS_URL", "GROUP_ROLES", "ALGORITHMS"):
        monkeypatch.delenv(f"SHIPYARD_OIDC_{name}")
    monkeypatch.setattr("os.environ", {**env})
    assert PlatformSettings().oidc == settings.oidc  # a child process gets the same settings
