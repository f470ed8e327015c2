"""The serial driver: a physical board on a serial port (``docs/serial.md``).

One board per supervisor (the driver in ``driver.py``, its settings in
``settings.py``, the templated commands in ``tools.py``). The driver keeps the
board's console device open (Twisted's ``SerialPort`` on pyserial) from
start-up on, so that it notices the device vanishing even between jobs, and
reopens it (polling with the reactor's clock) when it returns. A job goes:

``starting``
    the device must be present; if the board needs a check (first job, a
    failed health check, a lost device, a job that could not be cleaned up),
    the ``serial.clean.after`` policy and the health check run first, and a
    failure ends the job ``host_start_failure`` — which the switchboard counts
    against the host (``hosts.max_failures`` in a row take it out of service).
``fetching_image``
    the board image's firmware files, symlinked by name into a private
    temporary directory (tools guess formats from file names).
``provisioning``
    power on, ``serial.clean.before``, erase if the image asks, then the flash
    command (the image's ``org.treadmill.flash`` tool as the operator
    configured it, or ``serial.flash.command``), templated with the firmware
    paths, targets, the port and job parameters; its output goes to the job's
    console. The console device is closed meanwhile if ``serial.flash.release_port``.
``booting``
    the console bridge (the ``console`` service) and the agent channel
    (``@@treadmill`` lines on the console, or a second device) start, the
    board is reset, and the job is ``ready`` right away, when the console
    shows ``serial.boot.pattern``, or when the agent says ready
    (``serial.boot.ready``), within ``serial.boot.timeout``.

The agent's ``exit`` ends the job with its status; a ``stop`` halts the board
(power cycle, or reset); either way the driver reports ``terminating``,
restores the clean state (``serial.clean.after``), runs the health check, and
only then reports the job's end, so the host is never handed over dirty. A
failed post-job health check marks the board unhealthy: the next start checks
again and fails ``host_start_failure`` while the check fails.

Device loss (a read error or end of file on the console device) fails the
current job ``host_dropped_job``, keeps the supervisor running, and starts
polling for the device.

Holding (``hold_on_failure``): a held job's failing ``exit`` is reported at once
and the board stays as it is (powered, its console and bridge open); so does a
job the runner ended for ``execution_timeout`` (``hold(job_id)``). ``stop`` ends
the hold: halt, clean and check as after any job. A restart ends a hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadmill.supervisor.drivers.serial.driver import SerialDriver
from treadmill.supervisor.drivers.serial.settings import SETTINGS, SerialSettings

if TYPE_CHECKING:
    from treadmill.supervisor.fetch import ImageFetcher

__all__ = ["SETTINGS", "SerialDriver", "SerialSettings", "make_driver"]


def make_driver(values: dict[str, Any], *, reactor: Any, state_dir: str,
                fetcher: ImageFetcher | None = None) -> SerialDriver:
    """The serial driver of its ``serial.*`` ``values``."""
    return SerialDriver(reactor, SerialSettings.from_values(values), fetcher=fetcher)
