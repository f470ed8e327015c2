"""``twistd treadmill-switchboard``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common.captoken import MAX_TTL
from treadmill.common.config import (
    BOOL,
    FIELD,
    FLOAT,
    INT,
    STR,
    STRLIST,
    ConfigError,
    RoleOptions,
    Setting,
    check_order,
    http_settings,
    non_negative,
    positive,
)
from treadmill.common.daemon import twistd_service
from treadmill.switchboard.service import SwitchboardConfig, SwitchboardService

DAY = 24 * 3600.0


def _base_urls(urls: list[str]) -> tuple[str, ...]:
    return tuple(url.rstrip("/") for url in urls)


class Options(RoleOptions):
    """Settings of the switchboard (``etc/treadmill/switchboard.toml`` documents them)."""

    config = SwitchboardConfig
    settings = (
        *http_settings("API listeners"),
        Setting("database.dsn", STR, None,
                "libpq connection string of the PostgreSQL database.", required=True,
                field="dsn"),
        Setting("database.pool_size", positive(INT), FIELD, "Connections in the pool.",
                field="pool_size"),
        Setting("database.statement_timeout", non_negative(FLOAT), FIELD,
                "Seconds a statement may run before the server cancels it (0: no limit).",
                field="timeouts.statement"),
        Setting("database.lock_timeout", non_negative(FLOAT), FIELD,
                "Seconds a statement may wait for a lock (0: no limit).",
                field="timeouts.lock"),
        Setting("database.idle_in_transaction_timeout", non_negative(FLOAT), FIELD,
                "Seconds a connection may sit idle inside a transaction before the server "
                "ends it (0: no limit).",
                field="timeouts.idle_in_transaction"),
        Setting("supervisors.reconcile_retry", positive(FLOAT), FIELD,
                "Seconds before a failed reconciliation of a host is tried again.",
                field="reconcile_retry"),
        Setting("instance", STR, None,
                "Name of this switchboard instance (default: hostname:pid).",
                field="instance"),
        Setting("capabilities.signing_key", STR,
                FIELD,
                "Ed25519 private key (PEM) that signs capability tokens; created if absent.",
                field="signing_key"),
        Setting("capabilities.adopt_key", BOOL, FIELD,
                "Record this instance's signing key as the one every instance must use "
                "(key rotation, docs/operations.md); otherwise a different key refuses to "
                "start.",
                field="adopt_signing_key"),
        Setting("capabilities.issuer", STR, FIELD, "Issuer (iss) of capability tokens.",
                field="issuer"),
        Setting("http.max_body", positive(INT), FIELD, "Largest request body in bytes.",
                field="max_body"),
        Setting("auth.cache_ttl", FLOAT, FIELD,
                "Seconds a refused API token is remembered (accepted tokens are read from "
                "the database on every request, so revocations hold at once everywhere).",
                field="auth_cache_ttl"),
        Setting("login.address_rate", positive(FLOAT), FIELD,
                "Password attempts per second a client address regains (login, HTTP Basic).",
                field="passwords.address_rate"),
        Setting("login.address_burst", positive(INT), FIELD,
                "Password attempts a client address may make at once; then 429.",
                field="passwords.address_burst"),
        Setting("login.user_rate", positive(FLOAT), FIELD,
                "Password attempts per second a user name regains.",
                field="passwords.user_rate"),
        Setting("login.user_burst", positive(INT), FIELD,
                "Password attempts on one user name at once; then 429.",
                field="passwords.user_burst"),
        Setting("login.table_size", positive(INT), FIELD,
                "Client addresses and user names the rate limits remember (each table).",
                field="passwords.table_size"),
        Setting("login.max_hashing", positive(INT), FIELD,
                "Password hashes computed at once (32 MiB each); others wait.",
                field="passwords.max_hashing"),
        Setting("login.hashing_queue", INT, FIELD,
                "Password checks that may wait for a hashing slot; beyond them, 503.",
                field="passwords.hashing_queue"),
        Setting("login.trusted_proxies", STRLIST, [],
                "Addresses of reverse proxies whose X-Forwarded-For names the client.",
                field="passwords.trusted_proxies", convert=tuple),
        Setting("tokens.default_ttl", positive(FLOAT), FIELD,
                "Lifetime of new API tokens without expires_in, in seconds.",
                field="limits.default_token_ttl"),
        Setting("jobs.default_timeout", positive(FLOAT), FIELD,
                "Execution timeout of jobs that name none, in seconds.",
                field="limits.default_timeout"),
        Setting("jobs.max_timeout", positive(FLOAT), FIELD,
                "Largest execution timeout a job may ask for, in seconds.",
                field="limits.max_timeout"),
        Setting("jobs.default_queue_timeout", positive(FLOAT), FIELD,
                "Time a job may wait in the queue unless it says otherwise, in seconds.",
                field="limits.default_queue_timeout"),
        Setting("jobs.max_queue_timeout", positive(FLOAT), FIELD,
                "Largest queue timeout a job may ask for, in seconds.",
                field="limits.max_queue_timeout"),
        Setting("jobs.max_hold", positive(FLOAT), FIELD,
                "Longest hold_on_failure a job may ask for, in seconds.",
                field="limits.max_hold"),
        Setting("jobs.reservation_image", STR, FIELD,
                "The image a reservation that names none boots (a catalogue name or "
                "sha256 digest its users may use); empty: a reservation must name one.",
                field="limits.reservation_image"),
        Setting("jobs.timeout_interval", positive(FLOAT), FIELD,
                "How often timeouts are checked, in seconds.",
                field="timeout_interval"),
        Setting("scheduler.interval", positive(FLOAT), FIELD,
                "Seconds between scheduling passes when no notification wakes one.",
                field="scheduler_interval"),
        Setting("scheduler.fairness_window", positive(FLOAT), FIELD,
                "Seconds of recent assignments that count towards a user's share.",
                field="fairness_window"),
        Setting("scheduler.unrunnable_grace", FLOAT, FIELD,
                "Seconds a queued job that no host could ever run waits before it expires.",
                field="unrunnable_grace"),
        Setting("images.history", positive(INT), FIELD,
                "Versions of each catalogue image kept (a new digest is a new version).",
                field="limits.image_history"),
        Setting("audit.retention", non_negative(FLOAT), FIELD,
                "Days audit records are kept (0: for ever); the leader deletes older ones "
                "hourly.",
                field="audit_retention"),
        Setting("hosts.max_failures", positive(INT), FIELD,
                "Consecutive failures blamed on a host that run its health check (or, "
                "with none set, take it out of service).",
                field="max_host_failures"),
        Setting("hosts.health_interval", positive(FLOAT), FIELD,
                "Seconds between the leader's passes that start health checks due by the "
                "clock and write queued jobs' state messages.",
                field="health_interval"),
        Setting("supervisors.ping_interval", positive(FLOAT), FIELD,
                "Seconds between WebSocket pings on supervisor links.",
                field="ping_interval"),
        Setting("supervisors.ping_timeout", positive(FLOAT), FIELD,
                "Seconds without a pong before a supervisor link counts as dead.",
                field="ping_timeout"),
        Setting("supervisors.reconcile_interval", positive(FLOAT), FIELD,
                "Seconds between reconciliations of each connected host.",
                field="reconcile_interval"),
        Setting("logs.servers", STRLIST, [],
                "Log server base URLs (http(s)://host:port); jobs ship logs to some of them.",
                field="limits.log_servers", convert=_base_urls),
        Setting("logs.replicas", positive(INT), FIELD,
                "How many of logs.servers hold each job's logs.",
                field="limits.log_replicas"),
        Setting("logs.service", STR, FIELD,
                "The log servers' service name (the audience of their tokens).",
                field="limits.log_service"),
        Setting("proxies.servers", STRLIST, [],
                "Rendezvous proxy control URLs; every job's services are published on each.",
                field="proxies", convert=_base_urls),
        Setting("proxies.service", STR, FIELD,
                "The proxies' service name (the audience of their publish tokens).",
                field="proxy_service"),
        Setting("supervisors.unreachable_after", positive(FLOAT), FIELD,
                "Seconds a host with an active job may stay disconnected before the job "
                "ends as host_unreachable.",
                field="unreachable_after"),
        Setting("instances.heartbeat_interval", positive(FLOAT), FIELD,
                "Seconds between this instance's heartbeats in the database (an instance "
                "silent for 5 s counts as dead).",
                field="heartbeat_interval"),
        Setting("instances.rebalance_interval", positive(FLOAT), FIELD,
                "Seconds between closing a few supervisor links when this instance holds "
                "more than its share.",
                field="rebalance_interval"),
    )


    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        check_order(values, source, ("jobs.default_timeout", "jobs.max_timeout"),
                    ("jobs.default_queue_timeout", "jobs.max_queue_timeout"))
        longest = MAX_TTL - 3600.0  # a job's log write token lives its timeout plus an hour
        if values["jobs.max_timeout"] > longest:
            raise ConfigError(f"jobs.max_timeout ({values['jobs.max_timeout']:g}) exceeds "
                              f"{longest:g} seconds, the longest a job's log write token "
                              "can cover", key="jobs.max_timeout", source=source)
        if values["login.hashing_queue"] < 0:
            raise ConfigError("login.hashing_queue must be 0 or more",
                              key="login.hashing_queue", source=source)


def database_dsn(config: str | None, dsn: str | None) -> str:
    """``database.dsn`` from a configuration file and an override, as the daemon reads it
    (for the command-line tools beside it); raises ``ConfigError``."""
    options = Options()
    flags = []
    if config:
        flags += ["--config", config]
    if dsn:
        flags += ["--database-dsn", dsn]
    options.parseOptions(flags)
    return options.values["database.dsn"]


def config_from(values: dict[str, Any]) -> SwitchboardConfig:
    """A :class:`SwitchboardConfig` from parsed option values."""
    return Options.config_of(values)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return twistd_service(reactor, SwitchboardService(reactor, config_from(options.values)),
                          options.values)
