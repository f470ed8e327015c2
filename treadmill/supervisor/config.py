"""The supervisor's configuration: :class:`SupervisorConfig`, built by ``tap.config_from``
(or by tests and the fleet directly)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from treadmill.supervisor.blobcache import DEFAULT_LOCAL_LIMIT
from treadmill.supervisor.fetch import ImageFetcher, http_url_for

__all__ = ["SupervisorConfig"]


@dataclass
class SupervisorConfig:
    """Everything a supervisor needs, already validated (``tap.config_from``)."""

    url: str  # ws:// or wss:// base URL of the switchboard
    token: str  # the host token
    state_dir: str
    driver: str = "mock"
    ca_file: str | None = None
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 10.0
    console_buffer: int = 64 * 1024
    flush_timeout: float = 2.0
    event_ack_timeout: float = 5.0  # an unacknowledged job event is sent again after this
    event_resend_max: float = 60.0  # the longest pause between sends of one event
    durable: bool = True  # fsync the state directory
    name: str = "supervisor"  # shown in log lines (the fleet uses host names)
    log_spool_limit: int = 64 * 1024 * 1024  # bytes of unshipped log output per job
    images_cache_mount: str | None = None  # read-only root of a site image cache
    images_cache_url: str | None = None  # that cache's HTTP(S) base URL: leases
    images_dir: str | None = None  # default: <state_dir>/images
    images_local_limit: int = DEFAULT_LOCAL_LIMIT  # bytes kept in images_dir
    images_trusted_realms: list[str] = field(default_factory=list)  # default: the switchboard
    images_ca_file: str | None = None  # default: ca_file
    proxies_ca_file: str | None = None  # default: ca_file
    # The driver's own settings: every checked ``DRIVER.*`` value, keyed as in the
    # file (``mock.run_time``, ``qemu.binary``); missing keys take their defaults.
    driver_values: dict[str, Any] = field(default_factory=dict)

    def image_fetcher(self, reactor: Any) -> ImageFetcher:
        """The :class:`ImageFetcher` these settings describe (cheap: no I/O until used)."""
        return ImageFetcher(
            reactor, cache_mount=self.images_cache_mount, cache_url=self.images_cache_url,
            local_dir=self.images_dir or os.path.join(self.state_dir, "images"),
            token=self.token, ca_file=self.images_ca_file or self.ca_file,
            trusted_realms=self.images_trusted_realms or [http_url_for(self.url)],
            local_limit=self.images_local_limit, label=self.name,
            switchboard=http_url_for(self.url))

    def __repr__(self) -> str:  # never show the token
        return (f"SupervisorConfig(url={self.url!r}, state_dir={self.state_dir!r}, "
                f"driver={self.driver!r}, name={self.name!r})")
