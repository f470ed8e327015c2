"""Host drivers: what a supervisor uses to run a job on its host.

A driver implements :class:`IHostDriver` and reports what happens to a job
through the :class:`IJobReporter` it is given with the job. The runner
(``treadmill/supervisor/runner.py``) turns those reports into journaled
``job_event`` messages, so a driver never talks to the switchboard and never
touches the state directory. ``docs/supervisor.md`` describes the contract
for authors of new drivers. The drivers: ``mock.py`` (a simulated host),
``qemu/`` (a VM per job) and ``serial/`` (a board on a serial port);
``single.py`` holds the one-job-at-a-time bookkeeping of the mock and qemu drivers.
All three hold a failed job's host when asked (``holds``, ``hold``, ``adopt_held``:
``docs/supervisor.md``, Holding).

Rules every driver follows:

- ``start`` either accepts the job (its Deferred fires) or refuses it
  (:class:`StartRefused`) *before* reporting anything about it. Reports made
  before ``start``'s Deferred fires are held by the runner and dropped if the
  start is refused.
- After an accepted start the driver reports the job's progress and ends it
  with exactly one of ``exited``, ``failed`` or ``stopped``. Reports about a
  job that already ended are ignored.
- Stages only move forward (``STAGES`` order); any may be skipped.
- All timing uses the reactor given to the driver (``IReactorTime``), so tests
  can drive it with a ``Clock``.
- Settings: :func:`make_driver` hands a driver only its own ``NAME.*`` values
  and the supervisor's state directory, never the whole configuration.
- Images: :func:`make_driver` hands every driver the supervisor's
  :class:`~treadmill.supervisor.fetch.ImageFetcher` (``fetcher=``, an
  :class:`~treadmill.supervisor.fetch.IImageFetcher`; possibly ``None`` in tests).
  In its ``fetching_image`` stage a driver awaits ``fetcher.fetch(job["image"])``
  (a :class:`~treadmill.supervisor.fetch.FetchedImage`: the parsed image and a
  read-only path per layer), ends the job with
  ``failed("image_error", error.message)`` on an ``ImageFetchError``, and
  calls ``fetcher.release(fetched)`` when the job ends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from treadmill.supervisor.fetch import ImageFetcher

__all__ = ["DRIVER_MODULES", "REASONS", "SNAPSHOT_ERRORS", "STAGES", "IHostDriver",
           "IHostSnapshots", "IJobReporter", "SnapshotError", "StartRefused", "driver_module",
           "make_driver"]

# The stages of ``initializing``, in order (docs/jobs.md).
STAGES = ("starting", "fetching_image", "allocating", "provisioning", "booting")

# Termination reasons of protocol v1 (the schema's ``Reason``).
REASONS = ("workload_exited", "user_terminated", "queue_timeout", "execution_timeout",
           "image_error", "host_start_failure", "host_dropped_job", "host_unreachable",
           "internal_error")

# Codes a driver may refuse a start with (``ack`` error codes of ``start_job``).
REFUSALS = ("image_not_found", "image_invalid", "bad_request", "internal_error")


class StartRefused(Exception):
    """A driver does not accept a job: the ``start_job`` is acked with this error."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code if code in REFUSALS else "internal_error"
        self.message = message


class IJobReporter(Interface):
    """How a driver tells the supervisor what happens to the job it runs.

    Each method is about the job the reporter was given with; none returns
    anything or raises. The runner journals and sends each change.
    """

    def stage(name: str) -> None:
        """The job is ``initializing`` and reached stage ``name`` (one of ``STAGES``)."""

    def ready() -> None:
        """The workload runs; the host is the user's."""

    def terminating(reason: str | None = None) -> None:
        """The host is cleaning up. ``reason`` defaults to the stop's reason, if a
        stop is under way, else ``workload_exited``."""

    def exited(exit_status: int, message: str = "") -> None:
        """The workload finished by itself: ``terminated``, ``workload_exited``."""

    def failed(reason: str, message: str = "") -> None:
        """The job ended because of the host or the image: ``terminated`` with
        ``reason`` (``host_start_failure``, ``image_error``, ``host_dropped_job``,
        ``internal_error``)."""

    def stopped(reason: str, message: str = "") -> None:
        """A ``stop`` finished: ``terminated`` with the stop's ``reason``."""

    def console(data: bytes) -> None:
        """Output of the host's console."""

    def services(services: dict[str, tuple[str, int]]) -> None:
        """The host's services that users may reach, as ``{name: (host, port)}``
        supervisor-local TCP endpoints (e.g. ``{"ssh": ("127.0.0.1", 40022)}``):
        the whole current set, reported again whenever it changes. The
        supervisor publishes them on the job's rendezvous proxies. Names are
        ``[a-z][a-z0-9_-]{0,31}``; ``ssh`` is what ``tml job ssh`` uses,
        ``console`` a console bridge. A service that authenticates its users
        itself (an SSH server) is ``(host, port, True)``: only those get public
        ports; the others are reachable only with a console token for the job."""

    def result(message: dict[str, Any]) -> None:
        """The agent's ``test_case`` or ``summary`` message (validated by
        ``treadmill.protocol.agent``): a line of the job's results (docs/results.md)."""

    def ssh_host_keys(keys: list[str]) -> None:
        """The guest's SSH host public keys (``TYPE BASE64`` lines), as its agent
        reported them; the switchboard shows them for host-key checking."""


