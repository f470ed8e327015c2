"""``tml image``: the switchboard's image catalogue, and pushing and pulling images.

``push`` and ``pull`` talk to image stores with the OCI client of
:mod:`treadmill.images.oci`; the image format is
:mod:`treadmill.images.format` (``docs/images.md``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from treadmill.cli import output
from treadmill.cli.client import ApiError
from treadmill.cli.commands import results as results_command
from treadmill.cli.context import (
    CommandError,
    Context,
    UsageError,
    add_command,
    add_group,
    name_value,
    positive_int,
)
from treadmill.images import format as fmt
from treadmill.images.oci import (
    DEFAULT_CHUNK_SIZE,
    BlobSource,
    RegistryClient,
    RegistryError,
    canonical_store_url,
    check_store_url,
    file_blob,
    parse_reference,
    repository_of,
)
from treadmill.images.progress import ProgressBar, human_size

IMAGE_FIELDS = ("name", "digest", "kind", "stores", "owner", "description", "created_at",
                "updated_at")


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


def _described(a: Any) -> dict[str, Any]:
    """The optional ``description``, ``host_tags`` and ``results`` the arguments give."""
    body: dict[str, Any] = {}
    if a.description is not None:
        body["description"] = a.description
    if a.host_tags is not None:
        body["host_tags"] = a.host_tags
    if (patterns := results_command.patterns_from(a)) is not None:
        body["results"] = patterns
    return body


async def image_register(ctx: Context) -> int:
    """Add an image to the catalogue."""
    a = ctx.args
    body: dict[str, Any] = {"name": a.name, "digest": a.digest, "stores": a.stores,
                            **_described(a)}
    if not a.replace and await _exists(ctx, a.name):
        raise CommandError(_taken(a.name))
    kind = a.kind or await _kind_in_store(ctx, a.name, a.digest, a.stores[0])
    if kind is not None:
        body["kind"] = kind
    return ctx.emit(await _register(ctx, body, a.replace), render_image)


def _taken(name: str) -> str:
    return (f"image {name} exists; give --replace to point it at the new digest (the "
            f"current one stays in its history: tml image history {name})")


async def _exists(ctx: Context, name: str) -> bool:
    """Whether the catalogue has ``name`` (that the user may see)."""
    try:
        await ctx.api.get("images", name)
    except ApiError as e:
        if e.status == 404:
            return False
        raise
    return True


async def _register(ctx: Context, body: dict[str, Any], replace: bool) -> Any:
    """Create the catalogue entry; an existing name is replaced only with ``replace``
    (``PUT``: the previous digest becomes a version in its history)."""
    try:
        return await ctx.api.post("images", body=body)
    except ApiError as e:
        if e.status != 409:
            raise
        if not replace:
            raise CommandError(_taken(body["name"])) from None
    update = {key: value for key, value in body.items() if key != "name"}
    return await ctx.api.put("images", body["name"], body=update)


def render_history(data: dict[str, Any]) -> str:
    """``{"versions": [ImageVersion]}`` as a table, newest first; * marks the current."""
    rows = [
        (
            ("*" if v.get("digest") == data.get("current") and i == 0 else "")
            + str(v.get("version")),
            short_digest(v.get("digest")),
            v.get("kind"),
            v.get("by"),
            output.fmt_time(v.get("created_at")),
            v.get("note") or None,
        )
        for i, v in enumerate(data.get("versions", []))
    ]
    return output.render_table(("VERSION", "DIGEST", "KIND", "BY", "AT", "NOTE"), rows)


async def image_history(ctx: Context) -> int:
    """List an image's versions, newest first."""
    return ctx.emit(await ctx.api.get("images", ctx.args.name, "history"), render_history)


async def image_rollback(ctx: Context) -> int:
    """Make an earlier version of an image current again (recorded as a new version)."""
    a = ctx.args
    image = await ctx.api.post("images", a.name, "rollback", body={"version": a.version})
    return ctx.emit(image, render_image)


async def _kind_in_store(ctx: Context, name: str, digest: str, store: str) -> str | None:
    """The kind of image ``digest`` as its manifest in ``store`` says (``docs/images.md``);
    None, with a note, when the store cannot tell (then any host may run its jobs)."""
    try:
        client = _registry(ctx, store, await _registered_service(ctx, store),
                           _Reporter(ctx, False))
    except (CommandError, UsageError) as e:
        ctx.note(f"tml: {e}; registering without a kind (give --kind)")
        return None
    try:
        manifest = await client.get_manifest(_repository(ctx, name), digest, retries=1)
        loaded = fmt.load_manifest(manifest.data)
        if not fmt.is_treadmill_manifest(loaded, manifest.media_type):
            ctx.note("tml: not a Treadmill image; registering without a kind")
            return None
        return fmt.parse_image(loaded, manifest.media_type).kind
    except (RegistryError, fmt.ManifestError) as e:
        ctx.note(f"tml: could not read the image's kind from {store} ({e}); registering "
                 "without a kind (give --kind)")
        return None
    finally:
        await client.close()


