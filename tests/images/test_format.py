"""The Treadmill image format (treadmill/images/format.py): one row per rule."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from treadmill.images import format as fmt
from treadmill.images.format import (
    ANN_CMDLINE,
    ANN_FIRMWARE_NAME,
    ANN_FIRMWARE_TARGET,
    ANN_FLASH,
    ANN_LOWER,
    DIGEST_INVALID,
    EMPTY_DIGEST,
    MANIFEST_BLOB_UNKNOWN,
    MANIFEST_INVALID,
    MT_FIRMWARE,
    MT_INITRD,
    MT_KERNEL,
    MT_QCOW2,
    MT_QEMU_FIRMWARE,
    OCI_MANIFEST,
    Blob,
    FirmwareFile,
    ManifestError,
)


def d(c: str) -> str:
    return "sha256:" + c * 64


BASE, MID, TOP, KERNEL, INITRD, BIOS, FW1, FW2 = (d(c) for c in "abcdef01")
EMPTY = {"mediaType": fmt.OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2}


def qemu() -> dict[str, Any]:
    """A valid QEMU image: three qcow2 layers, kernel, initrd, firmware, cmdline."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": fmt.ARTIFACT_QEMU,
        "config": dict(EMPTY),
        "layers": [
            {"mediaType": MT_QCOW2, "digest": BASE, "size": 100},
            {"mediaType": MT_QCOW2, "digest": MID, "size": 10,
             "annotations": {ANN_LOWER: BASE}},
            {"mediaType": MT_QCOW2, "digest": TOP, "size": 1,
             "annotations": {ANN_LOWER: MID}},
            {"mediaType": MT_KERNEL, "digest": KERNEL, "size": 5},
            {"mediaType": MT_INITRD, "digest": INITRD, "size": 6},
            {"mediaType": MT_QEMU_FIRMWARE, "digest": BIOS, "size": 7},
        ],
        "annotations": {ANN_CMDLINE: "console=ttyS0 root=/dev/vda1",
                        "org.opencontainers.image.description": "test"},
    }


def board() -> dict[str, Any]:
    """A valid board image: two firmware files and flashing metadata."""
    flash = {"tool": "tockloader",
             "args": ["flash", "--address", "{target:app.tab}", "{firmware:app.tab}"],
             "erase": True}
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": fmt.ARTIFACT_BOARD,
        "config": dict(EMPTY),
        "layers": [
            {"mediaType": MT_FIRMWARE, "digest": FW1, "size": 3,
             "annotations": {ANN_FIRMWARE_NAME: "kernel.bin", ANN_FIRMWARE_TARGET: "0x00000"}},
            {"mediaType": MT_FIRMWARE, "digest": FW2, "size": 4,
             "annotations": {ANN_FIRMWARE_NAME: "app.tab", ANN_FIRMWARE_TARGET: "0x40000"}},
        ],
        "annotations": {ANN_FLASH: json.dumps(flash)},
    }


Mutation = Callable[[dict[str, Any]], Any]


def layer(i: int, **fields: Any) -> Mutation:
    def apply(m: dict[str, Any]) -> None:
        m["layers"][i].update(fields)
    return apply


def layer_ann(i: int, key: str, value: str | None) -> Mutation:
    def apply(m: dict[str, Any]) -> None:
        ann = m["layers"][i].setdefault("annotations", {})
        if value is None:
            ann.pop(key, None)
        else:
            ann[key] = value
    return apply


def ann(key: str, value: str | None) -> Mutation:
    def apply(m: dict[str, Any]) -> None:
        a = m.setdefault("annotations", {})
        if value is None:
            a.pop(key, None)
        else:
            a[key] = value
    return apply


def flash(value: Any) -> Mutation:
    return ann(ANN_FLASH, value if isinstance(value, str) else json.dumps(value))


def drop_layer(i: int) -> Mutation:
    return lambda m: m["layers"].pop(i)


def add_layer(desc: dict[str, Any]) -> Mutation:
    return lambda m: m["layers"].append(desc)


def setf(key: str, value: Any) -> Mutation:
    def apply(m: dict[str, Any]) -> None:
        if value is _DEL:
            m.pop(key, None)
        else:
            m[key] = value
    return apply


_DEL = object()


