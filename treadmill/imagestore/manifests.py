"""Manifests: accepted media types, structural checks, and the digests they reference.

The store keeps a manifest's exact bytes and media type and serves them back
unchanged. On push it checks that the body is a JSON object of a known kind,
that every descriptor names a valid ``sha256`` digest, and that every blob
(config, layers) and child manifest (of an index) is already in the
repository; the Treadmill image format (``treadmill.images.format``) adds
its own checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from treadmill.images.format import ManifestError, is_digest, validate_manifest
from treadmill.imagestore.errors import OCIError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MEDIA_TYPES = IMAGE_TYPES | INDEX_TYPES | {OCI_ARTIFACT}

# Layers that registries do not hold (pulled from their ``urls``).
_FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse(body: bytes) -> dict[str, Any]:
    """The manifest as a JSON object, or ``MANIFEST_INVALID``."""
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise OCIError("MANIFEST_INVALID", "manifest is not valid JSON") from None
    if not isinstance(value, dict):
        raise OCIError("MANIFEST_INVALID", "manifest is not a JSON object")
    return value


def media_type_of(manifest: dict[str, Any], content_type: str | None) -> str:
    """The manifest's media type from ``Content-Type`` and its ``mediaType`` field."""
    declared = manifest.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise OCIError("MANIFEST_INVALID", "mediaType must be a string")
    given = (content_type or "").split(";")[0].strip().lower() or None
    if given and declared and given != declared:
        raise OCIError("MANIFEST_INVALID",
                       f"Content-Type {given} does not match the manifest's mediaType {declared}")
    media_type = given or declared
    if media_type is None:
        raise OCIError("MANIFEST_INVALID", "no Content-Type and no mediaType in the manifest")
    if media_type not in MEDIA_TYPES:
        raise OCIError("MANIFEST_INVALID", f"unsupported manifest media type {media_type}")
    return media_type


def _descriptor(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OCIError("MANIFEST_INVALID", f"{where}: a descriptor must be an object")
    digest = value.get("digest")
    if not isinstance(digest, str) or not is_digest(digest):
        raise OCIError("MANIFEST_INVALID", f"{where}: digest must be sha256:<64 hex digits>")
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise OCIError("MANIFEST_INVALID", f"{where}: size must be a non-negative integer")
    if not isinstance(value.get("mediaType"), str):
        raise OCIError("MANIFEST_INVALID", f"{where}: mediaType must be a string")
    return value


def _list(manifest: dict[str, Any], key: str, required: bool) -> list[Any]:
    value = manifest.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise OCIError("MANIFEST_INVALID", f"{key} must be a list")
    return value


def check(manifest: dict[str, Any], media_type: str,
          blob_size: Callable[[str], int | None],
          manifest_size: Callable[[str], int | None]) -> None:
    """Check structure and references; raise ``MANIFEST_INVALID`` or ``MANIFEST_BLOB_UNKNOWN``.

    ``blob_size(digest)`` is the size of a blob in the repository (None if it
    is not there); ``manifest_size(digest)`` that of a manifest of the repository.
    """
    if media_type != OCI_ARTIFACT and manifest.get("schemaVersion") != 2:
        raise OCIError("MANIFEST_INVALID", "schemaVersion must be 2")
    blobs: list[tuple[str, dict[str, Any]]] = []
    children: list[tuple[str, dict[str, Any]]] = []
    if media_type in IMAGE_TYPES:
        blobs.append(("config", _descriptor(manifest.get("config"), "config")))
        for i, layer in enumerate(_list(manifest, "layers", True)):
            blobs.append((f"layers[{i}]", _descriptor(layer, f"layers[{i}]")))
    elif media_type in INDEX_TYPES:
        for i, child in enumerate(_list(manifest, "manifests", True)):
            children.append((f"manifests[{i}]", _descriptor(child, f"manifests[{i}]")))
    else:
        for i, blob in enumerate(_list(manifest, "blobs", False)):
            blobs.append((f"blobs[{i}]", _descriptor(blob, f"blobs[{i}]")))
    if "subject" in manifest:
        _descriptor(manifest["subject"], "subject")  # need not exist (referrers)
    unknown: list[dict[str, str]] = []
    references = [(where, desc, blob_size) for where, desc in blobs
                  if not (desc.get("urls") and desc["mediaType"] in _FOREIGN)]
    references += [(where, desc, manifest_size) for where, desc in children]
    for where, desc, size_of in references:
        size = size_of(desc["digest"])
        if size is None:
            unknown.append({"field": where, "digest": desc["digest"]})
        elif size != desc["size"]:
            raise OCIError("MANIFEST_INVALID",
                           f"{where}: size {desc['size']} does not match blob size {size}")
    if unknown:
        raise OCIError("MANIFEST_BLOB_UNKNOWN",
                       f"{unknown[0]['field']}: {unknown[0]['digest']} is not in the repository",
                       detail=unknown)


def check_format(manifest: dict[str, Any], media_type: str,
                 blob_exists: Callable[[str], bool]) -> None:
    """Apply the Treadmill image format's checks (:mod:`treadmill.images.format`)."""
    try:
        validate_manifest(manifest, media_type, blob_exists)
    except ManifestError as e:
        code = getattr(e, "code", "MANIFEST_INVALID")
        if code not in ("MANIFEST_INVALID", "MANIFEST_BLOB_UNKNOWN", "DIGEST_INVALID"):
            code = "MANIFEST_INVALID"
        message = getattr(e, "message", None) or str(e) or "invalid Treadmill image manifest"
        raise OCIError(code, str(message)) from None


def references(body: bytes) -> Iterator[str]:
    """Every digest a stored manifest refers to (for garbage collection).

    Deliberately generous: any ``digest`` of any object anywhere in the
    document counts (config, layers, child manifests, subject, blobs, and
    descriptors in extensions), so that collection never removes something
    a manifest names. A manifest that cannot be parsed references nothing
    beyond itself.
    """
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return iter(())
    return referenced_digests(value)


def referenced_digests(value: Any) -> Iterator[str]:
    """The ``digest`` of every object in a decoded manifest (see :func:`references`)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            digest = item.get("digest")
            if isinstance(digest, str) and is_digest(digest):
                yield digest
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parts(manifest: Any, media_type: str | None) -> tuple[list[str], list[str]]:
    """The blobs and the child manifests a stored manifest needs, as digests.

    Config and layers of an image (not foreign layers fetched from their
    ``urls``), ``blobs`` of an artifact manifest, ``manifests`` of an index;
    never the ``subject``. Malformed descriptors are skipped (the manifest
    was checked when it was pushed, or came verified from an upstream).
    """
    blobs: list[str] = []
    children: list[str] = []
    if not isinstance(manifest, dict):
        return blobs, children
    media_type = media_type or manifest.get("mediaType")

    def digests(values: Any, into: list[str]) -> None:
        if not isinstance(values, list):
            return
        for desc in values:
            if not isinstance(desc, dict):
                continue
            digest = desc.get("digest")
            if desc.get("urls") and desc.get("mediaType") in _FOREIGN:
                continue
            if isinstance(digest, str) and is_digest(digest) and digest not in into:
                into.append(digest)

    if media_type in INDEX_TYPES or (media_type is None and "manifests" in manifest):
        digests(manifest.get("manifests"), children)
    else:
        digests([manifest.get("config")], blobs)
        digests(manifest.get("layers"), blobs)
        digests(manifest.get("blobs"), blobs)
    return blobs, children
