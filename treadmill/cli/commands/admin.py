"""``tml admin``: users, hosts and tokens, for administrators."""

from __future__ import annotations

import argparse
from typing import Any

from treadmill.cli.commands.hosts import HOST_FIELDS
from treadmill.cli.commands.identity import (
    add_expiry_options,
    create_token,
    print_secret,
    render_user,
    render_users,
)
from treadmill.cli.context import Context, UsageError, add_command, add_group


async def user_ls(ctx: Context) -> int:
    """List users."""
    return ctx.emit(await ctx.api.get("users"), lambda d: render_users(d.get("users", [])))


async def user_add(ctx: Context) -> int:
    """Create a user."""
    body: dict[str, Any] = {"name": ctx.args.name, "admin": ctx.args.admin}
    if ctx.args.password_stdin:
        body["password"] = ctx.read_password_stdin()
    return ctx.emit(await ctx.api.post("users", body=body), render_user)


async def user_show(ctx: Context) -> int:
    """Show a user."""
    return ctx.emit(await ctx.api.get("users", ctx.args.name), render_user)


async def user_set(ctx: Context) -> int:
    """Change a user's admin flag, disabled flag or password."""
    args = ctx.args
    body: dict[str, Any] = {}
    if args.admin is not None:
        body["admin"] = args.admin
    if args.disabled is not None:
        body["disabled"] = args.disabled
    if args.password_stdin:
        body["password"] = ctx.read_password_stdin()
    if not body:
        raise UsageError(
            "nothing to change: give --admin, --no-admin, --disable, --enable or --password-stdin"
        )
    return ctx.emit(await ctx.api.patch("users", args.name, body=body), render_user)


async def host_add(ctx: Context) -> int:
    """Register a host and show its supervisor token once."""
    args = ctx.args
    body: dict[str, Any] = {"name": args.name}
    if args.tags:
        body["tags"] = list(args.tags)
    if args.owner is not None:
        body["owner"] = args.owner
    if args.description is not None:
        body["description"] = args.description
    host = await ctx.api.post("hosts", body=body)
    return print_secret(ctx, host, HOST_FIELDS, "host token for the supervisor's configuration")


async def host_token(ctx: Context) -> int:
    """Give a host a new token (the old one stops working) and show it once."""
    host = await ctx.api.post("hosts", ctx.args.name, "token")
    return print_secret(ctx, host, HOST_FIELDS, "host token for the supervisor's configuration")


async def host_rm(ctx: Context) -> int:
    """Delete a host."""
    await ctx.api.delete("hosts", ctx.args.name)
    return ctx.emit({"deleted": ctx.args.name}, lambda _: f"removed host {ctx.args.name}\n")


async def token_create(ctx: Context) -> int:
    """Create a token for a user."""
    return await create_token(ctx, ctx.args.user)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``admin``."""
    admin = add_group(sub, "admin", help="administration: users, hosts, tokens")

    users = add_group(admin, "user", help="manage users")
    add_command(users, "ls", user_ls, common, help="list users")
    p = add_command(users, "add", user_add, common, help="create a user")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--admin", action="store_true", help="make the user an administrator")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read a password from standard input (else the user logs in with tokens only)",
    )
    p = add_command(users, "show", user_show, common, help="show a user")
    p.add_argument("name", metavar="NAME")
    p = add_command(users, "set", user_set, common, help="change a user")
    p.add_argument("name", metavar="NAME")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--admin", dest="admin", action="store_const", const=True, default=None)
    g.add_argument("--no-admin", dest="admin", action="store_const", const=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--disable", dest="disabled", action="store_const", const=True, default=None)
    g.add_argument("--enable", dest="disabled", action="store_const", const=False)
    p.add_argument(
        "--password-stdin", action="store_true", help="set the password read from standard input"
    )

    hosts = add_group(admin, "host", help="register and remove hosts")
    p = add_command(hosts, "add", host_add, common, help="register a host; shows its token once")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--tag", dest="tags", action="append", default=[], metavar="TAG", help="a tag (repeat)"
    )
    p.add_argument("--owner", metavar="USER", help="the owning user")
    p.add_argument("--description", metavar="TEXT")
    p = add_command(
        hosts, "token", host_token, common, help="replace a host's token; shows it once"
    )
    p.add_argument("name", metavar="NAME")
    p = add_command(hosts, "rm", host_rm, common, help="delete a host")
    p.add_argument("name", metavar="NAME")

    tokens = add_group(admin, "token", help="tokens for other users")
    p = add_command(tokens, "create", token_create, common, help="create a token for a user")
    p.add_argument("--user", required=True, metavar="USER")
    p.add_argument("--label", help="a label to recognise the token by")
    add_expiry_options(p)
