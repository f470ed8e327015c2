"""The configured bounds and defaults of the API (``Limits``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Configured bounds and defaults of the API."""

    default_token_ttl: float = 30 * 24 * 3600
    default_timeout: float = 3600
    max_timeout: float = 7 * 24 * 3600
    default_queue_timeout: float = 24 * 3600
    max_queue_timeout: float = 30 * 24 * 3600
    max_hold: float = 24 * 3600  # hold_on_failure (docs/jobs.md)
    reservation_image: str = ""  # what a reservation without an image boots
    max_page: int = 500
    keepalive: float = 15.0
    log_servers: tuple[str, ...] = ()
    log_replicas: int = 2
    log_service: str = "treadmill-logserver"
    log_read_ttl: float = 3600.0
    proxy_service: str = "treadmill-proxy"
    console_token_ttl: float = 300.0
    image_history: int = 50
