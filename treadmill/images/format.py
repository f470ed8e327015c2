"""The Treadmill image format: OCI artifact manifests whose layers carry roles.

A Treadmill image is an OCI image manifest with an ``artifactType`` of our own
and the OCI empty config; the role of each layer is its media type plus a few
annotations. ``docs/images.md`` is the reader's guide; this module is the
authority. It is pure (no I/O): the image store calls :func:`validate_manifest`
on every manifest PUT, the CLI builds manifests with
:func:`build_qemu_manifest` and :func:`build_board_manifest`, and supervisors
read them with :func:`parse_image`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from treadmill.common.schema import validator

# -- OCI ----------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

# OCI Distribution error codes used here.
MANIFEST_INVALID = "MANIFEST_INVALID"
MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
DIGEST_INVALID = "DIGEST_INVALID"

# -- Treadmill ----------------------------------------------------------------

ARTIFACT_QEMU = "application/vnd.treadmill.image.qemu.v1"
ARTIFACT_BOARD = "application/vnd.treadmill.image.board.v1"
ARTIFACT_TYPES = {ARTIFACT_QEMU: "qemu", ARTIFACT_BOARD: "board"}
TREADMILL_MEDIA_PREFIX = "application/vnd.treadmill."

MT_QCOW2 = "application/vnd.treadmill.qemu.qcow2.v1"
MT_KERNEL = "application/vnd.treadmill.kernel.v1"
MT_INITRD = "application/vnd.treadmill.initrd.v1"
MT_QEMU_FIRMWARE = "application/vnd.treadmill.qemu.firmware.v1"
MT_FIRMWARE = "application/vnd.treadmill.firmware.v1"

ANN_PREFIX = "org.treadmill."
ANN_LOWER = "org.treadmill.qcow2.lower"
ANN_CMDLINE = "org.treadmill.kernel.cmdline"
ANN_FIRMWARE_NAME = "org.treadmill.firmware.name"
ANN_FIRMWARE_TARGET = "org.treadmill.firmware.target"
ANN_FLASH = "org.treadmill.flash"

# Which layer media types, layer annotations and manifest annotations each kind
# allows. Anything else in the ``org.treadmill.`` namespace is refused.
_LAYER_TYPES = {
    "qemu": (MT_QCOW2, MT_KERNEL, MT_INITRD, MT_QEMU_FIRMWARE),
    "board": (MT_FIRMWARE,),
}
_LAYER_ANNOTATIONS = {
    MT_QCOW2: (ANN_LOWER,),
    MT_KERNEL: (),
    MT_INITRD: (),
    MT_QEMU_FIRMWARE: (),
    MT_FIRMWARE: (ANN_FIRMWARE_NAME, ANN_FIRMWARE_TARGET),
}
_MANIFEST_ANNOTATIONS = {"qemu": (ANN_CMDLINE,), "board": (ANN_FLASH,)}

# Limits.
MAX_LAYERS = 128
MAX_SIZE = 2**63 - 1
MAX_CMDLINE = 4096
MAX_FLASH = 16384
MAX_TARGET = 128
MAX_ANNOTATIONS = 128
MAX_ANNOTATION_KEY = 256
MAX_ANNOTATION_VALUE = 65536

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The OCI digest grammar (any algorithm), to tell "malformed" from "unsupported".
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
FIRMWARE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TARGET = re.compile(r"[\x20-\x7e]{1,%d}" % MAX_TARGET)
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

FLASH_TOOLS = ("tockloader", "openocd", "probe-rs", "custom")
FLASH_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "org.treadmill.flash",
    "type": "object",
    "additionalProperties": False,
    "required": ["tool"],
    "properties": {
        "tool": {"enum": list(FLASH_TOOLS)},
        "args": {
            "type": "array",
            "maxItems": 64,
            "items": {"type": "string", "maxLength": 1024, "pattern": "^[^\\x00\\n\\r]*$"},
        },
        "erase": {"type": "boolean"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    },
}


class ManifestError(Exception):
    """A manifest is refused; ``code`` is an OCI Distribution error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, Any]:
        """The OCI error body: ``{"errors": [{"code", "message"}]}``."""
        return {"errors": [{"code": self.code, "message": self.message}]}


