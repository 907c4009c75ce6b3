"""Tokens held hashed (shipyard_common.auth.TokenTable): SHIPYARD_TOKENS takes a token's hash or a
secret to read at start beside clear tokens, the process keeps no clear token, each holder has a
name (what the audit records), and clear tokens are warned about in production."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from shipyard_cli.main import app as cli
from shipyard_common.auth import Grant, Role, TokenAuthenticator, TokenTable, hash_token, principal_name
from shipyard_common.edge.ratelimit import RateLimit
from shipyard_common.errors import Unauthorized
from shipyard_common.settings import DEV_ADMIN_TOKEN, PlatformSettings

SECRET = "Zq8-h4shed-t0ken-for-bob"


def strings_reachable_from(root: object) -> set[str]:
    """Every str the object graph under ``root`` holds (what a memory dump of it would show)."""
    seen: set[int] = set()
    found: set[str] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type):
            continue
        seen.add(id(item))
        if isinstance(item, str):
            found.add(item)
            continue
        stack.extend(gc.get_referents(item))
        if isinstance(item, dict):  # a dict's traversal skips its str keys
            stack.extend(item.keys())
        if hasattr(item, "__dict__"):  # an instance's attributes, which get_referents may not list
            stack.append(vars(item))
    return found


def test_a_hashed_token_authenticates_and_the_process_holds_no_clear_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "carol.token"
    secret_file.write_text("from-a-mounted-file-77\n")
    monkeypatch.setenv("DAN_TOKEN", "  from-the-environment-42 ")
    tokens = {hash_token(SECRET).upper().replace("SHA256:", "sha256:"): {"role": "approver", "name": "bob"},
              "carol": {"role": "admin", "file": str(secret_file)},
              "ci": {"role": "trainer", "env": "DAN_TOKEN", "name": "dan"},
              "plain-clear-token-1": "viewer"}
    monkeypatch.setenv("SHIPYARD_TOKENS", json.dumps(tokens))
    settings = PlatformSettings(state_dir=tmp_path)
    authenticator = TokenAuthenticator(settings.tokens)
    for token, name, role in [(SECRET, "bob", Role.APPROVER), ("from-a-mounted-file-77", "carol", Role.ADMIN),
                              ("from-the-environment-42", "dan", Role.TRAINER),
                              ("plain-clear-token-1", principal_name("plain-clear-token-1", Role.VIEWER),
                               Role.VIEWER)]:
        principal = authenticator.authenticate(f"Bearer {token}")
        assert (principal.name, principal.role) == (name, role)
        assert authenticator.accepts_bearer(f"Bearer {token}".encode())
    monkeypatch.delenv("SHIPYARD_TOKENS")
    monkeypatch.delenv("DAN_TOKEN")
    held = strings_reachable_from(settings) | strings_reachable_from(authenticator)
    # The probe finds a dict's keys (where the old authenticator kept its tokens) and a model's fields.
    assert "dan" in held and "from-the-env" in strings_reachable_from([{"from-the-env": 1}])
    held |= {json.dumps(settings.as_env()), repr(settings), settings.model_dump_json()}
    for clear in (SECRET, "from-a-mounted-file-77", "from-the-environment-42", "plain-clear-token-1"):
        assert not any(clear in text for text in held), clear
    # Knowing a hash is not holding its token.
    with pytest.raises(Unauthorized, match="unknown API token"):
        authenticator.authenticate(f"Bearer {hash_token(SECRET)}")
    assert not authenticator.accepts_bearer(f"Bearer {hash_token(SECRET)}".encode())


def test_a_hashed_token_without_a_name_is_named_as_its_clear_form_was() -> None:
    table = TokenTable.from_config({hash_token("s3cret-2"): Role.TRAINER})
    (principal,) = [TokenAuthenticator(table).authenticate("Bearer s3cret-2")]
    digest = hashlib.sha256(b"s3cret-2").hexdigest()[:8]
    assert principal.name == f"role:trainer#{digest}" == principal_name("s3cret-2", Role.TRAINER)
    assert table["s3cret-2"] == Role.TRAINER and "s3cret-2" in table and hash_token("s3cret-2") in table
    assert table == {"s3cret-2": Role.TRAINER} and repr(table) == f"TokenTable(role:trainer#{digest})"


@pytest.mark.parametrize(("entry", "problem"), [
    ({"role": "admin", "file": "/nonexistent/shipyard.token"},
     "the admin token of carol in SHIPYARD_TOKENS: cannot read /nonexistent/shipyard.token"),
    ({"role": "admin", "env": "SHIPYARD_TEST_UNSET_TOKEN"},
     "the environment variable SHIPYARD_TEST_UNSET_TOKEN is not set"),
    ({"role": "admin", "env": "SHIPYARD_TEST_EMPTY_TOKEN"}, "SHIPYARD_TEST_EMPTY_TOKEN is empty"),
    ({"role": "admin", "env": "X", "file": "/y"}, 'names exactly one of "file" or "env"'),
    ({"role": "admin", "env": "SHIPYARD_TEST_CAROL_TOKEN", "name": "carol"},
     "choose a name that shows no part of the token"),
])
def test_a_secret_that_cannot_be_read_is_refused_naming_where(
    entry: dict[str, Any], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPYARD_TEST_EMPTY_TOKEN", " \n")
    monkeypatch.setenv("SHIPYARD_TEST_CAROL_TOKEN", "xx-carol-token")
    with pytest.raises(ValidationError, match=r"SHIPYARD_TOKENS|exactly one") as refused:
        PlatformSettings(env="test", tokens={"carol": entry})
    assert problem in str(refused.value)
    assert "xx-carol-token" not in str(refused.value)


def test_one_token_given_twice_is_refused_and_errors_never_echo_a_token() -> None:
    with pytest.raises(ValidationError, match="gives one token twice") as twice:
        PlatformSettings(env="test", tokens={"s3cret-9": Role.ADMIN,
                                             hash_token("s3cret-9"): Grant(role=Role.VIEWER, name="eve")})
    with pytest.raises(ValidationError) as revealing:
        PlatformSettings(env="test", tokens={"tok-alice-77": Grant(role=Role.TRAINER, name="alice")})
    for refused in (twice, revealing):
        assert "s3cret-9" not in str(refused.value) and "tok-alice-77" not in str(refused.value)


def test_the_dev_tokens_are_refused_outside_dev_as_hashes_too() -> None:
    with pytest.raises(ValidationError, match="only allowed with SHIPYARD_ENV=dev"):
        PlatformSettings(env="test", tokens={hash_token(DEV_ADMIN_TOKEN): Role.ADMIN})


def test_clear_tokens_are_warned_about_in_production_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shipyard.settings"):
        PlatformSettings(env="prod", tokens={"prod-clear-1": {"role": "approver", "name": "bob"},
                                             "prod-clear-2": "viewer",
                                             hash_token("prod-hashed"): {"role": "admin", "name": "ann"}})
    (warning,) = [record.getMessage() for record in caplog.records]
    viewer = principal_name("prod-clear-2", Role.VIEWER)
    assert f"holds 2 token(s) in clear (bob, {viewer})" in warning and "shipyard tokens hash" in warning
    assert "prod-clear" not in warning and "ann" not in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shipyard.settings"):
        PlatformSettings(env="prod", tokens={hash_token("prod-hashed"): {"role": "admin", "name": "ann"}})
        PlatformSettings(env="test", tokens={"test-clear": "viewer"})
    assert caplog.records == []


def test_a_child_process_is_handed_hashes_only(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("child-secret-5")
    settings = PlatformSettings(env="test", state_dir=tmp_path,
                                tokens={"eve": {"role": "trainer", "file": str(secret)}, "t-clear": "viewer"})
    env = settings.as_env()
    assert "child-secret-5" not in env["SHIPYARD_TOKENS"] and "t-clear" not in env["SHIPYARD_TOKENS"]
    old = dict(os.environ)
    try:
        os.environ.update(env)
        again = PlatformSettings()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert again.tokens == settings.tokens and again.tokens.clear == ()
    assert TokenAuthenticator(again.tokens).authenticate("Bearer child-secret-5").name == "eve"


def test_the_rate_limit_knows_holders_of_hashed_tokens() -> None:
    table = TokenTable.from_config({hash_token("rl-token"): Grant(role=Role.VIEWER, name="rita")})
    limit = RateLimit(None, rate=1, burst=1, tokens=table)  # type: ignore[arg-type]
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer rl-token")], "client": ("10.0.0.1", 1)}
    assert limit.caller(scope) == "principal:rita"
    scope["headers"] = [(b"authorization", f"Bearer {hash_token('rl-token')}".encode())]
    assert limit.caller(scope) == "address:10.0.0.1"


def test_shipyard_tokens_hash_reads_stdin_and_prints_the_hash_or_the_entry() -> None:
    runner = CliRunner()
    printed = runner.invoke(cli, ["tokens", "hash"], input="my-token\n")
    assert printed.exit_code == 0 and printed.stdout.strip() == hash_token("my-token")
    entry = runner.invoke(cli, ["tokens", "hash", "--role", "trainer", "--name", "alice"], input="my-token\n")
    assert json.loads(entry.stdout) == {hash_token("my-token"): {"role": "trainer", "name": "alice"}}
    table = PlatformSettings(env="test", tokens=json.loads(entry.stdout)).tokens
    assert TokenAuthenticator(table).authenticate("Bearer my-token").name == "alice"
    for args, stdin, problem in [([], "", "no token on standard input"),
                                 ([], "a\nb\n", "more than one line"),
                                 (["--role", "trainer", "--name", "my-t"], "my-token", "shares 4 or more"),
                                 (["--name", "alice"], "my-token", "--name needs --role")]:
        refused = runner.invoke(cli, ["tokens", "hash", *args], input=stdin)
        assert refused.exit_code == 1 and problem in refused.stdout, refused.stdout
    made = runner.invoke(cli, ["tokens", "new", "--role", "approver", "--name", "bob"])
    assert made.exit_code == 0
    token = made.stderr.rsplit(" ", 1)[-1].strip()
    (key, grant), = json.loads(made.stdout).items()
    assert key == hash_token(token) and grant == {"role": "approver", "name": "bob"} and len(token) >= 43
