"""``tml login``, ``tml whoami`` and ``tml token``."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from treadmill.cli import output
from treadmill.cli.config import load_file, save_file
from treadmill.cli.context import (
    EXIT_OK,
    CommandError,
    Context,
    UsageError,
    add_command,
    add_group,
    duration,
)

USER_FIELDS = ("name", "admin", "disabled", "created_at")
TOKEN_FIELDS = ("id", "user", "label", "created_at", "expires_at", "last_used_at", "revoked_at")


def render_user(user: dict[str, Any]) -> str:
    """A ``User`` as ``key: value`` lines."""
    return output.render_object(user, USER_FIELDS)


def render_users(users: list[dict[str, Any]]) -> str:
    """``User`` objects as a table."""
    rows = [
        (u.get("name"), u.get("admin"), u.get("disabled"), output.fmt_time(u.get("created_at")))
        for u in users
    ]
    return output.render_table(("NAME", "ADMIN", "DISABLED", "CREATED"), rows)


def add_expiry_options(parser: argparse.ArgumentParser) -> None:
    """``--expires-in`` and ``--no-expiry`` (admins only)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--expires-in",
        type=duration,
        metavar="SECONDS",
        help="lifetime in seconds, or with a unit: 12h, 30d (default: the switchboard's)",
    )
    group.add_argument(
        "--no-expiry", action="store_true", help="a token that never expires (admins only)"
    )


def expiry_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``expires_in`` part of a token request."""
    if args.no_expiry:
        return {"expires_in": None}
    if args.expires_in is not None:
        return {"expires_in": args.expires_in}
    return {}


def print_secret(ctx: Context, obj: dict[str, Any], order: tuple[str, ...], what: str) -> int:
    """Show an object that carries a new secret in ``token``, once."""
    if ctx.json:
        output.print_json(ctx.stdout, obj)
        return EXIT_OK
    shown = {k: v for k, v in obj.items() if k != "token"}
    shown["token"] = obj.get("token")  # last, where it is easy to find
    ctx.write(output.render_object(shown, order))
    ctx.note(f"Save the {what} now: it is not shown again.")
    return EXIT_OK


async def create_token(ctx: Context, user: str | None) -> int:
    """``POST /tokens`` and show the new secret."""
    args = ctx.args
    body: dict[str, Any] = expiry_body(args)
    if args.label is not None:
        body["label"] = args.label
    if user is not None:
        body["user"] = user
    new = await ctx.api.post("tokens", body=body)
    return print_secret(ctx, new, TOKEN_FIELDS, "token")


async def login(ctx: Context) -> int:
    """Log in with a password and store the new token in the configuration file."""
    args = ctx.args
    user = args.user
    if args.password_stdin:
        if not user:
            raise UsageError("--user is required with --password-stdin")
        password = ctx.read_password_stdin()
    else:
        if not user:
            ctx.stderr.write("User: ")
            ctx.stderr.flush()
            user = ctx.stdin.readline().strip()
            if not user:
                raise UsageError("no user name given")
        try:
            password = ctx.blocking(ctx.prompt_password,
                                    f"Password for {user} at {ctx.settings.url}: ")
        except (EOFError, KeyboardInterrupt):
            ctx.stderr.write("\n")
            raise CommandError("login cancelled") from None
    label = args.label if args.label is not None else f"tml on {socket.gethostname()}"[:256]
    body: dict[str, Any] = {"user": user, "password": password, "label": label}
    body.update(expiry_body(args))
    new = await ctx.api.post("login", body=body, auth=False)
    if not isinstance(new, dict) or not isinstance(new.get("token"), str):
        raise CommandError("the switchboard's login response has no token")

    path = ctx.settings.config_path
    data = load_file(path)
    data["url"] = ctx.settings.url
    data["token"] = new["token"]
    if ctx.settings.ca_file:
        data["ca_file"] = ctx.settings.ca_file
    save_file(path, data)

    shown = {k: v for k, v in new.items() if k != "token"}
    if ctx.json:
        output.print_json(ctx.stdout, shown)
    else:
        expiry = output.fmt_time(new["expires_at"]) if new.get("expires_at") else "never"
        ctx.write(
            f"Logged in to {ctx.settings.url} as {output.clean(str(new.get('user', user)))}; "
            f"token {new.get('id')} saved in {path} (expires {expiry}).\n"
        )
    return EXIT_OK


async def whoami(ctx: Context) -> int:
    """Show the user the token belongs to."""
    user = await ctx.api.get("whoami")
    return ctx.emit(
        user, lambda u: output.render_object({**u, "url": ctx.settings.url}, USER_FIELDS)
    )


def render_tokens(data: dict[str, Any]) -> str:
    """``{"tokens": [Token]}`` as a table."""
    rows = [
        (
            t.get("id"),
            t.get("user"),
            t.get("label") or None,
            output.fmt_time(t.get("created_at")),
            output.fmt_time(t.get("expires_at")) if t.get("expires_at") else "never",
            output.fmt_time(t.get("last_used_at")),
            output.fmt_time(t.get("revoked_at")),
        )
        for t in data.get("tokens", [])
    ]
    headers = ("ID", "USER", "LABEL", "CREATED", "EXPIRES", "LAST USED", "REVOKED")
    return output.render_table(headers, rows)


async def token_ls(ctx: Context) -> int:
    """List API tokens."""
    data = await ctx.api.get("tokens", params={"user": ctx.args.user})
    return ctx.emit(data, render_tokens)


async def token_create(ctx: Context) -> int:
    """Create an API token."""
    return await create_token(ctx, ctx.args.user)


async def token_revoke(ctx: Context) -> int:
    """Revoke an API token."""
    token = await ctx.api.delete("tokens", ctx.args.id)
    return ctx.emit(token, lambda t: f"revoked token {ctx.args.id}\n")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``login``, ``whoami`` and ``token``."""
    p = add_command(sub, "login", login, common, help="log in with a password and save a token")
    p.add_argument("--user", help="user name (prompted for if not given)")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    p.add_argument("--label", help="label of the new token (default: 'tml on HOSTNAME')")
    add_expiry_options(p)

    add_command(sub, "whoami", whoami, common, help="show who the token belongs to")

    tok = add_group(sub, "token", help="manage API tokens")
    p = add_command(tok, "ls", token_ls, common, help="list tokens")
    p.add_argument("--user", help="another user's tokens (admins only)")
    p = add_command(tok, "create", token_create, common, help="create a token; shows it once")
    p.add_argument("--label", help="a label to recognise the token by")
    p.add_argument("--user", help="create it for another user (admins only)")
    add_expiry_options(p)
    p = add_command(tok, "revoke", token_revoke, common, help="revoke a token")
    p.add_argument("id", metavar="ID", help="token id")
