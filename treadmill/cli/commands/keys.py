"""``tml key``: a user's SSH public keys, which jobs carry to their hosts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from treadmill.cli import output
from treadmill.cli.context import CommandError, Context, add_command, add_group

MAX_KEY_FILE = 16 * 1024


def render_keys(data: dict[str, Any]) -> str:
    """``{"keys": [SshKey]}`` as a table."""
    rows = [(k.get("id"), k.get("user"), k.get("type"), k.get("fingerprint"),
             k.get("comment") or None, output.fmt_time(k.get("created_at")))
            for k in data.get("keys", [])]
    return output.render_table(("ID", "USER", "TYPE", "FINGERPRINT", "COMMENT", "CREATED"), rows)


def _read_key(path: str) -> str:
    """The one key line of an OpenSSH ``.pub`` file (refusing a private key)."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise CommandError(f"{path} is too large for a public key")
    text = data.decode("utf-8-sig", "replace")  # -sig: without a BOM (Windows editors)
    if "PRIVATE KEY" in text:
        raise CommandError(f"{path} is a private key: give the .pub file")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise CommandError(f"{path} must hold exactly one public key line")
    return lines[0].strip()


async def key_add(ctx: Context) -> int:
    """Register the public key in ``PATH``."""
    key = await ctx.api.request("POST", ("keys",), params={"user": ctx.args.user},
                                body={"key": _read_key(ctx.args.path)})
    return ctx.emit(key, lambda k: f"added {output.clean(k['fingerprint'])} "
                                   f"({output.clean(k['type'])}) as {k['id']}\n")


async def key_ls(ctx: Context) -> int:
    data = await ctx.api.get("keys", params={"user": ctx.args.user})
    return ctx.emit(data, render_keys)


async def key_rm(ctx: Context) -> int:
    key = await ctx.api.delete("keys", ctx.args.id)
    return ctx.emit(key, lambda k: f"removed {output.clean(k['fingerprint'])}\n")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``key add``, ``key ls`` and ``key rm``."""
    keys = add_group(sub, "key", help="manage your SSH public keys (jobs carry them to guests)")
    p = add_command(keys, "add", key_add, common, help="register an SSH public key (a .pub file)")
    p.add_argument("path", metavar="PATH.pub", help="an OpenSSH public key file")
    p.add_argument("--user", help="for another user (admins only)")
    p = add_command(keys, "ls", key_ls, common, help="list SSH public keys")
    p.add_argument("--user", help="another user's keys (admins only)")
    p = add_command(keys, "rm", key_rm, common, help="remove an SSH public key")
    p.add_argument("id", metavar="ID", help="key id (from tml key ls)")
