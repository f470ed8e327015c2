"""``twistd treadmill-switchboard``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common.captoken import MAX_TTL
from treadmill.common.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    STRLIST,
    ConfigError,
    RoleOptions,
    Setting,
    non_negative,
    positive,
    server_endpoints,
)
from treadmill.common.daemon import add_operator_services
from treadmill.switchboard.api import Limits
from treadmill.switchboard.auth import PasswordPolicy
from treadmill.switchboard.database import Timeouts
from treadmill.switchboard.service import SwitchboardConfig, SwitchboardService

DAY = 24 * 3600.0


class Options(RoleOptions):
    """Settings of the switchboard (``etc/treadmill/switchboard.toml`` documents them)."""

    settings = (
        Setting("listen", server_endpoints, ["tcp:8080:interface=127.0.0.1"],
                "API listeners (endpoint descriptions: tcp:, ssl:, unix:, systemd:)."),
        Setting("database.dsn", STR, None,
                "libpq connection string of the PostgreSQL database.", required=True),
        Setting("database.pool_size", positive(INT), 4, "Connections in the pool."),
        Setting("database.statement_timeout", non_negative(FLOAT), 10.0,
                "Seconds a statement may run before the server cancels it (0: no limit)."),
        Setting("database.lock_timeout", non_negative(FLOAT), 5.0,
                "Seconds a statement may wait for a lock (0: no limit)."),
        Setting("database.idle_in_transaction_timeout", non_negative(FLOAT), 10.0,
                "Seconds a connection may sit idle inside a transaction before the server "
                "ends it (0: no limit)."),
        Setting("supervisors.reconcile_retry", positive(FLOAT), 2.0,
                "Seconds before a failed reconciliation of a host is tried again."),
        Setting("instance", STR, None,
                "Name of this switchboard instance (default: hostname:pid)."),
        Setting("capabilities.signing_key", STR,
                "/var/lib/treadmill-switchboard/capability-key.pem",
                "Ed25519 private key (PEM) that signs capability tokens; created if absent."),
        Setting("capabilities.adopt_key", BOOL, False,
                "Record this instance's signing key as the one every instance must use "
                "(key rotation, docs/operations.md); otherwise a different key refuses to "
                "start."),
        Setting("capabilities.issuer", STR, "treadmill", "Issuer (iss) of capability tokens."),
        Setting("http.max_body", positive(INT), 64 * 1024, "Largest request body in bytes."),
        Setting("http.access_log", BOOL, True, "Log one line per HTTP request."),
        Setting("auth.cache_ttl", FLOAT, 5.0,
                "Seconds a refused API token is remembered (accepted tokens are read from "
                "the database on every request, so revocations hold at once everywhere)."),
        Setting("login.address_rate", positive(FLOAT), 0.2,
                "Password attempts per second a client address regains (login, HTTP Basic)."),
        Setting("login.address_burst", positive(INT), 20,
                "Password attempts a client address may make at once; then 429."),
        Setting("login.user_rate", positive(FLOAT), 0.05,
                "Password attempts per second a user name regains."),
        Setting("login.user_burst", positive(INT), 10,
                "Password attempts on one user name at once; then 429."),
        Setting("login.table_size", positive(INT), 10000,
                "Client addresses and user names the rate limits remember (each table)."),
        Setting("login.max_hashing", positive(INT), 2,
                "Password hashes computed at once (32 MiB each); others wait."),
        Setting("login.hashing_queue", INT, 16,
                "Password checks that may wait for a hashing slot; beyond them, 503."),
        Setting("login.trusted_proxies", STRLIST, [],
                "Addresses of reverse proxies whose X-Forwarded-For names the client."),
        Setting("tokens.default_ttl", positive(FLOAT), 30 * DAY,
                "Lifetime of new API tokens without expires_in, in seconds."),
        Setting("jobs.default_timeout", positive(FLOAT), 3600.0,
                "Execution timeout of jobs that name none, in seconds."),
        Setting("jobs.max_timeout", positive(FLOAT), 7 * DAY,
                "Largest execution timeout a job may ask for, in seconds."),
        Setting("jobs.default_queue_timeout", positive(FLOAT), DAY,
                "Time a job may wait in the queue unless it says otherwise, in seconds."),
        Setting("jobs.max_queue_timeout", positive(FLOAT), 30 * DAY,
                "Largest queue timeout a job may ask for, in seconds."),
        Setting("jobs.timeout_interval", positive(FLOAT), 1.0,
                "How often timeouts are checked, in seconds."),
        Setting("scheduler.interval", positive(FLOAT), 2.0,
                "Seconds between scheduling passes when no notification wakes one."),
        Setting("scheduler.fairness_window", positive(FLOAT), 3600.0,
                "Seconds of recent assignments that count towards a user's share."),
        Setting("scheduler.unrunnable_grace", FLOAT, 30.0,
                "Seconds a queued job that no host could ever run waits before it expires."),
        Setting("images.history", positive(INT), 50,
                "Versions of each catalogue image kept (a new digest is a new version)."),
        Setting("audit.retention", non_negative(FLOAT), 365.0,
                "Days audit records are kept (0: for ever); the leader deletes older ones "
                "hourly."),
        Setting("hosts.max_failures", positive(INT), 3,
                "Consecutive host-side failures that take a host out of service."),
        Setting("supervisors.ping_interval", positive(FLOAT), 5.0,
                "Seconds between WebSocket pings on supervisor links."),
        Setting("supervisors.ping_timeout", positive(FLOAT), 10.0,
                "Seconds without a pong before a supervisor link counts as dead."),
        Setting("supervisors.reconcile_interval", positive(FLOAT), 30.0,
                "Seconds between reconciliations of each connected host."),
        Setting("logs.servers", STRLIST, [],
                "Log server base URLs (http(s)://host:port); jobs ship logs to some of them."),
        Setting("logs.replicas", positive(INT), 2,
                "How many of logs.servers hold each job's logs."),
        Setting("logs.service", STR, "treadmill-logserver",
                "The log servers' service name (the audience of their tokens)."),
        Setting("proxies.servers", STRLIST, [],
                "Rendezvous proxy control URLs; every job's services are published on each."),
        Setting("proxies.service", STR, "treadmill-proxy",
                "The proxies' service name (the audience of their publish tokens)."),
        Setting("supervisors.unreachable_after", positive(FLOAT), 60.0,
                "Seconds a host with an active job may stay disconnected before the job "
                "ends as host_unreachable."),
        Setting("instances.heartbeat_interval", positive(FLOAT), 1.0,
                "Seconds between this instance's heartbeats in the database (an instance "
                "silent for 5 s counts as dead)."),
        Setting("instances.rebalance_interval", positive(FLOAT), 10.0,
                "Seconds between closing a few supervisor links when this instance holds "
                "more than its share."),
    )


    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        for default, limit in (("jobs.default_timeout", "jobs.max_timeout"),
                               ("jobs.default_queue_timeout", "jobs.max_queue_timeout")):
            if values[default] > values[limit]:
                raise ConfigError(f"{default} ({values[default]:g}) exceeds {limit} "
                                  f"({values[limit]:g})", key=default, source=source)
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
    limits = Limits(
        default_token_ttl=values["tokens.default_ttl"],
        default_timeout=values["jobs.default_timeout"],
        max_timeout=values["jobs.max_timeout"],
        default_queue_timeout=values["jobs.default_queue_timeout"],
        max_queue_timeout=values["jobs.max_queue_timeout"],
        log_servers=tuple(url.rstrip("/") for url in values["logs.servers"]),
        log_replicas=values["logs.replicas"], log_service=values["logs.service"],
        image_history=values["images.history"],
    )
    config = SwitchboardConfig(
        dsn=values["database.dsn"], listen=values["listen"],
        signing_key=values["capabilities.signing_key"], issuer=values["capabilities.issuer"],
        pool_size=values["database.pool_size"], max_body=values["http.max_body"],
        timeouts=Timeouts(statement=values["database.statement_timeout"],
                          lock=values["database.lock_timeout"],
                          idle_in_transaction=values["database.idle_in_transaction_timeout"]),
        reconcile_retry=values["supervisors.reconcile_retry"],
        access_log=values["http.access_log"],
        auth_cache_ttl=values["auth.cache_ttl"], timeout_interval=values["jobs.timeout_interval"],
        limits=limits, scheduler_interval=values["scheduler.interval"],
        fairness_window=values["scheduler.fairness_window"],
        unrunnable_grace=values["scheduler.unrunnable_grace"],
        max_host_failures=values["hosts.max_failures"],
        ping_interval=values["supervisors.ping_interval"],
        ping_timeout=values["supervisors.ping_timeout"],
        reconcile_interval=values["supervisors.reconcile_interval"],
        unreachable_after=values["supervisors.unreachable_after"],
        proxies=tuple(url.rstrip("/") for url in values["proxies.servers"]),
        proxy_service=values["proxies.service"],
        adopt_signing_key=values["capabilities.adopt_key"],
        heartbeat_interval=values["instances.heartbeat_interval"],
        rebalance_interval=values["instances.rebalance_interval"],
        audit_retention=values["audit.retention"])
    config.passwords = PasswordPolicy(
        address_rate=values["login.address_rate"], address_burst=values["login.address_burst"],
        user_rate=values["login.user_rate"], user_burst=values["login.user_burst"],
        table_size=values["login.table_size"], max_hashing=values["login.max_hashing"],
        hashing_queue=values["login.hashing_queue"],
        trusted_proxies=tuple(values["login.trusted_proxies"]))
    if values["instance"]:
        config.instance = values["instance"]
    return config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = SwitchboardService(reactor, config_from(options.values))
    service.exit_on_failure = True
    add_operator_services(reactor, service, options.values, service.namespace(),
                          service.metrics.registry)
    return service