def both(*mutations: Mutation) -> Mutation:
    def apply(m: dict[str, Any]) -> None:
        for f in mutations:
            f(m)
    return apply


def only_base(m: dict[str, Any]) -> None:
    m["layers"] = [m["layers"][0]]
    m.pop("annotations")


# (id, base manifest, mutation, expected error code or None, message fragment)
CASES: list[tuple[str, Callable[[], dict[str, Any]], Mutation, str | None, str]] = [
    # -- valid images
    ("qemu-valid", qemu, lambda m: None, None, ""),
    ("qemu-single-layer", qemu, only_base, None, ""),
    ("qemu-layers-out-of-order", qemu, lambda m: m["layers"].reverse(), None, ""),
    ("qemu-cmdline-4096", qemu, ann(ANN_CMDLINE, "x" * 4096), None, ""),
    ("qemu-config-with-data", qemu,
     lambda m: m["config"].update(data=base64.b64encode(b"{}").decode()), None, ""),
    ("qemu-other-annotations", qemu, layer_ann(0, "org.example.note", "hi"), None, ""),
    ("board-valid", board, lambda m: None, None, ""),
    ("board-no-flash", board, ann(ANN_FLASH, None), None, ""),
    ("board-no-target", board, both(layer_ann(0, ANN_FIRMWARE_TARGET, None)), None, ""),
    ("board-same-blob-two-names", board, layer(1, digest=FW1), None, ""),
    ("board-escaped-braces", board, flash({"tool": "custom", "args": ["{{literal}}"]}), None, ""),
    ("board-port-placeholder", board, flash({"tool": "probe-rs", "args": ["--port={port}"]}),
     None, ""),
    # -- the manifest
    ("schema-version-1", qemu, setf("schemaVersion", 1), MANIFEST_INVALID, "schemaVersion"),
    ("schema-version-bool", qemu, setf("schemaVersion", True), MANIFEST_INVALID,
     "schemaVersion"),
    ("media-type-missing", qemu, setf("mediaType", _DEL), MANIFEST_INVALID, "mediaType"),
    ("media-type-other", qemu, setf("mediaType", fmt.OCI_INDEX), MANIFEST_INVALID, "mediaType"),
    ("unknown-treadmill-artifact", qemu,
     setf("artifactType", "application/vnd.treadmill.image.qemu.v2"), MANIFEST_INVALID,
     "unknown Treadmill artifactType"),
    ("artifact-in-config-media-type", qemu,
     both(setf("artifactType", _DEL),
          lambda m: m["config"].update(mediaType=fmt.ARTIFACT_QEMU)),
     MANIFEST_INVALID, "artifactType"),
    ("config-not-empty-type", qemu, lambda m: m["config"].update(
        mediaType="application/vnd.oci.image.config.v1+json"), MANIFEST_INVALID, "empty"),
    ("config-wrong-digest", qemu, lambda m: m["config"].update(digest=BASE), MANIFEST_INVALID,
     "empty"),
    ("config-wrong-size", qemu, lambda m: m["config"].update(size=3), MANIFEST_INVALID, "empty"),
    ("config-missing", qemu, setf("config", _DEL), MANIFEST_INVALID, "config"),
    ("config-data-mismatch", qemu,
     lambda m: m["config"].update(data=base64.b64encode(b"[]").decode()), DIGEST_INVALID,
     "data"),
    ("config-data-not-base64", qemu, lambda m: m["config"].update(data="!!"), MANIFEST_INVALID,
     "base64"),
    ("layers-empty", qemu, setf("layers", []), MANIFEST_INVALID, "non-empty"),
    ("layers-not-list", qemu, setf("layers", {}), MANIFEST_INVALID, "non-empty"),
    ("too-many-layers", qemu, lambda m: m["layers"].extend(
        [{"mediaType": MT_QCOW2, "digest": d("9"), "size": 1}] * 200), MANIFEST_INVALID,
     "at most 128"),
    ("annotations-not-object", qemu, setf("annotations", ["x"]), MANIFEST_INVALID,
     "annotations"),
    ("annotation-not-string", qemu, ann("org.example.n", 5), MANIFEST_INVALID,  # type: ignore[arg-type]
     "must be a string"),
    ("annotation-oversized", qemu, ann("org.example.big", "x" * 65537), MANIFEST_INVALID,
     "longer than"),
    ("too-many-annotations", qemu, lambda m: m["annotations"].update(
        {f"org.example.{i}": "x" for i in range(200)}), MANIFEST_INVALID, "more than 128"),
    ("unknown-treadmill-annotation", qemu, ann("org.treadmill.kernel.cmdlin", "x"),
     MANIFEST_INVALID, "not allowed"),
    # -- descriptors
    ("digest-trailing-newline", qemu, layer(3, digest=KERNEL + "\n"), DIGEST_INVALID,
     "malformed"),
    ("digest-uppercase", qemu, layer(3, digest="sha256:" + "A" * 64), DIGEST_INVALID, ""),
    ("digest-short", qemu, layer(3, digest="sha256:abc"), DIGEST_INVALID, ""),
    ("digest-sha512", qemu, layer(3, digest="sha512:" + "a" * 128), DIGEST_INVALID,
     "only sha256"),
    ("digest-not-string", qemu, layer(3, digest=5), DIGEST_INVALID, "string"),
    ("digest-missing", qemu, lambda m: m["layers"][3].pop("digest"), DIGEST_INVALID, ""),
    ("size-negative", qemu, layer(3, size=-1), MANIFEST_INVALID, "size"),
    ("size-bool", qemu, layer(3, size=True), MANIFEST_INVALID, "size"),
    ("size-string", qemu, layer(3, size="5"), MANIFEST_INVALID, "size"),
    ("layer-urls", qemu, layer(3, urls=["http://x"]), MANIFEST_INVALID, "urls"),
    ("layer-media-type-missing", qemu, lambda m: m["layers"][3].pop("mediaType"),
     MANIFEST_INVALID, "mediaType"),
    ("unknown-layer-media-type", qemu, layer(3, mediaType="application/octet-stream"),
     MANIFEST_INVALID, "not allowed"),
    ("unknown-treadmill-media-type", qemu, layer(3, mediaType="application/vnd.treadmill.dtb.v1"),
     MANIFEST_INVALID, "not allowed"),
    ("board-layer-in-qemu", qemu, add_layer(
        {"mediaType": MT_FIRMWARE, "digest": FW1, "size": 1,
         "annotations": {ANN_FIRMWARE_NAME: "x"}}), MANIFEST_INVALID, "not allowed"),
    ("layer-annotation-not-string", qemu, layer_ann(3, "org.example.x", 1),  # type: ignore[arg-type]
     MANIFEST_INVALID, "must be a string"),
    # -- the qcow2 chain
    ("no-qcow2", qemu, lambda m: [m["layers"].pop(0) for _ in range(3)], MANIFEST_INVALID,
     "at least one qcow2"),
    ("lower-trailing-newline", qemu, layer_ann(1, ANN_LOWER, BASE + "\n"), DIGEST_INVALID,
     "malformed"),
    ("lower-is-a-path", qemu, layer_ann(1, ANN_LOWER, "/images/base.qcow2"), DIGEST_INVALID,
     "malformed"),
    ("lower-missing-layer", qemu, layer_ann(1, ANN_LOWER, d("7")), MANIFEST_INVALID,
     "not a qcow2 layer of this manifest"),
    ("lower-is-kernel", qemu, layer_ann(1, ANN_LOWER, KERNEL), MANIFEST_INVALID,
     "not a qcow2 layer"),
    ("lower-self", qemu, layer_ann(1, ANN_LOWER, MID), MANIFEST_INVALID, "itself"),
    ("two-bases", qemu, layer_ann(1, ANN_LOWER, None), MANIFEST_INVALID, "exactly one base"),
    ("no-base-cycle", qemu, layer_ann(0, ANN_LOWER, TOP), MANIFEST_INVALID, "exactly one base"),
    ("two-tops", qemu, layer_ann(2, ANN_LOWER, BASE), MANIFEST_INVALID,
     "lower layer of two layers"),
    ("cycle-beside-base", qemu, both(
        layer_ann(1, ANN_LOWER, TOP), layer_ann(2, ANN_LOWER, MID)), MANIFEST_INVALID, "cycle"),
    ("duplicate-qcow2", qemu, add_layer({"mediaType": MT_QCOW2, "digest": BASE, "size": 100}),
     MANIFEST_INVALID, "twice"),
    ("lower-on-kernel", qemu, layer_ann(3, ANN_LOWER, BASE), MANIFEST_INVALID, "not allowed"),
    ("misspelt-lower", qemu, layer_ann(1, "org.treadmill.qcow2.lowre", BASE), MANIFEST_INVALID,
     "not allowed"),
    ("firmware-name-on-qcow2", qemu, layer_ann(0, ANN_FIRMWARE_NAME, "x"), MANIFEST_INVALID,
     "not allowed"),
    # -- kernel, initrd, cmdline, firmware
    ("two-kernels", qemu, add_layer({"mediaType": MT_KERNEL, "digest": d("5"), "size": 1}),
     MANIFEST_INVALID, "at most one kernel"),
    ("two-initrds", qemu, add_layer({"mediaType": MT_INITRD, "digest": d("5"), "size": 1}),
     MANIFEST_INVALID, "at most one initrd"),
    ("two-qemu-firmware", qemu, add_layer(
        {"mediaType": MT_QEMU_FIRMWARE, "digest": d("5"), "size": 1}), MANIFEST_INVALID,
     "at most one qemu firmware"),
    ("initrd-without-kernel", qemu, both(drop_layer(3), ann(ANN_CMDLINE, None)),
     MANIFEST_INVALID, "needs a kernel"),
    ("cmdline-without-kernel", qemu, both(drop_layer(4), drop_layer(3)), MANIFEST_INVALID,
     "needs a kernel"),
    ("cmdline-oversized", qemu, ann(ANN_CMDLINE, "x" * 4097), MANIFEST_INVALID, "longer than"),
    ("cmdline-nul", qemu, ann(ANN_CMDLINE, "a\x00b"), MANIFEST_INVALID, "NUL"),
    ("cmdline-newline", qemu, ann(ANN_CMDLINE, "a\nb"), MANIFEST_INVALID, "line breaks"),
    ("cmdline-cr", qemu, ann(ANN_CMDLINE, "a\rb"), MANIFEST_INVALID, "line breaks"),
    ("flash-on-qemu", qemu, ann(ANN_FLASH, '{"tool": "custom"}'), MANIFEST_INVALID,
     "not allowed"),
    # -- board firmware
    ("qcow2-in-board", board, add_layer({"mediaType": MT_QCOW2, "digest": BASE, "size": 1}),
     MANIFEST_INVALID, "not allowed"),
    ("cmdline-on-board", board, ann(ANN_CMDLINE, "x"), MANIFEST_INVALID, "not allowed"),
    ("firmware-name-missing", board, layer_ann(0, ANN_FIRMWARE_NAME, None), MANIFEST_INVALID,
     "needs org.treadmill.firmware.name"),
    ("firmware-name-dotdot", board, layer_ann(0, ANN_FIRMWARE_NAME, ".."), MANIFEST_INVALID,
     "safe file name"),
    ("firmware-name-dot", board, layer_ann(0, ANN_FIRMWARE_NAME, "."), MANIFEST_INVALID,
     "safe file name"),
    ("firmware-name-slash", board, layer_ann(0, ANN_FIRMWARE_NAME, "../etc/passwd"),
     MANIFEST_INVALID, "safe file name"),
    ("firmware-name-empty", board, layer_ann(0, ANN_FIRMWARE_NAME, ""), MANIFEST_INVALID,
     "safe file name"),
    ("firmware-name-newline", board, layer_ann(0, ANN_FIRMWARE_NAME, "a.bin\n"),
     MANIFEST_INVALID, "safe file name"),
    ("firmware-name-space", board, layer_ann(0, ANN_FIRMWARE_NAME, "a b"), MANIFEST_INVALID,
     "safe file name"),
    ("firmware-name-oversized", board, layer_ann(0, ANN_FIRMWARE_NAME, "a" * 129),
     MANIFEST_INVALID, "safe file name"),
    ("firmware-name-128", board, layer_ann(0, ANN_FIRMWARE_NAME, "a" * 128), None, ""),
    ("firmware-name-duplicate", board, layer_ann(1, ANN_FIRMWARE_NAME, "kernel.bin"),
     MANIFEST_INVALID, "used twice"),
    ("target-oversized", board, layer_ann(0, ANN_FIRMWARE_TARGET, "x" * 129), MANIFEST_INVALID,
     "target"),
    ("target-empty", board, layer_ann(0, ANN_FIRMWARE_TARGET, ""), MANIFEST_INVALID, "target"),
    ("target-newline", board, layer_ann(0, ANN_FIRMWARE_TARGET, "0x0\n"), MANIFEST_INVALID,
     "target"),
    ("target-non-ascii", board, layer_ann(0, ANN_FIRMWARE_TARGET, "flash\u00e9"),
     MANIFEST_INVALID, "target"),
    ("target-128", board, layer_ann(0, ANN_FIRMWARE_TARGET, "p" * 128), None, ""),
    # -- flashing metadata
    ("flash-not-json", board, flash("{tool: openocd}"), MANIFEST_INVALID, "not valid JSON"),
    ("flash-not-object", board, flash([]), MANIFEST_INVALID, "object"),
    ("flash-nan", board, flash('{"tool": "custom", "timeout": NaN}'), MANIFEST_INVALID,
     "not valid JSON"),
    ("flash-duplicate-key", board, flash('{"tool": "custom", "tool": "openocd"}'),
     MANIFEST_INVALID, "duplicate"),
    ("flash-no-tool", board, flash({"args": []}), MANIFEST_INVALID, "tool"),
    ("flash-unknown-tool", board, flash({"tool": "dd"}), MANIFEST_INVALID, "tool"),
    ("flash-extra-key", board, flash({"tool": "custom", "shell": "rm -rf /"}), MANIFEST_INVALID,
     "shell"),
    ("flash-args-not-list", board, flash({"tool": "custom", "args": "x"}), MANIFEST_INVALID,
     "args"),
    ("flash-arg-newline", board, flash({"tool": "custom", "args": ["a\nb"]}), MANIFEST_INVALID,
     "args"),
    ("flash-arg-oversized", board, flash({"tool": "custom", "args": ["x" * 1025]}),
     MANIFEST_INVALID, "args"),
    ("flash-erase-not-bool", board, flash({"tool": "custom", "erase": "yes"}), MANIFEST_INVALID,
     "erase"),
    ("flash-timeout-zero", board, flash({"tool": "custom", "timeout": 0}), MANIFEST_INVALID,
     "timeout"),
    ("flash-oversized", board, flash({"tool": "custom", "args": ["x" * 1000] * 17}),
     MANIFEST_INVALID, "longer than"),
    ("flash-unknown-placeholder", board, flash({"tool": "custom", "args": ["{home}"]}),
     MANIFEST_INVALID, "unknown placeholder"),
    ("flash-missing-firmware", board, flash({"tool": "custom", "args": ["{firmware:x.bin}"]}),
     MANIFEST_INVALID, "names no firmware"),
    ("flash-target-without-target", board, both(
        layer_ann(0, ANN_FIRMWARE_TARGET, None),
        flash({"tool": "openocd", "args": ["{target:kernel.bin}"]})), MANIFEST_INVALID,
     "no target"),
    ("flash-unbalanced-brace", board, flash({"tool": "custom", "args": ["{firmware:app.tab"]}),
     MANIFEST_INVALID, "unbalanced"),
]