def _invalid(message: str) -> ManifestError:
    return ManifestError(MANIFEST_INVALID, message)


# -- parsed form ----------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A blob's address: its sha256 digest and size in bytes."""

    digest: str
    size: int


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (the fields Treadmill uses)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def blob(self) -> Blob:
        return Blob(self.digest, self.size)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Firmware:
    """A board firmware file: its safe file name, optional target, and blob."""

    name: str
    target: str | None
    descriptor: Descriptor


@dataclass(frozen=True)
class FlashSpec:
    """The ``org.treadmill.flash`` metadata (see :data:`FLASH_SCHEMA`)."""

    tool: str
    args: tuple[str, ...] = ()
    erase: bool = False
    timeout: float | None = None


@dataclass(frozen=True)
class TreadmillImage:
    """A validated Treadmill image, as the supervisor and QEMU driver use it."""

    kind: str  # "qemu" or "board"
    artifact_type: str
    qcow2: tuple[Descriptor, ...] = ()  # base first, top last
    kernel: Descriptor | None = None
    initrd: Descriptor | None = None
    cmdline: str | None = None
    qemu_firmware: Descriptor | None = None
    firmware: tuple[Firmware, ...] = ()
    flash: FlashSpec | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def base(self) -> Descriptor | None:
        return self.qcow2[0] if self.qcow2 else None

    @property
    def top(self) -> Descriptor | None:
        return self.qcow2[-1] if self.qcow2 else None

    def files(self) -> list[tuple[str, Descriptor]]:
        """Role-named relative file names for every layer (``tml image pull`` uses them).

        ``disk-0.qcow2`` is the base and the highest number the top; then
        ``kernel``, ``initrd``, ``qemu-firmware.bin``; board firmware goes to
        ``firmware/NAME``.
        """
        out = [(f"disk-{i}.qcow2", d) for i, d in enumerate(self.qcow2)]
        for name, desc in (
            ("kernel", self.kernel),
            ("initrd", self.initrd),
            ("qemu-firmware.bin", self.qemu_firmware),
        ):
            if desc is not None:
                out.append((name, desc))
        out.extend((f"firmware/{f.name}", f.descriptor) for f in self.firmware)
        return out


# -- validation -------------------------------------------------------------------