class IHostDriver(Interface):
    """One host, run for one job at a time."""

    name = Attribute("The driver's name (the ``driver`` setting).")
    kinds = Attribute("The image kinds (``docs/images.md``) the driver runs, a tuple, or "
                      "None for any kind; reported in ``status.kinds`` (protocol minor 5).")

    def start(job: dict[str, Any], reporter: IJobReporter) -> Any:
        """Begin running ``job`` (a protocol ``JobStart``). Returns a Deferred that
        fires when the job is accepted, or fails with :class:`StartRefused`
        (``image_not_found``, ``image_invalid``, ``bad_request``,
        ``internal_error``). The runner never starts a second job while one runs."""

    def stop(job_id: str, reason: str) -> Any:
        """Stop the job; returns a Deferred that fires when the stop is under way.
        The driver then reports ``stopped(reason)`` (or ``exited``/``failed`` if
        the job ended another way first). Stopping a job that is not running, or
        is already stopping, is harmless."""

    def adopt(job: dict[str, Any], reporter: IJobReporter) -> bool:
        """After a supervisor restart: take over ``job`` if the host still runs it
        and report through ``reporter`` from now on. ``False`` if it cannot; the
        runner then ends the job with ``host_dropped_job``."""

    def shutdown() -> Any:
        """The supervisor process stops (the job does not): release in-process
        resources and report nothing more. Returns a Deferred (or None)."""


DRIVER_MODULES = {
    "mock": "treadmill.supervisor.drivers.mock",
    "qemu": "treadmill.supervisor.drivers.qemu",
    "serial": "treadmill.supervisor.drivers.serial",
}
"""Driver name → module. A driver module defines ``SETTINGS`` (its ``NAME.*``
config settings, a tuple of :class:`~treadmill.common.config.Setting`) and
``make_driver(values, *, reactor, state_dir, fetcher)``: ``values`` holds its own
checked ``NAME.*`` values, keyed as in the file (a missing key takes its default);
a driver never sees the rest of the supervisor's configuration."""


SNAPSHOT_ERRORS = ("not_supported", "unknown_job", "failed")


class SnapshotError(Exception):
    """A snapshot could not be made: ``code`` is one of ``SNAPSHOT_ERRORS``."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code if code in SNAPSHOT_ERRORS else "failed"
        self.message = message


class IHostSnapshots(Interface):
    """Optional: a driver that can turn an ended job's disk into a new image."""

    def snapshot(job_id: str, repository: str, store: str) -> Any:
        """Upload the disk that job ``job_id`` left behind as a new image in
        ``repository`` on the image store ``store`` (its base URL), on top of the
        job's own image; returns a Deferred firing with the new manifest's digest,
        or failing with :class:`SnapshotError` (``unknown_job``: the disk is no
        longer kept; ``failed``: the upload or the build failed). Calling it again
        for the same job and repository while an upload runs joins that upload."""


def driver_module(name: str) -> Any:
    """The module of the driver called ``name``."""
    try:
        module = DRIVER_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown host driver {name!r}") from None
    return importlib.import_module(module)


def make_driver(name: str, values: dict[str, Any], *, reactor: Any, state_dir: str,
                fetcher: ImageFetcher | None = None) -> IHostDriver:
    """The driver called ``name``, from its own ``values`` (``NAME.*`` keys); ``state_dir``
    is the supervisor's state directory (where a driver keeps its files by default),
    ``fetcher`` fetches jobs' images for it."""
    return driver_module(name).make_driver(values, reactor=reactor, state_dir=state_dir,
                                           fetcher=fetcher)
