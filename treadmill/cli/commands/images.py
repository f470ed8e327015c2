"""``tml image``: the switchboard's image catalogue."""

from __future__ import annotations

import argparse
from typing import Any

from treadmill.cli import output
from treadmill.cli.context import Context, UsageError, add_command, add_group

IMAGE_FIELDS = ("name", "digest", "stores", "owner", "description", "created_at", "updated_at")


def short_digest(digest: str | None) -> str | None:
    """``sha256:`` and the first 12 hex digits."""
    if digest and digest.startswith("sha256:") and len(digest) > 19:
        return digest[:19]
    return digest


def render_image(image: dict[str, Any]) -> str:
    """An ``Image`` as ``key: value`` lines."""
    return output.render_object(image, IMAGE_FIELDS)


def render_images(data: dict[str, Any]) -> str:
    """``{"images": [Image]}`` as a table."""
    rows = [
        (
            i.get("name"),
            short_digest(i.get("digest")),
            i.get("owner"),
            output.fmt_time(i.get("updated_at")),
            i.get("description") or None,
        )
        for i in data.get("images", [])
    ]
    return output.render_table(("NAME", "DIGEST", "OWNER", "UPDATED", "DESCRIPTION"), rows)


async def image_register(ctx: Context) -> int:
    """Add an image to the catalogue."""
    a = ctx.args
    body: dict[str, Any] = {"name": a.name, "digest": a.digest, "stores": a.stores}
    if a.description is not None:
        body["description"] = a.description
    return ctx.emit(await ctx.api.post("images", body=body), render_image)


async def image_update(ctx: Context) -> int:
    """Point an image name at another digest, other stores or a new description."""
    a = ctx.args
    body: dict[str, Any] = {}
    if a.digest is not None:
        body["digest"] = a.digest
    if a.stores:
        body["stores"] = a.stores
    if a.description is not None:
        body["description"] = a.description
    if not body:
        raise UsageError("nothing to change: give --digest, --store or --description")
    return ctx.emit(await ctx.api.put("images", a.name, body=body), render_image)


async def image_ls(ctx: Context) -> int:
    """List the images the user may use."""
    return ctx.emit(await ctx.api.get("images"), render_images)


async def image_show(ctx: Context) -> int:
    """Show an image."""
    return ctx.emit(await ctx.api.get("images", ctx.args.name), render_image)


async def image_rm(ctx: Context) -> int:
    """Remove an image from the catalogue (the stores keep its bytes)."""
    await ctx.api.delete("images", ctx.args.name)
    return ctx.emit({"deleted": ctx.args.name}, lambda _: f"removed image {ctx.args.name}\n")


def _store_option(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--store",
        dest="stores",
        action="append",
        required=required,
        default=[],
        metavar="URL",
        help="an image store holding the image (repeat for several)",
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``image``."""
    image = add_group(sub, "image", help="the image catalogue")
    p = add_command(image, "register", image_register, common, help="add an image")
    p.add_argument("name", metavar="NAME")
    p.add_argument("digest", metavar="DIGEST", help="sha256:<64 hex digits>")
    _store_option(p, required=True)
    p.add_argument("--description", metavar="TEXT")
    p = add_command(image, "update", image_update, common, help="change an image")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--digest", metavar="DIGEST")
    _store_option(p, required=False)
    p.add_argument("--description", metavar="TEXT")
    add_command(image, "ls", image_ls, common, help="list images")
    p = add_command(image, "show", image_show, common, help="show an image")
    p.add_argument("name", metavar="NAME")
    p = add_command(image, "rm", image_rm, common, help="remove an image from the catalogue")
    p.add_argument("name", metavar="NAME")
