"""``tml admin``: users, hosts, tokens and image stores, for administrators."""

from __future__ import annotations

import argparse
from typing import Any

from treadmill.cli import output
from treadmill.cli.commands.hosts import HOST_FIELDS
from treadmill.cli.commands.identity import (
    add_expiry_options,
    create_token,
    print_secret,
    render_user,
    render_users,
)
from treadmill.cli.context import Context, UsageError, add_command, add_group, add_tag_option

STORE_FIELDS = ("url", "service", "cache", "description", "created_at")


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


def render_stores(data: dict[str, Any]) -> str:
    """``{"stores": [ImageStore]}`` as a table."""
    rows = [(s.get("url"), s.get("service"), "cache" if s.get("cache") else "store",
             s.get("description") or None) for s in data.get("stores", [])]
    return output.render_table(("URL", "SERVICE", "KIND", "DESCRIPTION"), rows)


async def store_ls(ctx: Context) -> int:
    """List the registered image stores (any user may)."""
    return ctx.emit(await ctx.api.get("stores"), render_stores)


async def store_add(ctx: Context) -> int:
    """Register an image store (or a site cache) by URL and service name."""
    args = ctx.args
    body: dict[str, Any] = {"url": args.store_url, "service": args.service,
                            "cache": args.cache}
    if args.description is not None:
        body["description"] = args.description
    return ctx.emit(await ctx.api.post("stores", body=body),
                    lambda d: output.render_object(d, STORE_FIELDS))


async def store_rm(ctx: Context) -> int:
    """Unregister an image store, named by its service name or its URL."""
    service = ctx.args.store
    if "://" in service:
        wanted = service.rstrip("/").lower()
        stores = (await ctx.api.get("stores")).get("stores", [])
        found = [s["service"] for s in stores if s["url"].lower() == wanted]
        if not found:
            raise UsageError(f"no image store is registered at {service}")
        service = found[0]
    await ctx.api.delete("stores", service)
    return ctx.emit({"deleted": service}, lambda _: f"unregistered image store {service}\n")


async def token_create(ctx: Context) -> int:
    """Create a token for a user."""
    return await create_token(ctx, ctx.args.user)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``admin``."""
    admin = add_group(sub, "admin", help="administration: users, hosts, tokens, image stores")

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
    add_tag_option(p, "a tag (repeat)")
    p.add_argument("--owner", metavar="USER", help="the owning user")
    p.add_argument("--description", metavar="TEXT")
    p = add_command(
        hosts, "token", host_token, common, help="replace a host's token; shows it once"
    )
    p.add_argument("name", metavar="NAME")
    p = add_command(hosts, "rm", host_rm, common, help="delete a host")
    p.add_argument("name", metavar="NAME")

    stores = add_group(admin, "store", help="register and remove image stores")
    add_command(stores, "ls", store_ls, common, help="list the registered image stores")
    p = add_command(stores, "add", store_add, common,
                    help="register an image store or a site cache")
    p.add_argument("store_url", metavar="URL",
                   help="its base URL, http(s)://HOST[:PORT][/PREFIX]")
    p.add_argument("service", metavar="SERVICE",
                   help="its service name (the store's `service` setting: token audience)")
    p.add_argument("--cache", action="store_true", help="it is a site image cache")
    p.add_argument("--description", metavar="TEXT")
    p = add_command(stores, "rm", store_rm, common, help="unregister an image store")
    p.add_argument("store", metavar="SERVICE|URL")

    tokens = add_group(admin, "token", help="tokens for other users")
    p = add_command(tokens, "create", token_create, common, help="create a token for a user")
    p.add_argument("--user", required=True, metavar="USER")
    p.add_argument("--label", help="a label to recognise the token by")
    add_expiry_options(p)
