import hashlib

import pytest
from pydantic import ValidationError

from shipyard_common.auth import Grant, Role, TokenAuthenticator, reveals_token
from shipyard_common.settings import (
    DEFAULT_DEV_TOKENS,
    DEV_ADMIN_TOKEN,
    DEV_APPROVER_TOKEN,
    DEV_TRAINER_TOKEN,
    PlatformSettings,
)


def test_dev_defaults_need_nothing_but_a_state_dir(tmp_path):
    settings = PlatformSettings(state_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'shipyard.db'}"
    assert settings.tokens == {DEV_ADMIN_TOKEN: Grant(role=Role.ADMIN, name="carol"),
                               DEV_TRAINER_TOKEN: Grant(role=Role.TRAINER, name="alice"),
                               DEV_APPROVER_TOKEN: Grant(role=Role.APPROVER, name="bob")}
    assert settings.data_repo_path == (tmp_path / "data").resolve()


def test_default_token_is_refused_outside_dev():
    with pytest.raises(ValidationError, match="only allowed with SHIPYARD_ENV=dev"):
        PlatformSettings(env="prod")


def test_environment_configures_tokens_and_database(monkeypatch):
    monkeypatch.setenv("SHIPYARD_ENV", "prod")
    monkeypatch.setenv("SHIPYARD_TOKENS", '{"s3cret": "approver"}')
    monkeypatch.setenv("SHIPYARD_DB_URL", "postgresql://u@db/shipyard")
    settings = PlatformSettings()
    assert settings.tokens == {"s3cret": Role.APPROVER}
    assert settings.database_url == "postgresql://u@db/shipyard"


def test_tokens_name_their_holders_without_showing_the_token(monkeypatch):
    tokens = '{"s3cret-1": {"role": "approver", "name": "bob"}, "s3cret-2": "trainer"}'
    monkeypatch.setenv("SHIPYARD_TOKENS", tokens)
    authenticator = TokenAuthenticator(PlatformSettings().tokens)
    bob = authenticator.authenticate("Bearer s3cret-1")
    assert (bob.name, bob.role) == ("bob", Role.APPROVER)
    anonymous = authenticator.authenticate("Bearer s3cret-2")
    digest = hashlib.sha256(b"s3cret-2").hexdigest()[:8]
    assert (anonymous.role, anonymous.name) == (Role.TRAINER, f"role:trainer#{digest}")
    assert "s3cr" not in anonymous.name and "-2" not in anonymous.name
    monkeypatch.setenv("SHIPYARD_TOKENS", '{"t": {"role": "approver", "name": "has space"}}')
    with pytest.raises(ValidationError):
        PlatformSettings()



@pytest.mark.parametrize(("name", "token"), [
    ("dev-admin", "dev-admin-token"),  # the dev tokens' names were their first nine characters
    ("alice", "tok-alice"), ("ALICE", "xx-alice-yy"), ("k3x9", "prefix-k3x9"),
])
def test_a_name_that_shows_part_of_its_token_is_refused(name, token):
    assert reveals_token(name, token)
    with pytest.raises(ValidationError, match="shows no part of the token") as refused:
        PlatformSettings(env="dev", tokens={token: Grant(role=Role.TRAINER, name=name)})
    assert "no part of the token" in str(refused.value)


def test_names_that_share_fewer_than_four_characters_are_kept():
    assert not reveals_token("bob", "bob-token") and not reveals_token("alice", "s3cret-1")
    settings = PlatformSettings(env="test", tokens={"bob-token": Grant(role=Role.APPROVER, name="bob")})
    assert settings.tokens["bob-token"] == Grant(role=Role.APPROVER, name="bob")


def test_the_dev_tokens_names_show_no_part_of_them():
    for token, grant in DEFAULT_DEV_TOKENS.items():
        assert isinstance(grant, Grant) and grant.name and not reveals_token(grant.name, token), token

def test_child_environment_round_trips(tmp_path):
    settings = PlatformSettings(env="test", state_dir=tmp_path,
                                tokens={"t": Role.TRAINER, "u": Grant(role=Role.ADMIN, name="ann")})
    env = settings.as_env()
    assert env["DO_NOT_TRACK"] == "1" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    import os

    old = dict(os.environ)
    try:
        os.environ.update(env)
        again = PlatformSettings()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert again.database_url == settings.database_url
    assert again.tokens == settings.tokens
    assert again.env == "test"
