"""The systemd units in systemd/: their syntax (``systemd-analyze verify`` when it
is installed, a parse otherwise), the install layout of docs/install.md, and the
device access of each kind of supervisor."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.util.daemons import BIN
from tests.util.units import TWISTD, parse, values

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ROLES = {"treadmill-switchboard.service": "treadmill-switchboard",
         "treadmill-imagestore.service": "treadmill-imagestore",
         "treadmill-imagecache.service": "treadmill-imagestore",
         "treadmill-logserver.service": "treadmill-logserver",
         "treadmill-proxy.service": "treadmill-proxy",
         "treadmill-supervisor@.service": "treadmill-supervisor",
         "treadmill-supervisor-qemu@.service": "treadmill-supervisor",
         "treadmill-supervisor-serial@.service": "treadmill-supervisor"}


def test_every_unit_is_known_and_well_formed() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(ROLES)
    for name, plugin in ROLES.items():
        unit = parse(UNITS / name)
        assert set(unit) == {"Unit", "Service", "Install"}, name
        (exec_start,) = values(unit, "ExecStart")
        argv = exec_start.split()
        assert argv[0] == TWISTD and "/usr/bin/env" not in exec_start, name
        assert plugin in argv and argv[argv.index(plugin) + 1] == "--config", name
        assert argv[argv.index(plugin) + 2].startswith("/etc/treadmill/"), name
        assert values(unit, "NoNewPrivileges") == ["yes"], name
        assert values(unit, "DynamicUser") == ["yes"], name


def test_serial_unit_allows_power_control_devices() -> None:
    unit = parse(UNITS / "treadmill-supervisor-serial@.service")
    assert values(unit, "PrivateDevices") == ["no"]
    assert values(unit, "DevicePolicy") == ["closed"]
    allowed = {v.split()[0] for v in values(unit, "DeviceAllow")}
    # Consoles, debug probes and libusb relays, GPIO chips, HID relay boards.
    assert {"char-ttyS", "char-ttyUSB", "char-ttyACM", "char-usb_device", "char-gpiochip",
            "char-hidraw"} <= allowed
    assert all(v.split()[1] == "rw" for v in values(unit, "DeviceAllow"))
    groups = " ".join(values(unit, "SupplementaryGroups")).split()
    assert {"dialout", "plugdev", "gpio"} <= set(groups)
    # Still no capability, no new privileges: access is by group and device list only.
    assert values(unit, "CapabilityBoundingSet") == [""]


def test_units_that_need_no_device_get_none() -> None:
    for name in ("treadmill-switchboard.service", "treadmill-imagestore.service",
                 "treadmill-imagecache.service",
                 "treadmill-logserver.service", "treadmill-proxy.service",
                 "treadmill-supervisor@.service"):
        unit = parse(UNITS / name)
        assert values(unit, "PrivateDevices") == ["yes"], name
        assert values(unit, "DeviceAllow") == [], name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys or bad values are warnings, so any output fails.
    The unit checks that ExecStart exists: point it at this checkout's twistd."""
    paths = []
    for name in ROLES:
        text = (UNITS / name).read_text()
        assert TWISTD in text
        target = tmp_path / name
        target.write_text(text.replace(TWISTD, str(BIN / "twistd")))
        if name.endswith("@.service"):
            instance = tmp_path / name.replace("@.service", "@board-1.service")
            instance.symlink_to(target)
            target = instance
        paths.append(str(target))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def _doc_drop_ins() -> list[tuple[str, str, str]]:
    """Each drop-in docs/ shows (an ``ini`` block with ``[Service]``): its page, the unit
    the nearest ``systemctl edit UNIT`` before it names, and its text."""
    found = []
    for page in sorted((UNITS.parent / "docs").glob("*.md")):
        text = page.read_text()
        for block in re.finditer(r"```ini\n(\[Service\]\n.*?)```", text, re.DOTALL):
            units = re.findall(r"systemctl\s+edit\s+(treadmill-[\w@-]+)", text[:block.start()])
            assert units, f"{page.name}: a drop-in with no `systemctl edit UNIT` before it"
            found.append((page.name, units[-1], block[1]))
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_docs_drop_ins_apply_to_their_units(tmp_path: Path) -> None:
    """A drop-in of docs/ (operations.md's log level, install.md's TLS key) over the unit
    it is for passes ``systemd-analyze verify``: a second ExecStart= or an unknown key
    would stop the service."""
    drop_ins = _doc_drop_ins()
    assert {page for page, _, _ in drop_ins} >= {"install.md", "operations.md"}
    for number, (page, unit, text) in enumerate(drop_ins):
        name = unit if unit.endswith(".service") else unit + ".service"
        directory = tmp_path / str(number)
        (directory / f"{name}.d").mkdir(parents=True)
        unit_text = (UNITS / name).read_text().replace(TWISTD, str(BIN / "twistd"))
        (directory / name).write_text(unit_text)
        (directory / f"{name}.d" / "docs.conf").write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(directory / name)],
                              capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"})
        assert (proc.returncode, proc.stdout + proc.stderr) == (0, ""), (page, unit, text)


# Each unit's example configuration (etc/treadmill/) and the instance name (%i) it
# shows; what the role writes must lie in the unit's StateDirectory
# (ProtectSystem=strict leaves nothing else writable).
EXAMPLES = {"treadmill-switchboard.service": ("switchboard.toml", ""),
            "treadmill-imagestore.service": ("imagestore.toml", ""),
            "treadmill-imagecache.service": ("imagecache.toml", ""),
            "treadmill-logserver.service": ("logserver.toml", ""),
            "treadmill-proxy.service": ("proxy.toml", ""),
            "treadmill-supervisor@.service": ("supervisor-mock.toml", "mock"),
            "treadmill-supervisor-qemu@.service": ("supervisor-qemu.toml", "qemu"),
            "treadmill-supervisor-serial@.service": ("supervisor-serial.toml", "tock-1")}
ETC = UNITS.parent / "etc" / "treadmill"


def test_example_state_paths_lie_in_the_units_state_directory() -> None:
    assert sorted(EXAMPLES) == sorted(ROLES)
    for name, (example, instance) in EXAMPLES.items():
        (state,) = values(parse(UNITS / name), "StateDirectory")
        state = "/var/lib/" + state.replace("%i", instance)
        (config,) = [v for v in values(parse(UNITS / name), "ExecStart")[0].split()
                     if v.startswith("/etc/treadmill/")]
        assert config.replace("%i", instance) in (f"/etc/treadmill/{example}",
                                                  f"/etc/treadmill/supervisor-{instance}.toml")
        paths = re.findall(r'"(/var/lib/[^"]*)"', (ETC / example).read_text())
        assert paths, example
        for path in paths:  # set or commented out
            assert path == state or path.startswith(state + "/"), (example, path, state)


def test_the_manhole_example_of_operations_md_writes_the_state_directory() -> None:
    text = (UNITS.parent / "docs" / "operations.md").read_text()
    start = text.index("```toml\n[manhole]\n") + len("```toml\n")
    manhole = tomllib.loads(text[start:text.index("```", start)])["manhole"]
    (state,) = values(parse(UNITS / "treadmill-switchboard.service"), "StateDirectory")
    assert manhole["host_key"].startswith(f"/var/lib/{state}/")
    sockets = [v.split(":")[1] for v in manhole["listen"] if v.startswith("unix:")]
    assert sockets and all(path.startswith(f"/var/lib/{state}/") for path in sockets)