async def image_update(ctx: Context) -> int:
    """Point an image name at another digest, other stores or a new description."""
    a = ctx.args
    body: dict[str, Any] = {}
    if a.digest is not None:
        body["digest"] = a.digest
    if a.stores:
        body["stores"] = a.stores
    body.update(_described(a))
    if a.no_results_patterns:
        body["results"] = None
    if a.kind is not None:
        body["kind"] = a.kind
    if not body:
        raise UsageError("nothing to change: give --digest, --store, --description, "
                         "--host-tag or --kind")
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


# -- push and pull ------------------------------------------------------------------

QCOW2_MAGIC = b"QFI\xfb"
RETRIES = 5
PUSH_FIELDS = ("name", "repository", "tag", "digest", "store", "registered")


class _Reporter:
    """Progress bars on stderr (one per blob) and notes that do not garble them."""

    def __init__(self, ctx: Context, enabled: bool) -> None:
        self.ctx = ctx
        self.enabled = enabled
        self.current: ProgressBar | None = None

    def bar(self, label: str, total: int) -> ProgressBar:
        self.done()
        self.current = ProgressBar(self.ctx.stderr, label, total, enabled=self.enabled)
        return self.current

    def note(self, text: str) -> None:
        if self.current is not None:
            self.current.message(text)
        else:
            self.ctx.note(text)

    def done(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.current = None


def _progress_enabled(ctx: Context) -> bool:
    if ctx.args.progress:
        return True
    isatty = getattr(ctx.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:
        return False


def _repository(ctx: Context, name: str) -> str:
    given = ctx.args.repository
    try:
        return repository_of(given if given else name)
    except ValueError as e:
        raise UsageError(f"{e}; give --repository" if not given else str(e)) from None


async def _registered_service(ctx: Context, store: str,
                              cache: dict[str, str] | None = None) -> str:
    """The service name the switchboard registered ``store`` with; :class:`CommandError`
    if it is not registered (then nothing, not even a request, goes to it)."""
    found = cache if cache else None
    if found is None:
        listed = (await ctx.api.get("stores")).get("stores", [])
        found = {str(s["url"]): str(s["service"]) for s in listed}
        if cache is not None:
            cache.update(found)
    try:
        key = canonical_store_url(store)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if key not in found:
        raise CommandError(f"image store {store} is not registered with the switchboard "
                           "(tml admin store ls); nothing was sent to it")
    return found[key]


def _registry(ctx: Context, store: str, service: str, reporter: _Reporter) -> RegistryClient:
    """A client for the registered ``store``: tokens are asked of the switchboard only, for
    ``service`` only, and the API token is offered to the switchboard only."""
    settings = ctx.settings
    credentials: Callable[[], Awaitable[tuple[str, str]]] | None = None
    if settings.token:
        token = settings.token

        async def credentials() -> tuple[str, str]:
            me = await ctx.api.get("whoami")
            return str(me["name"]), token

    try:
        return RegistryClient(
            ctx.reactor,
            store,
            ca_file=settings.ca_file,
            credentials=credentials,
            service=service,
            realm=settings.url.rstrip("/") + "/api/v1/registry/token",
            retries=RETRIES,
            chunk_size=getattr(ctx.args, "chunk_size", None) or DEFAULT_CHUNK_SIZE,
            on_retry=lambda text: reporter.note(f"tml: {output.clean(text)}"),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _store_failure(store: str, e: RegistryError) -> str:
    message = f"image store {store}: {output.clean(e.message)}"
    if e.status in (401, 403):
        message += (" (you may push only to repositories under your user name, like "
                    "'USER/NAME', or in a namespace an admin granted you; top-level names "
                    "are for admins; you may pull images you may use)")
    return message


def _firmware_arg(text: str) -> tuple[str, str | None]:
    """``FILE[:TARGET]``: the whole text if such a file exists, else split at the first ':'."""
    if os.path.exists(text) or ":" not in text:
        return text, None
    path, _, target = text.partition(":")
    return path, target


def _flash_arg(text: str | None) -> Any:
    if text is None:
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise UsageError(f"--flash-json: {e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"--flash-json: not JSON ({e})") from None


def _check_file(path: str, qcow2: bool = False) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory")
    if qcow2 and head != QCOW2_MAGIC:
        raise CommandError(f"{path}: not a qcow2 image")


async def image_push(ctx: Context) -> int:
    """Upload an image's blobs and manifest to a store, then register it in the catalogue."""
    a = ctx.args
    try:
        name, tag = parse_reference(a.name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    repo = _repository(ctx, name)
    qemu_options = a.kernel or a.initrd or a.cmdline is not None or a.qemu_firmware
    if a.qcow2 and a.firmware:
        raise UsageError("an image is either QEMU (--qcow2) or board (--firmware), not both")
    if not a.qcow2 and not a.firmware:
        raise UsageError("give --qcow2 FILE (QEMU image) or --firmware FILE (board image)")
    if a.firmware and qemu_options:
        raise UsageError("--kernel, --initrd, --cmdline and --qemu-firmware are for QEMU images")
    if a.qcow2 and a.flash_json is not None:
        raise UsageError("--flash-json is for board images")
    flash = _flash_arg(a.flash_json)
    annotations = dict(a.annotations)

    # (role, file) in manifest order; files are checked and hashed before anything is sent.
    files: list[tuple[str, str]] = [(f"disk-{i}", p) for i, p in enumerate(a.qcow2)]
    for role, path in (("kernel", a.kernel), ("initrd", a.initrd),
                       ("qemu-firmware", a.qemu_firmware)):
        if path:
            files.append((role, path))
    firmware = [_firmware_arg(text) for text in a.firmware]
    files += [(f"firmware {os.path.basename(p)}", p) for p, _ in firmware]
    try:
        store = check_store_url(a.store)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for role, path in files:
        _check_file(path, qcow2=role.startswith("disk-"))
    if not a.no_register and not a.replace and await _exists(ctx, name):
        raise CommandError(_taken(name) + "; nothing was uploaded")
    reporter = _Reporter(ctx, _progress_enabled(ctx))
    blobs: dict[str, fmt.Blob] = {}
    for _, path in files:
        if path not in blobs:
            if reporter.enabled and os.path.getsize(path) >= 64 * 1024 * 1024:
                ctx.note(f"hashing {path}")
            try:
                blobs[path] = await file_blob(ctx.reactor, path)
            except OSError as e:
                raise CommandError(f"{path}: {e.strerror or e}") from None
    try:
        if a.qcow2:
            manifest = fmt.build_qemu_manifest(
                [blobs[p] for p in a.qcow2],
                kernel=blobs.get(a.kernel) if a.kernel else None,
                initrd=blobs.get(a.initrd) if a.initrd else None,
                cmdline=a.cmdline,
                firmware=blobs.get(a.qemu_firmware) if a.qemu_firmware else None,
                annotations=annotations,
            )
        else:
            manifest = fmt.build_board_manifest(
                [fmt.FirmwareFile(os.path.basename(p), blobs[p], target) for p, target in firmware],
                flash=flash,
                annotations=annotations,
            )
    except fmt.ManifestError as e:
        raise CommandError(f"invalid image: {e.message}") from None
    data = fmt.manifest_bytes(manifest)

    client = _registry(ctx, store, await _registered_service(ctx, store), reporter)
    pushed: list[dict[str, Any]] = []
    try:
        await client.push_blob(repo, BlobSource.from_bytes(fmt.EMPTY_BLOB))
        done: set[str] = set()
        for role, path in files:
            blob = blobs[path]
            if blob.digest in done:
                continue
            done.add(blob.digest)
            bar = reporter.bar(f"{role}", blob.size)
            uploaded = await client.push_blob(repo, BlobSource.from_file(path, blob), bar.update)
            reporter.done()
            pushed.append({"role": role, "file": path, "digest": blob.digest, "size": blob.size,
                           "uploaded": uploaded})
            state = "pushed" if uploaded else "already in the store"
            ctx.note(f"{role}: {state} ({short_digest(blob.digest)}, {human_size(blob.size)})")
        digest = await client.put_manifest(repo, tag, data)
    except RegistryError as e:
        raise CommandError(_store_failure(store, e)) from None
    finally:
        reporter.done()
        await client.close()
    ctx.note(f"pushed {repo}:{tag} ({digest}) to {store}")

    image = None
    if not a.no_register:
        body: dict[str, Any] = {"name": name, "digest": digest, "stores": [store],
                                "kind": "qemu" if a.qcow2 else "board"}
        if a.description is not None:
            body["description"] = a.description
        if a.host_tags is not None:
            body["host_tags"] = a.host_tags
        image = await _register(ctx, body, a.replace)
    result = {"name": name, "repository": repo, "tag": tag, "digest": digest, "store": store,
              "registered": image is not None, "blobs": pushed, "image": image}
    return ctx.emit(result, lambda r: output.render_object(r, PUSH_FIELDS,
                                                           skip=("blobs", "image")))


async def _have(ctx: Context, path: Path, desc: fmt.Descriptor) -> bool:
    """Whether ``path`` already holds the blob (same size, then same digest)."""
    try:
        if not path.is_file() or path.stat().st_size != desc.size:
            return False
        return (await file_blob(ctx.reactor, path)).digest == desc.digest
    except OSError:
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pull_files(manifest: Any, media_type: str) -> tuple[fmt.TreadmillImage | None,
                                                         list[tuple[str, fmt.Descriptor]]]:
    """The files to write for a manifest: by role for Treadmill images, else by digest."""
    try:
        if fmt.is_treadmill_manifest(manifest, media_type):
            image = fmt.parse_image(manifest, media_type)
            return image, image.files()
        descriptors = [manifest.get("config"), *(manifest.get("layers") or [])]
        files = []
        for d in descriptors:
            if not isinstance(d, dict) or not fmt.is_digest(d.get("digest")):
                raise fmt.ManifestError(fmt.MANIFEST_INVALID, "a descriptor has no valid digest")
            size = d.get("size")
            desc = fmt.Descriptor(str(d.get("mediaType")), d["digest"],
                                  size if isinstance(size, int) and size >= 0 else 0)
            files.append((f"blobs/sha256/{desc.digest[7:]}", desc))
        return None, files
    except (fmt.ManifestError, AttributeError) as e:
        raise CommandError(f"the image's manifest is invalid: {e}") from None


async def _pull_from(ctx: Context, client: RegistryClient, repo: str, digest: str, out: Path,
                     reporter: _Reporter, last: bool) -> list[dict[str, Any]]:
    # While other stores remain, a store that does not answer at once is skipped.
    manifest = await client.get_manifest(repo, digest, retries=None if last else 1)
    image, files = _pull_files(fmt.load_manifest(manifest.data), manifest.media_type)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rel, desc in files:
        dest = out / rel
        if await _have(ctx, dest, desc):
            ctx.note(f"{rel}: already there")
        else:
            bar = reporter.bar(rel, desc.size)
            await client.pull_blob(repo, desc.digest, dest, size=desc.size, progress=bar.update)
            reporter.done()
        written.append({"path": rel, "digest": desc.digest, "size": desc.size,
                        "media_type": desc.media_type})
    _write_atomically(out / "manifest.json", manifest.data)
    if image is not None and image.flash is not None:
        flash = image.annotations[fmt.ANN_FLASH]
        _write_atomically(out / "flash.json", flash.encode("utf-8"))
    return written


async def image_pull(ctx: Context) -> int:
    """Fetch an image from the first of its stores that answers, verifying every digest."""
    a = ctx.args
    entry = await ctx.api.get("images", a.name)
    digest = entry.get("digest")
    if not fmt.is_digest(digest):
        raise CommandError(f"the catalogue entry of {a.name} has no valid digest")
    stores = [s.rstrip("/") for s in (a.stores or entry.get("stores") or [])]
    if not stores:
        raise CommandError(f"the catalogue lists no store for {a.name}; give --store URL")
    repo = _repository(ctx, a.name)
    out = Path(a.output) if a.output else Path(a.name.rsplit("/", 1)[-1])
    reporter = _Reporter(ctx, _progress_enabled(ctx))
    errors = []
    registered: dict[str, str] = {}
    for i, store in enumerate(stores):
        try:
            service = await _registered_service(ctx, store, registered)
        except CommandError as e:
            errors.append(str(e))
            if i + 1 < len(stores):
                ctx.note(f"tml: {errors[-1]}; trying the next store")
            continue
        client = _registry(ctx, store, service, reporter)
        try:
            files = await _pull_from(ctx, client, repo, digest, out, reporter,
                                     last=i + 1 == len(stores))
        except RegistryError as e:
            reporter.done()
            errors.append(_store_failure(store, e))
            if i + 1 < len(stores):
                ctx.note(f"tml: {errors[-1]}; trying the next store")
            continue
        except OSError as e:
            raise CommandError(f"{out}: {e.strerror or e}") from None
        finally:
            reporter.done()
            await client.close()
        result = {"name": a.name, "digest": digest, "store": store, "repository": repo,
                  "output": str(out), "files": files}
        ctx.note(f"pulled {a.name} ({digest}) from {store} into {out}")
        return ctx.emit(result, _render_pulled)
    raise CommandError("; ".join(errors))


def _render_pulled(result: dict[str, Any]) -> str:
    rows = [(f["path"], short_digest(f["digest"]), human_size(f["size"]))
            for f in result["files"]]
    return output.render_table(("FILE", "DIGEST", "SIZE"), rows)


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
    _host_tag_option(p)
    results_command.add_patterns_option(p, "the image's jobs")
    p.add_argument("--kind", choices=("qemu", "board"),
                   help="the image's kind (default: read from its manifest in the first "
                   "store); only hosts that run this kind get its jobs")
    p.add_argument("--repository", metavar="REPO",
                   help="the store repository, to read the kind (default: NAME, lowercased)")
    _replace_option(p)
    p = add_command(image, "update", image_update, common, help="change an image")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--digest", metavar="DIGEST")
    _store_option(p, required=False)
    p.add_argument("--description", metavar="TEXT")
    _host_tag_option(p)
    results_command.add_patterns_option(p, "the image's jobs (replacing them all)")
    p.add_argument("--no-results-patterns", action="store_true",
                   help="remove the image's console patterns")
    p.add_argument("--kind", choices=("qemu", "board"), help="the image's kind")
    add_command(image, "ls", image_ls, common, help="list images")
    p = add_command(image, "history", image_history, common,
                    help="list an image's versions (newest first)")
    p.add_argument("name", metavar="NAME")
    p = add_command(image, "rollback", image_rollback, common,
                    help="make an earlier version of an image current again")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", type=positive_int,
                   help="a version number from tml image history")
    p = add_command(image, "show", image_show, common, help="show an image")
    p.add_argument("name", metavar="NAME")
    p = add_command(image, "rm", image_rm, common, help="remove an image from the catalogue")
    p.add_argument("name", metavar="NAME")
    _push_parser(image, common)
    _pull_parser(image, common)


def _replace_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replace", action="store_true",
                   help="if the name exists, point it at the new digest (the previous one "
                   "stays in tml image history NAME); without it an existing name is refused")


def _host_tag_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-tag", dest="host_tags", action="append", metavar="TAG",
                   help="a host tag jobs naming the image get when they give no --tag "
                   "(e.g. qemu); repeat")


def _transfer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", metavar="REPO",
                   help="the store repository (default: NAME, lowercased)")
    p.add_argument("--progress", action="store_true",
                   help="draw progress bars even when standard error is not a terminal")


def _push_parser(image: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(image, "push", image_push, common,
                    help="upload an image to an image store and register it")
    p.add_argument("name", metavar="NAME[:TAG]", help="catalogue name; the tag defaults to latest")
    p.add_argument("--store", required=True, metavar="URL", help="the image store to upload to")
    q = p.add_argument_group("QEMU images")
    q.add_argument("--qcow2", action="append", default=[], metavar="FILE",
                   help="a qcow2 layer; repeat from the base to the top")
    q.add_argument("--kernel", metavar="FILE", help="a kernel for direct boot")
    q.add_argument("--initrd", metavar="FILE", help="an initrd (needs --kernel)")
    q.add_argument("--cmdline", metavar="TEXT", help="the kernel command line (needs --kernel)")
    q.add_argument("--qemu-firmware", metavar="FILE",
                   help="firmware for the VM (e.g. OVMF for UEFI), given to QEMU as -bios")
    b = p.add_argument_group("board images")
    b.add_argument("--firmware", action="append", default=[], metavar="FILE[:TARGET]",
                   help="a firmware file, named by its base name, with an optional target "
                   "(flash address or partition); repeat")
    b.add_argument("--flash-json", metavar="JSON",
                   help="flashing metadata as JSON, or @FILE (see docs/images.md)")
    p.add_argument("--annotation", dest="annotations", action="append", default=[],
                   type=name_value, metavar="KEY=VALUE", help="a manifest annotation; repeat")
    p.add_argument("--description", metavar="TEXT", help="the catalogue description")
    _host_tag_option(p)
    _replace_option(p)
    p.add_argument("--no-register", action="store_true",
                   help="only upload; do not add or update the catalogue entry")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE,
                   metavar="BYTES", help=f"upload chunk size (default {DEFAULT_CHUNK_SIZE})")
    _transfer_options(p)


def _pull_parser(image: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(image, "pull", image_pull, common,
                    help="download an image from its stores, verifying every digest")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--output", "-o", metavar="DIR",
                   help="where to write the files (default: ./ and the name's last part)")
    _store_option(p, required=False)
    _transfer_options(p)
