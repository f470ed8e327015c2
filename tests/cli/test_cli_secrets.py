"""``tml`` keeps secrets out of argv: tokens and secret parameters from files,
standard input or the environment, against the real switchboard."""

from __future__ import annotations

import json

import pytest_twisted

from tests.cli.support import DIGEST


async def stored_parameters(switchboard, job_id: str) -> dict:
    row = await switchboard.store.pool.fetchone(
        "SELECT parameters FROM jobs WHERE id = %s", (job_id,))
    return row["parameters"]


@pytest_twisted.ensureDeferred
async def test_token_file_and_the_warning_of_token(tml, switchboard, tmp_path):
    env = {"HOME": str(tmp_path), "TREADMILL_URL": switchboard.url}
    token_file = tmp_path / "token"
    token_file.write_text(switchboard.admin_token + "\n")
    r = await tml("whoami", "--json", "--token-file", str(token_file), env=env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["name"] == "admin" and r.err == ""
    # After the command too, like every connection option.
    r = await tml("whoami", "--token-file", str(token_file), env=env)
    assert r.status == 0 and "admin" in r.out

    r = await tml("whoami", "--token", switchboard.admin_token, env=env)
    assert r.status == 0, r.err
    assert "warning: --token puts the token on the command line" in r.err
    assert switchboard.admin_token not in r.err

    for bad, message in ((tmp_path / "absent", "No such file"), (tmp_path, "Is a directory")):
        r = await tml("whoami", "--token-file", str(bad), env=env)
        assert r.status == 1 and message in r.err, r.err
    (tmp_path / "empty").write_text("\n")
    r = await tml("whoami", "--token-file", str(tmp_path / "empty"), env=env)
    assert r.status == 1 and "empty" in r.err


@pytest_twisted.ensureDeferred
async def test_secret_params_from_file_stdin_and_environment(tml, switchboard, tmp_path):
    env = {**switchboard.tml_env(tmp_path), "FROM_ENV": "env-secret",
           "OTHER_VAR": "renamed-secret"}
    secret_file = tmp_path / "key"
    secret_file.write_text("file-secret\n")
    r = await tml("job", "submit", DIGEST, "--tag", "nowhere",
                  "--secret-param", f"A=@{secret_file}", "--secret-param", "B=-",
                  "--secret-param", "FROM_ENV", "--secret-param-env", "C=OTHER_VAR",
                  "--param", "PLAIN=visible", env=env, stdin="stdin-secret\n")
    assert r.status == 0, r.err
    assert r.err == ""  # No secret was on the command line: no warning.
    job_id = r.out.split()[0]
    assert await stored_parameters(switchboard, job_id) == {
        "A": {"value": "file-secret", "secret": True},
        "B": {"value": "stdin-secret", "secret": True},
        "FROM_ENV": {"value": "env-secret", "secret": True},
        "C": {"value": "renamed-secret", "secret": True},
        "PLAIN": {"value": "visible", "secret": False},
    }

    # The inline form still works, with a warning that does not repeat the value.
    r = await tml("job", "submit", DIGEST, "--tag", "nowhere", "--secret-param", "D=inline-x",
                  env=env)
    assert r.status == 0, r.err
    assert "--secret-param D=VALUE puts the secret on the command line" in r.err
    assert "inline-x" not in r.err

    for argv, message in (
            (["--secret-param", f"A=@{tmp_path / 'absent'}"], "No such file"),
            (["--secret-param", "A=-", "--secret-param", "B=-"], "only one value"),
            (["--secret-param-env", "A=UNSET_VAR"], "no environment variable UNSET_VAR"),
            (["--secret-param-env", "FROM_ENV=OTHER_VAR", "--secret-param", "FROM_ENV"],
             "given twice")):
        r = await tml("job", "submit", DIGEST, "--tag", "nowhere", *argv, env=env, stdin="x")
        assert r.status == 2 and message in r.err, (argv, r.err)
