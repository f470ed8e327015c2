"""``twistd treadmill-switchboard``: options and service construction."""

from __future__ import annotations

import argparse
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
    Row,
    check_order,
    http_settings,
    non_negative,
    positive,
    table,
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
        *table("database", "{leaf}",
               dsn=Row(
                   STR, "libpq connection string of the PostgreSQL database.", default=None,
                   required=True),
               pool_size=Row(positive(INT), "Connections in the pool."),
               statement_timeout=Row(
                   non_negative(FLOAT), "Seconds a statement may run before the server cancels it "
                   "(0: no limit).", field="timeouts.statement"),
               lock_timeout=Row(
                   non_negative(FLOAT), "Seconds a statement may wait for a lock (0: no limit).",
                   field="timeouts.lock"),
               idle_in_transaction_timeout=Row(
                   non_negative(FLOAT), "Seconds a connection may sit idle inside a transaction "
                   "before the server ends it (0: no limit).",
                   field="timeouts.idle_in_transaction")),
        *table("supervisors", "links.{leaf}",
               reconcile_retry=Row(
                   positive(FLOAT), "Seconds before a failed reconciliation of a host is tried "
                   "again."),
               ping_interval=Row(
                   positive(FLOAT), "Seconds between WebSocket pings on supervisor links."),
               ping_timeout=Row(
                   positive(FLOAT), "Seconds without a pong before a supervisor link counts as "
                   "dead."),
               reconcile_interval=Row(
                   positive(FLOAT), "Seconds between reconciliations of each connected host."),
               unreachable_after=Row(
                   positive(FLOAT), "Seconds a host with an active job may stay disconnected "
                   "before the job ends as host_unreachable."),
               max_handshakes=Row(
                   positive(INT), "Supervisor link handshakes (upgrade to first "
                   "reconciliation) under way at once; beyond them an upgrade waits for a "
                   "slot (handshake_queue)."),
               handshake_queue=Row(
                   non_negative(INT), "Link upgrades that may wait (FIFO, held open) for a "
                   "handshake slot; beyond them an upgrade is refused with 503 and "
                   "Retry-After, and the supervisor retries with backoff. 0: no queue."),
               handshake_wait=Row(
                   non_negative(FLOAT, finite=True), "Seconds an upgrade may wait for a "
                   "handshake slot before it is refused with 503 (keep it well below the "
                   "supervisors' heartbeat.timeout). 0: no queue.")),
        *table("", "{leaf}",
               instance=Row(
                   STR, "Name of this switchboard instance (default: hostname:pid).",
                   default=None)),
        *table("capabilities", "{leaf}",
               signing_key=Row(
                   STR, "Ed25519 private key (PEM) that signs capability tokens; created if "
                   "absent."),
               adopt_key=Row(
                   BOOL, "Record this instance's signing key as the one every instance must use "
                   "(key rotation, docs/operations.md); otherwise a different key refuses to "
                   "start.", field="adopt_signing_key"),
               issuer=Row(STR, "Issuer (iss) of capability tokens.")),
        *table("http", "{leaf}",
               max_body=Row(positive(INT), "Largest request body in bytes.")),
        *table("auth", None,
               cache_ttl=Row(
                   FLOAT, "Seconds a refused API token is remembered (accepted tokens are read "
                   "from the database on every request, so revocations hold at once everywhere).",
                   field="auth_cache_ttl")),
        *table("login", "passwords.{leaf}",
               address_rate=Row(
                   positive(FLOAT), "Password attempts per second a client address regains "
                   "(login, HTTP Basic)."),
               address_burst=Row(
                   positive(INT), "Password attempts a client address may make at once; then 429."),
               user_rate=Row(positive(FLOAT), "Password attempts per second a user name regains."),
               user_burst=Row(
                   positive(INT), "Password attempts on one user name at once; then 429."),
               table_size=Row(
                   positive(INT), "Client addresses and user names the rate limits remember (each "
                   "table)."),
               max_hashing=Row(
                   positive(INT), "Password hashes computed at once (32 MiB each); others wait."),
               hashing_queue=Row(
                   INT, "Password checks that may wait for a hashing slot; beyond them, 503."),
               trusted_proxies=Row(
                   STRLIST, "Addresses of reverse proxies whose X-Forwarded-For names the client.",
                   default=[], convert=tuple)),
        *table("tokens", None,
               default_ttl=Row(
                   positive(FLOAT), "Lifetime of new API tokens without expires_in, in seconds.",
                   field="limits.default_token_ttl")),
        *table("jobs", "limits.{leaf}",
               default_timeout=Row(
                   positive(FLOAT), "Execution timeout of jobs that name none, in seconds."),
               max_timeout=Row(
                   positive(FLOAT), "Largest execution timeout a job may ask for, in seconds."),
               default_queue_timeout=Row(
                   positive(FLOAT), "Time a job may wait in the queue unless it says otherwise, "
                   "in seconds."),
               max_queue_timeout=Row(
                   positive(FLOAT), "Largest queue timeout a job may ask for, in seconds."),
               max_hold=Row(
                   positive(FLOAT), "Longest hold_on_failure a job may ask for, in seconds."),
               reservation_image=Row(
                   STR, "The image a reservation that names none boots (a catalogue name or "
                   "sha256 digest its users may use); empty: a reservation must name one."),
               timeout_interval=Row(
                   positive(FLOAT), "How often timeouts are checked, in seconds.",
                   field="timeout_interval")),
        *table("scheduler", "{leaf}",
               interval=Row(
                   positive(FLOAT), "Seconds between scheduling passes when no notification wakes "
                   "one.", field="scheduler_interval"),
               fairness_window=Row(
                   positive(FLOAT), "Seconds of recent assignments that count towards a user's "
                   "share."),
               unrunnable_grace=Row(
                   FLOAT, "Seconds a queued job that no host could ever run waits before it "
                   "expires.")),
        *table("images", None,
               history=Row(
                   positive(INT), "Versions of each catalogue image kept (a new digest is a new "
                   "version).", field="limits.image_history")),
        *table("audit", None,
               retention=Row(
                   non_negative(FLOAT), "Days audit records are kept (0: for ever); the leader "
                   "deletes older ones hourly.", field="audit_retention")),
        *table("hosts", "{leaf}",
               max_failures=Row(
                   positive(INT), "Consecutive failures blamed on a host that run its health "
                   "check (or, with none set, take it out of service).", field="max_host_failures"),
               health_interval=Row(
                   positive(FLOAT), "Seconds between the leader's passes that start health checks "
                   "due by the clock and write queued jobs' state messages.")),
        *table("logs", "limits.log_{leaf}",
               servers=Row(
                   STRLIST, "Log server base URLs (http(s)://host:port); jobs ship logs to some "
                   "of them.", default=[], convert=_base_urls),
               replicas=Row(positive(INT), "How many of logs.servers hold each job's logs."),
               service=Row(STR, "The log servers' service name (the audience of their tokens).")),
        *table("proxies", "proxy_{leaf}",
               servers=Row(
                   STRLIST, "Rendezvous proxy control URLs; every job's services are published on "
                   "each.", default=[], field="proxies", convert=_base_urls),
               service=Row(
                   STR, "The proxies' service name (the audience of their publish tokens).")),
        *table("instances", "{leaf}",
               heartbeat_interval=Row(
                   positive(FLOAT), "Seconds between this instance's heartbeats in the database "
                   "(an instance silent for 5 s counts as dead)."),
               rebalance_interval=Row(
                   positive(FLOAT), "Seconds between closing a few supervisor links when this "
                   "instance holds more than its share.")),
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


def database_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--database-dsn``, for the command-line tools beside the daemon
    (:func:`parsed_dsn`)."""
    parser.add_argument("--config", help="switchboard TOML configuration")
    parser.add_argument("--database-dsn",
                        help="overrides database.dsn of the configuration (put passwords "
                             "in ~/.pgpass or PGPASSFILE, not here)")


def parsed_dsn(parser: argparse.ArgumentParser, args: argparse.Namespace, tool: str) -> str:
    """The ``database.dsn`` that :func:`database_arguments` name; exits 2 with a message
    starting ``tool:`` if the configuration is wrong."""
    try:
        return database_dsn(args.config, args.database_dsn)
    except ConfigError as e:
        parser.exit(2, f"{tool}: {e}\n")


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