@pytest.mark.parametrize(
    ("base", "mutate", "code", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_rule(base, mutate, code, fragment):
    manifest = base()
    mutate(manifest)
    manifest = copy.deepcopy(manifest)
    if code is None:
        fmt.validate_manifest(manifest, OCI_MANIFEST, lambda digest: True)
        fmt.parse_image(manifest)
        return
    with pytest.raises(ManifestError) as info:
        fmt.validate_manifest(manifest, OCI_MANIFEST, lambda digest: True)
    assert info.value.code == code, info.value.message
    assert fragment in info.value.message
    assert info.value.to_json() == {"errors": [{"code": code, "message": info.value.message}]}


# -- not Treadmill images: nothing to say --------------------------------------------------

NOT_OURS = [
    ("docker-v2", "application/vnd.docker.distribution.manifest.v2+json", {"layers": "junk"}),
    ("oci-index", fmt.OCI_INDEX, {"manifests": []}),
    ("plain-oci-image", OCI_MANIFEST, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": d("1"), "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": d("2"), "size": 20}]}),
    ("other-artifact", OCI_MANIFEST, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x.sbom",
        "config": EMPTY, "layers": [{"mediaType": "text/plain", "digest": "junk", "size": -1}]}),
    ("not-an-object", OCI_MANIFEST, ["x"]),
    ("treadmill-artifact-other-media-type", "application/vnd.docker.distribution.manifest.v2+json",
     qemu()),
]


@pytest.mark.parametrize(("media_type", "manifest"),
                         [pytest.param(*c[1:], id=c[0]) for c in NOT_OURS])
def test_not_treadmill_passes(media_type, manifest):
    fmt.validate_manifest(manifest, media_type, lambda digest: False)
    assert not fmt.is_treadmill_manifest(manifest, media_type)
    with pytest.raises(ManifestError, match="not a Treadmill image"):
        fmt.parse_image(manifest, media_type)


# -- blobs must exist ------------------------------------------------------------------


@pytest.mark.parametrize("missing", [EMPTY_DIGEST, BASE, TOP, KERNEL, INITRD, BIOS])
def test_missing_blob(missing):
    asked = []

    def exists(digest: str) -> bool:
        asked.append(digest)
        return digest != missing

    with pytest.raises(ManifestError) as info:
        fmt.validate_manifest(qemu(), OCI_MANIFEST, exists)
    assert info.value.code == MANIFEST_BLOB_UNKNOWN
    assert missing in info.value.message


def test_blobs_asked_once_each_and_after_structure():
    asked: list[str] = []
    m = board()
    m["layers"][1]["digest"] = FW1  # the same blob under two names
    fmt.validate_manifest(m, OCI_MANIFEST, lambda dg: asked.append(dg) or True)
    assert sorted(asked) == sorted([EMPTY_DIGEST, FW1])
    # A structural error wins over a missing blob, and no blob is looked up.
    asked.clear()
    m["layers"][0]["annotations"][ANN_FIRMWARE_NAME] = ".."
    with pytest.raises(ManifestError) as info:
        fmt.validate_manifest(m, OCI_MANIFEST, lambda dg: asked.append(dg) or False)
    assert info.value.code == MANIFEST_INVALID
    assert asked == []


# -- parsing -----------------------------------------------------------------------------


def test_parse_qemu_orders_chain_base_to_top():
    m = qemu()
    m["layers"] = [m["layers"][2], m["layers"][5], m["layers"][0], m["layers"][3],
                   m["layers"][1], m["layers"][4]]
    image = fmt.parse_image(m)
    assert image.kind == "qemu"
    assert image.artifact_type == fmt.ARTIFACT_QEMU
    assert [x.digest for x in image.qcow2] == [BASE, MID, TOP]
    assert image.base is not None and image.base.digest == BASE
    assert image.top is not None and image.top.digest == TOP
    assert image.kernel is not None and image.kernel.digest == KERNEL
    assert image.initrd is not None and image.initrd.size == 6
    assert image.qemu_firmware is not None and image.qemu_firmware.digest == BIOS
    assert image.cmdline == "console=ttyS0 root=/dev/vda1"
    assert image.firmware == () and image.flash is None
    assert [name for name, _ in image.files()] == [
        "disk-0.qcow2", "disk-1.qcow2", "disk-2.qcow2", "kernel", "initrd", "qemu-firmware.bin"]
    assert image.qcow2[1].annotations[ANN_LOWER] == BASE
    with pytest.raises(TypeError):
        image.qcow2[1].annotations[ANN_LOWER] = TOP  # type: ignore[index]
    hash(image)  # frozen and hashable


def test_parse_board():
    image = fmt.parse_image(board())
    assert image.kind == "board"
    assert [(f.name, f.target, f.descriptor.digest) for f in image.firmware] == [
        ("kernel.bin", "0x00000", FW1), ("app.tab", "0x40000", FW2)]
    assert image.flash == fmt.FlashSpec("tockloader", (
        "flash", "--address", "{target:app.tab}", "{firmware:app.tab}"), True, None)
    assert [name for name, _ in image.files()] == ["firmware/kernel.bin", "firmware/app.tab"]
    assert image.qcow2 == () and image.kernel is None


def test_expand_flash_args():
    m = board()
    m["annotations"][ANN_FLASH] = json.dumps({
        "tool": "openocd",
        "args": ["-c", "program {firmware:kernel.bin} {target:kernel.bin} verify",
                 "{{not a placeholder}}", "--port={port}"]})
    image = fmt.parse_image(m)
    assert image.flash is not None
    args = fmt.expand_flash_args(image.flash, {"kernel.bin": "/tmp/k.bin"}, image,
                                 port="/dev/ttyACM0")
    assert args == ["-c", "program /tmp/k.bin 0x00000 verify", "{not a placeholder}",
                    "--port=/dev/ttyACM0"]
    with pytest.raises(ValueError, match="port"):
        fmt.expand_flash_args(image.flash, {"kernel.bin": "/tmp/k.bin"}, image)


def test_load_manifest():
    assert fmt.load_manifest(b'{"a": 1}') == {"a": 1}
    for bad in (b"[1]", b"{", b'{"a": NaN}', b"\xff"):
        with pytest.raises(ManifestError) as info:
            fmt.load_manifest(bad)
        assert info.value.code == MANIFEST_INVALID


# -- building ----------------------------------------------------------------------------


def test_build_qemu_manifest_round_trips():
    chain = [Blob(BASE, 100), Blob(MID, 10), Blob(TOP, 1)]
    m = fmt.build_qemu_manifest(chain, kernel=Blob(KERNEL, 5), initrd=Blob(INITRD, 6),
                                cmdline="console=ttyS0", firmware=Blob(BIOS, 7),
                                annotations={"org.opencontainers.image.created": "now"})
    assert m["artifactType"] == fmt.ARTIFACT_QEMU
    assert m["config"] == EMPTY
    assert m["layers"][0] == {"mediaType": MT_QCOW2, "digest": BASE, "size": 100}
    assert m["layers"][2]["annotations"] == {ANN_LOWER: MID}
    fmt.validate_manifest(m, OCI_MANIFEST, lambda digest: True)
    image = fmt.parse_image(m)
    assert [x.blob for x in image.qcow2] == chain
    assert image.cmdline == "console=ttyS0"
    data = fmt.manifest_bytes(m)
    assert json.loads(data) == m
    assert fmt.digest_of(data) == fmt.digest_of(fmt.manifest_bytes(json.loads(data)))


def test_build_board_manifest_round_trips():
    m = fmt.build_board_manifest(
        [FirmwareFile("a.bin", Blob(FW1, 3), "0x0"), FirmwareFile("b.bin", Blob(FW2, 4))],
        flash={"tool": "probe-rs", "args": ["download", "{firmware:a.bin}"]})
    image = fmt.parse_image(m)
    assert [f.name for f in image.firmware] == ["a.bin", "b.bin"]
    assert image.flash is not None and image.flash.tool == "probe-rs"
    assert fmt.build_board_manifest([FirmwareFile("a.bin", Blob(FW1, 3))])["layers"][0][
        "annotations"] == {ANN_FIRMWARE_NAME: "a.bin"}


@pytest.mark.parametrize("build", [
    lambda: fmt.build_qemu_manifest([]),
    lambda: fmt.build_qemu_manifest([Blob(BASE, 1), Blob(BASE, 1)]),
    lambda: fmt.build_qemu_manifest([Blob(BASE, 1)], cmdline="x"),
    lambda: fmt.build_qemu_manifest([Blob(BASE + "\n", 1)]),
    lambda: fmt.build_board_manifest([FirmwareFile("..", Blob(FW1, 1))]),
    lambda: fmt.build_board_manifest([FirmwareFile("a", Blob(FW1, 1))], flash={"tool": "sh"}),
    lambda: fmt.build_board_manifest([FirmwareFile("a", Blob(FW1, 1))], flash="{"),
])
def test_builders_refuse_invalid(build):
    with pytest.raises(ManifestError):
        build()


def test_is_digest():
    assert fmt.is_digest(BASE)
    assert not fmt.is_digest(BASE + "\n")
    assert not fmt.is_digest(BASE.upper())
    assert not fmt.is_digest(None)
    assert fmt.digest_of(fmt.EMPTY_BLOB) == EMPTY_DIGEST
