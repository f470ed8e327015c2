"""QEMU and qemu-img command lines, built from settings and a fetched image (pure)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from treadmill.images import format as fmt
from treadmill.protocol.agent import VIRTIO_PORT
from treadmill.supervisor.drivers.qemu.settings import QemuSettings, expand_args

__all__ = ["MAX_SOCKET_PATH", "Paths", "blockdev_chain", "overlay_command", "qemu_command",
           "rebase_command"]

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
NETDEV = "net0"


@dataclass(frozen=True)
class Paths:
    """The files of one job's work directory."""

    work_dir: str

    def _p(self, name: str) -> str:
        return os.path.join(self.work_dir, name)

    @property
    def overlay(self) -> str:
        return self._p("overlay.qcow2")

    @property
    def qmp(self) -> str:
        return self._p("qmp.sock")

    @property
    def console(self) -> str:
        return self._p("console.sock")

    @property
    def agent(self) -> str:
        return self._p("agent.sock")

    @property
    def pidfile(self) -> str:
        return self._p("qemu.pid")

    @property
    def log(self) -> str:
        return self._p("qemu.log")

    @property
    def state(self) -> str:
        return self._p("run.json")

    def too_long(self) -> str | None:
        """A socket path longer than a UNIX socket allows, if any."""
        for path in (self.qmp, self.console, self.agent):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                return path
        return None


def _opt(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option (commas doubled)."""
    return value.replace(",", ",,")


def blockdev_chain(image: fmt.TreadmillImage, path_of: Any) -> list[dict[str, Any]]:
    """``-blockdev`` nodes for the image's qcow2 chain, base first, every one read-only.

    Node ``layerN`` wraps layer N (0 = base) and names ``layerN-1`` as its backing
    node explicitly (the base has ``backing: null``), so the files' own
    backing-file fields are never followed: the chain is the manifest's, by digest.
    """
    nodes: list[dict[str, Any]] = []
    for index, layer in enumerate(image.qcow2):
        nodes.append({
            "driver": "qcow2",
            "node-name": f"layer{index}",
            "read-only": True,
            "backing": f"layer{index - 1}" if index else None,
            "file": {"driver": "file", "filename": path_of(layer), "read-only": True},
        })
    return nodes


def overlay_command(settings: QemuSettings, top: str, overlay: str, size: int) -> list[str]:
    """``qemu-img create`` of the job's writable overlay on ``top``.

    ``-u``: the top's own backing chain is not opened (it may name paths that do
    not exist here); the overlay's backing-file field is informative only,
    because QEMU is given the chain node by node.
    """
    return [settings.img_binary, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u",
            "-b", top, overlay, str(size)]


def rebase_command(settings: QemuSettings, path: str, backing: str) -> list[str]:
    """``qemu-img rebase -u`` of ``path``'s backing-file field to ``backing`` (a neutral
    name: no supervisor path leaks into a snapshot; the chain is the manifest's)."""
    return [settings.img_binary, "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2",
            "-b", backing, path]


def qemu_command(settings: QemuSettings, *, job_id: str, image: fmt.TreadmillImage,
                 path_of: Any, paths: Paths, accel: str, ssh_port: int) -> list[str]:
    """The QEMU command line of a job. QEMU starts paused (``-S``) so that the
    supervisor connects to the console and agent sockets before the guest runs."""
    args = [
        settings.binary,
        "-name", f"treadmill-{job_id},process=treadmill-{job_id[:8]}",
        "-accel", accel,
        "-machine", settings.machine,
        "-cpu", settings.cpu,
        "-m", str(settings.memory),
        "-smp", str(settings.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
        "-pidfile", paths.pidfile,
        # Serial console.
        "-chardev", f"socket,id=console,path={_opt(paths.console)},server=on,wait=off",
        "-serial", "chardev:console",
        # The agent channel.
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={_opt(paths.agent)},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={VIRTIO_PORT}",
        # User-mode networking, the guest's SSH port on loopback.
        "-netdev", f"user,id={NETDEV},hostfwd=tcp:127.0.0.1:{ssh_port}-:{settings.ssh_port}",
        "-device", f"virtio-net-pci,netdev={NETDEV}",
    ]
    if image.qcow2:
        for node in blockdev_chain(image, path_of):
            args += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        overlay = {"driver": "qcow2", "node-name": "disk",
                   "backing": f"layer{len(image.qcow2) - 1}",
                   "file": {"driver": "file", "filename": paths.overlay}}
        args += ["-blockdev", json.dumps(overlay, separators=(",", ":")),
                 "-device", "virtio-blk-pci,drive=disk"]
    if image.kernel is not None:
        args += ["-kernel", path_of(image.kernel)]
        if image.initrd is not None:
            args += ["-initrd", path_of(image.initrd)]
        if image.cmdline:
            args += ["-append", image.cmdline]
    firmware = path_of(image.qemu_firmware) if image.qemu_firmware else settings.firmware
    if firmware:
        args += ["-bios", firmware]
    args += expand_args(list(settings.extra_args), {
        "job": job_id, "work_dir": paths.work_dir, "ssh_port": ssh_port,
        "memory": settings.memory, "cpus": settings.cpus})
    # Last: once the QMP socket exists, every other socket does.
    args += ["-qmp", f"unix:{_opt(paths.qmp)},server=on,wait=off"]
    return args