def is_digest(value: Any) -> bool:
    """Whether ``value`` is ``sha256:`` and 64 lowercase hex digits, exactly."""
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def _check_digest(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(DIGEST_INVALID, f"{where}: digest must be a string")
    if DIGEST.fullmatch(value):
        return value
    if _ANY_DIGEST.fullmatch(value):
        raise ManifestError(DIGEST_INVALID, f"{where}: only sha256 digests are supported")
    raise ManifestError(DIGEST_INVALID, f"{where}: malformed digest {value[:80]!r}")


def _check_annotations(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{where}.annotations must be an object")
    if len(value) > MAX_ANNOTATIONS:
        raise _invalid(f"{where}.annotations: more than {MAX_ANNOTATIONS} annotations")
    for k, v in value.items():
        if not isinstance(v, str):
            raise _invalid(f"{where}.annotations[{k!r}] must be a string")
        if not k or len(k) > MAX_ANNOTATION_KEY:
            raise _invalid(f"{where}.annotations: key of 1 to {MAX_ANNOTATION_KEY} characters")
        if len(v) > MAX_ANNOTATION_VALUE:
            raise _invalid(f"{where}.annotations[{k!r}] is longer than {MAX_ANNOTATION_VALUE}")
    return value


def _check_reserved(annotations: Mapping[str, str], allowed: Sequence[str], where: str) -> None:
    for key in annotations:
        if key.startswith(ANN_PREFIX) and key not in allowed:
            raise _invalid(f"{where}: annotation {key!r} is not allowed here")


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType must be a non-empty string")
    digest = _check_digest(value.get("digest"), where)
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
        raise _invalid(f"{where}.size must be a non-negative integer")
    if "urls" in value:
        raise _invalid(f"{where}: external blobs (urls) are not allowed in Treadmill images")
    if "data" in value:
        data = value["data"]
        try:
            raw = base64.b64decode(data, validate=True) if isinstance(data, str) else None
        except ValueError:
            raw = None
        if raw is None:
            raise _invalid(f"{where}.data must be base64")
        if len(raw) != size or "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise ManifestError(DIGEST_INVALID, f"{where}.data does not match its digest and size")
    annotations = _check_annotations(value.get("annotations"), where)
    return Descriptor(media_type, digest, size, MappingProxyType(dict(annotations)))


def _check_cmdline(value: str) -> str:
    if len(value) > MAX_CMDLINE:
        raise _invalid(f"{ANN_CMDLINE} is longer than {MAX_CMDLINE} characters")
    if any(c in value for c in "\x00\n\r"):
        raise _invalid(f"{ANN_CMDLINE} must not contain NUL or line breaks")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_flash(text: str, firmware: Mapping[str, str | None]) -> FlashSpec:
    """Parse and check ``org.treadmill.flash``; ``firmware`` maps names to targets."""
    if len(text) > MAX_FLASH:
        raise _invalid(f"{ANN_FLASH} is longer than {MAX_FLASH} characters")
    try:
        data = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    except (ValueError, RecursionError) as e:
        raise _invalid(f"{ANN_FLASH} is not valid JSON: {e}") from None
    errors = sorted(validator(FLASH_SCHEMA).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        path = "".join(f"[{p!r}]" for p in err.path)
        raise _invalid(f"{ANN_FLASH}{path}: {err.message}")
    args = tuple(data.get("args", ()))
    for arg in args:
        for placeholder in _placeholders(arg):
            _check_placeholder(placeholder, firmware)
    timeout = data.get("timeout")
    return FlashSpec(
        tool=data["tool"],
        args=args,
        erase=bool(data.get("erase", False)),
        timeout=float(timeout) if timeout is not None else None,
    )


def _placeholders(arg: str) -> list[str]:
    found = []
    for m in _PLACEHOLDER.finditer(arg):
        token = m.group(0)
        if token in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise _invalid(f"{ANN_FLASH}: unbalanced brace in argument {arg[:80]!r}")
        found.append(m.group(1))
    return found


def _check_placeholder(placeholder: str, firmware: Mapping[str, str | None]) -> None:
    if placeholder == "port":
        return
    kind, sep, name = placeholder.partition(":")
    if sep and kind in ("firmware", "target"):
        if name not in firmware:
            raise _invalid(f"{ANN_FLASH}: {{{placeholder}}} names no firmware of this image")
        if kind == "target" and firmware[name] is None:
            raise _invalid(f"{ANN_FLASH}: {{{placeholder}}}: that firmware has no target")
        return
    raise _invalid(f"{ANN_FLASH}: unknown placeholder {{{placeholder[:80]}}}")


def expand_flash_args(
    flash: FlashSpec, paths: Mapping[str, str], image: TreadmillImage, port: str | None = None
) -> list[str]:
    """``flash.args`` with ``{firmware:NAME}``, ``{target:NAME}`` and ``{port}`` filled in.

    ``paths`` maps firmware names to local file paths. The result is an argv
    list (never a shell string).
    """
    targets = {f.name: f.target for f in image.firmware}

    def one(arg: str) -> str:
        def sub(m: re.Match[str]) -> str:
            token = m.group(0)
            if token == "{{":
                return "{"
            if token == "}}":
                return "}"
            placeholder = m.group(1) or ""
            if placeholder == "port":
                if port is None:
                    raise ValueError("the flash arguments need {port} and none is known")
                return port
            kind, _, name = placeholder.partition(":")
            if kind == "firmware":
                return paths[name]
            return targets[name] or ""

        return _PLACEHOLDER.sub(sub, arg)

    return [one(a) for a in flash.args]


def _kind_of(manifest: Any, media_type: str) -> str | None:
    """``"qemu"``/``"board"`` for a Treadmill manifest, ``None`` for anything else."""
    if media_type != OCI_MANIFEST or not isinstance(manifest, dict):
        return None
    artifact_type = manifest.get("artifactType")
    config = manifest.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if artifact_type is None and isinstance(config_type, str):
        # The OCI 1.0 artifact convention put the artifact type in config.mediaType.
        if config_type.startswith(TREADMILL_MEDIA_PREFIX):
            raise _invalid("a Treadmill image sets artifactType and uses the empty config")
        return None
    if not isinstance(artifact_type, str):
        return None
    if artifact_type in ARTIFACT_TYPES:
        return ARTIFACT_TYPES[artifact_type]
    if artifact_type.startswith(TREADMILL_MEDIA_PREFIX):
        raise _invalid(f"unknown Treadmill artifactType {artifact_type[:120]!r}")
    return None


def _check(manifest: Any, media_type: str) -> tuple[TreadmillImage, list[Descriptor]] | None:
    kind = _kind_of(manifest, media_type)
    if kind is None:
        return None
    schema_version = manifest.get("schemaVersion")
    if schema_version != 2 or isinstance(schema_version, bool):
        raise _invalid("schemaVersion must be 2")
    if manifest.get("mediaType") != OCI_MANIFEST:
        raise _invalid(f"mediaType must be {OCI_MANIFEST}")
    config = _descriptor(manifest.get("config"), "config")
    if (config.media_type, config.digest, config.size) != (OCI_EMPTY, EMPTY_DIGEST, 2):
        raise _invalid(f"config must be the OCI empty descriptor ({OCI_EMPTY}, {EMPTY_DIGEST})")
    if "subject" in manifest:
        _descriptor(manifest["subject"], "subject")
    annotations = _check_annotations(manifest.get("annotations"), "manifest")
    _check_reserved(annotations, _MANIFEST_ANNOTATIONS[kind], "manifest")

    layers_json = manifest.get("layers")
    if not isinstance(layers_json, list) or not layers_json:
        raise _invalid("layers must be a non-empty array")
    if len(layers_json) > MAX_LAYERS:
        raise _invalid(f"at most {MAX_LAYERS} layers")
    layers = [_descriptor(v, f"layers[{i}]") for i, v in enumerate(layers_json)]
    allowed = _LAYER_TYPES[kind]
    for i, layer in enumerate(layers):
        if layer.media_type not in allowed:
            raise _invalid(
                f"layers[{i}]: media type {layer.media_type[:120]!r} is not allowed "
                f"in a {kind} image"
            )
        _check_reserved(layer.annotations, _LAYER_ANNOTATIONS[layer.media_type], f"layers[{i}]")

    if kind == "qemu":
        image = _check_qemu(layers, annotations)
    else:
        image = _check_board(layers, annotations)
    return image, [config, *layers]


def _single(layers: list[Descriptor], media_type: str, role: str) -> Descriptor | None:
    found = [d for d in layers if d.media_type == media_type]
    if len(found) > 1:
        raise _invalid(f"at most one {role} layer ({media_type})")
    return found[0] if found else None


def _check_qemu(layers: list[Descriptor], annotations: dict[str, str]) -> TreadmillImage:
    disks = [d for d in layers if d.media_type == MT_QCOW2]
    if not disks:
        raise _invalid(f"a qemu image needs at least one qcow2 layer ({MT_QCOW2})")
    kernel = _single(layers, MT_KERNEL, "kernel")
    initrd = _single(layers, MT_INITRD, "initrd")
    bios = _single(layers, MT_QEMU_FIRMWARE, "qemu firmware")
    cmdline = annotations.get(ANN_CMDLINE)
    if cmdline is not None:
        _check_cmdline(cmdline)
    if kernel is None and (initrd is not None or cmdline is not None):
        raise _invalid("an initrd or a kernel command line needs a kernel layer")
    return TreadmillImage(
        kind="qemu",
        artifact_type=ARTIFACT_QEMU,
        qcow2=_chain(disks),
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        qemu_firmware=bios,
        annotations=MappingProxyType(dict(annotations)),
    )


def _chain(disks: list[Descriptor]) -> tuple[Descriptor, ...]:
    """Order the qcow2 layers base → top by their ``lower`` annotations."""
    by_digest: dict[str, Descriptor] = {}
    for d in disks:
        if d.digest in by_digest:
            raise _invalid(f"qcow2 layer {d.digest} appears twice")
        by_digest[d.digest] = d
    upper_of: dict[str, str] = {}  # lower digest -> the layer above it
    bases = []
    for d in disks:
        lower = d.annotations.get(ANN_LOWER)
        if lower is None:
            bases.append(d)
            continue
        _check_digest(lower, f"qcow2 layer {d.digest}: {ANN_LOWER}")
        if lower == d.digest:
            raise _invalid(f"qcow2 layer {d.digest} names itself as its lower layer")
        if lower not in by_digest:
            raise _invalid(
                f"qcow2 layer {d.digest}: lower layer {lower} is not a qcow2 layer of this manifest"
            )
        if lower in upper_of:
            raise _invalid(f"qcow2 layer {lower} is the lower layer of two layers")
        upper_of[lower] = d.digest
    if len(bases) != 1:
        raise _invalid(
            f"the qcow2 layers need exactly one base (a layer without {ANN_LOWER}), "
            f"found {len(bases)}"
        )
    tops = [d for d in disks if d.digest not in upper_of]
    if len(tops) != 1:
        raise _invalid(f"the qcow2 layers need exactly one top, found {len(tops)}")
    chain = [bases[0]]
    while chain[-1].digest in upper_of:
        chain.append(by_digest[upper_of[chain[-1].digest]])
    if len(chain) != len(disks):
        raise _invalid("the qcow2 lower annotations form a cycle")
    return tuple(chain)


def _check_board(layers: list[Descriptor], annotations: dict[str, str]) -> TreadmillImage:
    firmware = []
    names: set[str] = set()
    for i, d in enumerate(layers):
        name = d.annotations.get(ANN_FIRMWARE_NAME)
        if name is None:
            raise _invalid(f"layers[{i}]: firmware needs {ANN_FIRMWARE_NAME}")
        if not FIRMWARE_NAME.fullmatch(name) or name in (".", ".."):
            raise _invalid(
                f"layers[{i}]: {ANN_FIRMWARE_NAME} {name[:140]!r} is not a safe file name "
                "([A-Za-z0-9._-], 1 to 128 characters, not . or ..)"
            )
        if name in names:
            raise _invalid(f"layers[{i}]: firmware name {name!r} is used twice")
        names.add(name)
        target = d.annotations.get(ANN_FIRMWARE_TARGET)
        if target is not None and not _TARGET.fullmatch(target):
            raise _invalid(
                f"layers[{i}]: {ANN_FIRMWARE_TARGET} must be 1 to {MAX_TARGET} "
                "printable ASCII characters"
            )
        firmware.append(Firmware(name, target, d))
    flash_text = annotations.get(ANN_FLASH)
    flash = None
    if flash_text is not None:
        flash = parse_flash(flash_text, {f.name: f.target for f in firmware})
    return TreadmillImage(
        kind="board",
        artifact_type=ARTIFACT_BOARD,
        firmware=tuple(firmware),
        flash=flash,
        annotations=MappingProxyType(dict(annotations)),
    )


def is_treadmill_manifest(manifest: Any, media_type: str = OCI_MANIFEST) -> bool:
    """Whether ``manifest`` claims to be a Treadmill image (valid or not)."""
    try:
        return _kind_of(manifest, media_type) is not None
    except ManifestError:
        return True


def validate_manifest(
    manifest: Any, media_type: str, blob_exists: Callable[[str], bool]
) -> None:
    """Refuse an invalid Treadmill image with a :class:`ManifestError`.

    ``manifest`` is the decoded JSON, ``media_type`` the PUT's Content-Type,
    ``blob_exists(digest)`` says whether the store holds a blob (in the
    repository being pushed to). Manifests that are not Treadmill images
    (another media type or ``artifactType``) pass untouched.
    """
    checked = _check(manifest, media_type)
    if checked is None:
        return
    _, descriptors = checked
    seen: set[str] = set()
    for d in descriptors:
        if d.digest in seen:
            continue
        seen.add(d.digest)
        if not blob_exists(d.digest):
            raise ManifestError(MANIFEST_BLOB_UNKNOWN, f"blob {d.digest} is not in the store")


def parse_image(manifest: Any, media_type: str = OCI_MANIFEST) -> TreadmillImage:
    """The :class:`TreadmillImage` of a manifest; :class:`ManifestError` if it is not one."""
    checked = _check(manifest, media_type)
    if checked is None:
        raise _invalid("not a Treadmill image (no Treadmill artifactType)")
    return checked[0]


def load_manifest(data: bytes) -> dict[str, Any]:
    """Decode manifest bytes; :class:`ManifestError` if they are not a JSON object."""
    try:
        manifest = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _invalid(f"not JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise _invalid("a manifest is a JSON object")
    return manifest


# -- building -------------------------------------------------------------------------


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes to push for ``manifest`` (compact JSON, key order kept)."""
    return json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest_of(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(media_type: str, blob: Blob, annotations: Mapping[str, str] | None = None
           ) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": blob.digest, "size": blob.size}
    if annotations:
        out["annotations"] = dict(annotations)
    return out


def _manifest(artifact_type: str, layers: list[dict[str, Any]],
              annotations: Mapping[str, str]) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2},
        "layers": layers,
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    _check(manifest, OCI_MANIFEST)
    return manifest


def build_qemu_manifest(
    qcow2: Sequence[Blob],
    *,
    kernel: Blob | None = None,
    initrd: Blob | None = None,
    cmdline: str | None = None,
    firmware: Blob | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A QEMU image manifest; ``qcow2`` is the chain base first, top last.

    Each qcow2 layer but the base names the one before it as its lower layer.
    Raises :class:`ManifestError` if the result would not validate.
    """
    layers = []
    lower: str | None = None
    for blob in qcow2:
        layers.append(_layer(MT_QCOW2, blob, {ANN_LOWER: lower} if lower else None))
        lower = blob.digest
    for media_type, blob in ((MT_KERNEL, kernel), (MT_INITRD, initrd),
                             (MT_QEMU_FIRMWARE, firmware)):
        if blob is not None:
            layers.append(_layer(media_type, blob))
    extra = dict(annotations or {})
    if cmdline is not None:
        extra[ANN_CMDLINE] = cmdline
    return _manifest(ARTIFACT_QEMU, layers, extra)


@dataclass(frozen=True)
class FirmwareFile:
    """One firmware file for :func:`build_board_manifest`."""

    name: str
    blob: Blob
    target: str | None = None


def build_board_manifest(
    firmware: Sequence[FirmwareFile],
    *,
    flash: Mapping[str, Any] | str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A board image manifest; ``flash`` is the flashing metadata (object or JSON text)."""
    layers = []
    for f in firmware:
        ann = {ANN_FIRMWARE_NAME: f.name}
        if f.target is not None:
            ann[ANN_FIRMWARE_TARGET] = f.target
        layers.append(_layer(MT_FIRMWARE, f.blob, ann))
    extra = dict(annotations or {})
    if flash is not None:
        extra[ANN_FLASH] = flash if isinstance(flash, str) else json.dumps(
            flash, separators=(",", ":"))
    return _manifest(ARTIFACT_BOARD, layers, extra)
