"""The ``qemu`` host driver: each job boots in a fresh QEMU VM (``docs/qemu.md``).

A job goes through:

- ``fetching_image``: the supervisor's :class:`~treadmill.supervisor.fetch.ImageFetcher`
  fetches and verifies the image (``image_error`` if it cannot);
- ``allocating``: a work directory ``qemu.work_dir/JOB`` and a free loopback
  port for the guest's SSH port;
- ``provisioning``: ``qemu-img create`` of a writable qcow2 overlay on the
  image's top layer; the read-only chain below is wired node by node from the
  manifest's digests (``-blockdev`` with explicit ``backing``), never from the
  qcow2 files' own backing-file fields; the accelerator is chosen
  (``qemu.accel``; ``auto`` probes KVM once per process, see ``accel.py``);
- ``booting``: QEMU starts paused; the driver connects to its QMP, serial
  console and agent sockets (UNIX sockets in the work directory), then lets
  the guest run;
- ``ready``: when the in-guest agent says ``ready`` (``qemu.ready = agent``),
  or as soon as the guest runs (``qemu.ready = boot``).

The agent's ``exit`` ends the job (``workload_exited``) after the VM is shut
down; QEMU ending on its own first is ``host_dropped_job`` (before the guest
ran: ``host_start_failure``), with the tail of QEMU's output. A stop powers
the guest off (``system_powerdown``; ``quit`` after ``qemu.shutdown_timeout``;
SIGKILL after ``qemu.quit_timeout``). Every end leaves no QEMU process and
removes the work directory (sockets, log), after moving the overlay to
``qemu.kept_dir`` for snapshots (``snapshot.py``: the last ``qemu.keep_disks``
disks, for ``qemu.keep_time`` seconds). ``snapshot()`` (``IHostSnapshots``)
pushes a kept disk as a new image. ``shutdown()`` leaves the VM running;
``adopt()`` re-attaches to it after a restart (a QEMU alive but out of reach is
killed, never left running).

Holding (``hold_on_failure``): a held job's failing ``exit`` keeps the VM running
(console, forwarded ports, agent) unless the guest powers itself off within
``HOLD_SETTLE`` seconds (then nothing is held, and the job's message says so);
``hold(job_id)`` keeps the VM of a job the runner ended for ``execution_timeout``;
``stop`` ends the hold with the usual teardown; ``adopt_held()`` re-adopts a held
VM after a restart.

Modules: ``driver`` (the driver), ``settings`` (``qemu.*``), ``command`` (QEMU and
qemu-img command lines), ``process`` (short child processes), ``qmp`` (the QMP client),
``accel`` (the accelerator), ``snapshot`` (kept disks and snapshots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadmill.supervisor.drivers.qemu.accel import AccelChooser
from treadmill.supervisor.drivers.qemu.driver import QemuDriver
from treadmill.supervisor.drivers.qemu.settings import SETTINGS, QemuSettings

if TYPE_CHECKING:
    from treadmill.supervisor.fetch import ImageFetcher

__all__ = ["SETTINGS", "AccelChooser", "QemuDriver", "QemuSettings", "make_driver"]


def make_driver(values: dict[str, Any], *, reactor: Any, state_dir: str,
                fetcher: ImageFetcher | None = None) -> QemuDriver:
    """The QEMU driver of its ``qemu.*`` ``values`` (directories default under ``state_dir``)."""
    settings = QemuSettings.from_values(values, state_dir)
    return QemuDriver(reactor, settings, fetcher=fetcher)
