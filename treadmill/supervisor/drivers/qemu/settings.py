"""The ``qemu.*`` settings of the QEMU driver (docs/qemu.md has the table)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from treadmill.common.config import FLOAT, INT, STR, STRLIST, Setting, one_of

__all__ = ["SETTINGS", "QemuSettings", "expand_args"]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
PLACEHOLDERS = ("job", "work_dir", "ssh_port", "memory", "cpus")


def _seconds(value: Any) -> float:
    seconds = FLOAT(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _count(low: int, high: int) -> Any:
    def check(value: Any) -> int:
        number = INT(value)
        if not low <= number <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {number}")
        return number

    check.__name__ = "integer"
    return check


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    text = STR(value)
    return text or None


def _template_list(value: Any) -> list[str]:
    args = STRLIST(value)
    for arg in args:
        expand_args([arg], dict.fromkeys(PLACEHOLDERS, ""))  # raises ValueError
    return args


def expand_args(args: list[str], values: dict[str, Any]) -> list[str]:
    """``args`` with ``{job}``, ``{work_dir}``, ``{ssh_port}``, ``{memory}``, ``{cpus}``
    filled in (``{{`` and ``}}`` are literal braces); anything else is a ``ValueError``."""
    out = []
    for arg in args:
        def replace(match: re.Match[str], arg: str = arg) -> str:
            text = match.group(0)
            if text in ("{{", "}}"):
                return text[0]
            name = match.group(1)
            if name is None or name not in values:
                raise ValueError(f"qemu.extra_args: unknown placeholder or stray brace "
                                 f"{text!r} in {arg!r} (known: "
                                 f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
            return str(values[name])

        out.append(_PLACEHOLDER.sub(replace, arg))
    return out


SETTINGS: tuple[Setting, ...] = (
    Setting("qemu.binary", STR, "qemu-system-x86_64", "QEMU driver: the QEMU system emulator."),
    Setting("qemu.img_binary", STR, "qemu-img", "QEMU driver: qemu-img, which makes overlays."),
    Setting("qemu.accel", one_of("auto", "kvm", "tcg"), "auto",
            "QEMU driver: acceleration; auto uses KVM only if a boot probe shows it runs a "
            "Linux guest, else TCG."),
    Setting("qemu.machine", STR, "q35", "QEMU driver: the machine type (-machine)."),
    Setting("qemu.cpu", STR, "max", "QEMU driver: the CPU model (-cpu)."),
    Setting("qemu.memory", _count(16, 1 << 22), 512, "QEMU driver: guest memory in MiB."),
    Setting("qemu.cpus", _count(1, 256), 1, "QEMU driver: guest CPUs (-smp)."),
    Setting("qemu.extra_args", _template_list, [],
            "QEMU driver: more QEMU arguments, with {job}, {work_dir}, {ssh_port}, {memory} "
            "and {cpus} filled in."),
    Setting("qemu.firmware", _optional_str, None,
            "QEMU driver: firmware (-bios) for disk boot when the image has no firmware layer; "
            "unset: QEMU's default (SeaBIOS)."),
    Setting("qemu.ssh_port", _count(1, 65535), 22,
            "QEMU driver: the guest's SSH port, forwarded to a loopback port (service ssh)."),
    Setting("qemu.ready", one_of("agent", "boot"), "agent",
            "QEMU driver: when the job is ready: when the in-guest agent says so (agent), or "
            "as soon as the guest runs (boot)."),
    Setting("qemu.boot_timeout", _seconds, 300.0,
            "QEMU driver: seconds from power-on to ready (agent mode) before the job fails "
            "with host_start_failure."),
    Setting("qemu.shutdown_timeout", _seconds, 30.0,
            "QEMU driver: seconds a guest gets to power off after system_powerdown before QEMU "
            "is told to quit."),
    Setting("qemu.quit_timeout", _seconds, 5.0,
            "QEMU driver: seconds QEMU gets to quit before it is killed (SIGKILL)."),
    Setting("qemu.start_timeout", _seconds, 60.0,
            "QEMU driver: seconds QEMU gets to open its control sockets."),
    Setting("qemu.work_dir", _optional_str, None,
            "QEMU driver: per-job directories (overlay, sockets, log); default STATE_DIR/qemu."),
    Setting("qemu.kept_dir", _optional_str, None,
            "QEMU driver: where an ended job's disk is kept for snapshots (JOB.qcow2, JOB.json); "
            "default STATE_DIR/qemu-kept; on the file system of qemu.work_dir, not inside it."),
    Setting("qemu.keep_disks", _count(0, 1000), 1,
            "QEMU driver: how many ended jobs' disks are kept for snapshots (the last ones; "
            "0: none)."),
    Setting("qemu.keep_time", _seconds, 3600.0,
            "QEMU driver: seconds an ended job's disk is kept for snapshots."),
    Setting("qemu.probe_kernel", _optional_str, None,
            "QEMU driver: a Linux kernel for the KVM boot probe of accel = auto; default: the "
            "job's kernel, else /boot/vmlinuz if readable."),
    Setting("qemu.probe_timeout", _seconds, 20.0,
            "QEMU driver: seconds the KVM boot probe may take before KVM counts as broken."),
)
_BY_KEY = {setting.key: setting for setting in SETTINGS}


@dataclass(frozen=True)
class QemuSettings:
    """The driver's settings (see :data:`SETTINGS`)."""

    binary: str = "qemu-system-x86_64"
    img_binary: str = "qemu-img"
    accel: str = "auto"
    machine: str = "q35"
    cpu: str = "max"
    memory: int = 512
    cpus: int = 1
    extra_args: tuple[str, ...] = ()
    firmware: str | None = None
    ssh_port: int = 22
    ready: str = "agent"
    boot_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    quit_timeout: float = 5.0
    start_timeout: float = 60.0
    work_dir: str = "qemu"
    kept_dir: str = ""  # empty: beside work_dir (WORK_DIR-kept)
    keep_disks: int = 1
    keep_time: float = 3600.0
    probe_kernel: str | None = None
    probe_timeout: float = 20.0

    @classmethod
    def from_values(cls, values: dict[str, Any], state_dir: str = ".") -> QemuSettings:
        """From ``qemu.*`` values (unchecked ones are checked; missing take defaults)."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            setting = _BY_KEY[f"qemu.{f.name}"]
            value = values.get(setting.key, setting.default)
            if value is not None and value is not setting.default:
                value = setting.kind(value)
            out[f.name] = value
        out["extra_args"] = tuple(out["extra_args"] or ())
        out["work_dir"] = os.path.abspath(out["work_dir"] or os.path.join(state_dir, "qemu"))
        out["kept_dir"] = os.path.abspath(out["kept_dir"] or os.path.join(state_dir, "qemu-kept"))
        return cls(**out)

    def __post_init__(self) -> None:
        kept = os.path.abspath(self.kept_dir or self.work_dir.rstrip("/") + "-kept")
        object.__setattr__(self, "kept_dir", kept)
        work = os.path.abspath(self.work_dir)
        if kept == work or kept.startswith(work.rstrip("/") + "/"):
            raise ValueError(f"qemu.kept_dir ({kept}) must not be qemu.work_dir or inside it "
                             f"({work}): every job's work directory there is removed")
