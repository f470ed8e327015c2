"""``twistd treadmill-imagestore``: options and service construction."""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import IService

from treadmill.common import keys
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
from treadmill.images.oci import check_store_url
from treadmill.imagestore.auth import anonymous_patterns
from treadmill.imagestore.cache import CacheConfig
from treadmill.imagestore.quota import QuotaConfig, parse_overrides
from treadmill.imagestore.service import DEFAULT_LISTEN, ImageStoreConfig, ImageStoreService

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4, "p": 1024 ** 5}


def _non_negative(value: Any) -> float:
    number = FLOAT(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"expected zero or a positive number, got {number}")
    return number


def byte_size(value: Any) -> int:
    """A number of bytes: an integer, or a string like ``"500G"``, ``"1.5TiB"`` (powers of
    1024)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", value.lower())
        if match is None:
            raise ValueError(f"expected a size such as 1073741824, \"500M\" or \"2T\", "
                             f"got {value!r}")
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    number = INT(value)
    if number < 0:
        raise ValueError(f"expected zero or a positive size, got {number}")
    return number


def _namespace_sizes(value: Any) -> dict[str, int]:
    return parse_overrides(value, byte_size)


def store_urls(value: Any) -> list[str]:
    """A list of image store URLs (``http(s)://HOST[:PORT][/PREFIX]``)."""
    return [check_store_url(url) for url in STRLIST(value)]


def _token_value(value: Any) -> str:
    token = STR(value).strip()
    if not token:
        raise ValueError("empty token")
    return token


class Options(RoleOptions):
    """Settings of the image store (``etc/treadmill/imagestore.toml`` documents them)."""

    settings = (
        Setting("listen", server_endpoints, [DEFAULT_LISTEN],
                "Registry listeners (endpoint descriptions: tcp:, ssl:, unix:, systemd:)."),
        Setting("root", STR, None,
                "Storage directory (blobs, repositories, uploads); see docs/imagestore.md.",
                required=True),
        Setting("service", STR, "treadmill-imagestore",
                "This store's name: the audience (aud) its capability tokens must carry."),
        *keys.SETTINGS,
        Setting("auth.realm", STR, None,
                "Token endpoint clients are sent to on 401, e.g. "
                "https://switchboard.example/api/v1/registry/token."),
        Setting("auth.disabled", BOOL, False,
                "Accept every request without a token (local experiments only)."),
        Setting("anonymous_pull", anonymous_patterns, [],
                "Repositories anyone may pull without a token: true, or glob patterns "
                "(\"demo/*\" one level, \"public/**\" any depth)."),
        Setting("uploads.max_age", positive(FLOAT), 3600.0,
                "Seconds an idle upload session is kept before it is removed."),
        Setting("quota.namespace_bytes", byte_size, 100 * 1024 ** 3,
                "Bytes each user namespace (alice/...) may store, its open uploads "
                "included (\"500G\" works); 0: unlimited."),
        Setting("quota.top_level_bytes", byte_size, 0,
                "Bytes the top-level repositories (the operators') may store together; "
                "0: unlimited."),
        Setting("quota.namespaces", _namespace_sizes, {},
                "Per-namespace overrides of quota.namespace_bytes: a table "
                "namespace = size (on the command line: alice=500G,ci=0).", table=True),
        Setting("quota.uploads_per_subject", non_negative(INT), 16,
                "Open upload sessions one token subject (user or host) may have; 0: any."),
        Setting("manifests.max_size", positive(INT), 4 * 1024 * 1024,
                "Largest manifest accepted, in bytes."),
        Setting("gc.interval", _non_negative, 3600.0,
                "Seconds between garbage collections; 0 runs them only on demand."),
        Setting("gc.grace", _non_negative, 3600.0,
                "Seconds a newly uploaded, mounted or HEAD-checked blob is safe from "
                "garbage collection while no manifest references it."),
        Setting("http.access_log", BOOL, True, "Log one line per HTTP request."),
        Setting("io_threads", positive(INT), 8, "Threads for disk work."),
        # -- the image cache (etc/treadmill/imagecache.toml documents them) --
        Setting("cache.enabled", BOOL, False,
                "Run as an image cache: pull through from cache.upstreams, leases, eviction, "
                "replication."),
        Setting("cache.upstreams", store_urls, [],
                "Upstream image stores, tried in order (https://store-1.example, ...)."),
        Setting("cache.max_bytes", byte_size, 0,
                "Evict least recently used unleased blobs beyond this many bytes "
                "(\"500G\" works); 0: no bound."),
        Setting("cache.upstream_token", _token_value, None,
                "A bearer capability token sent as is to the upstreams (tests, fixed setups)."),
        Setting("cache.upstream_user", STR, None,
                "User name for the upstreams' token flow (with cache.upstream_token_file)."),
        Setting("cache.upstream_token_file", STR, None,
                "File holding that user's API token (read at each token request)."),
        Setting("cache.upstream_realms", STRLIST, [],
                "Token services (URL prefixes) the upstream credentials may be sent to; "
                "default: auth.realm."),
        Setting("cache.upstream_ca_file", STR, None, "CA certificates for https upstreams."),
        Setting("cache.upstream_timeout", positive(FLOAT), 60.0,
                "Seconds without progress before an upstream request fails."),
        Setting("cache.upstream_retries", positive(INT), 2,
                "Attempts per upstream before trying the next one."),
        Setting("cache.retry_after", positive(INT), 10,
                "Retry-After (seconds) of a 503 when no upstream can be reached."),
        Setting("cache.tag_refresh", _non_negative, 300.0,
                "Seconds before a cached tag is checked against the upstreams again "
                "(0: on every request)."),
        Setting("cache.lease_default", positive(FLOAT), 3600.0,
                "Seconds a lease lasts when the request gives no ttl."),
        Setting("cache.lease_max", positive(FLOAT), 7 * 86400.0,
                "The longest lease granted, in seconds (longer ttls are shortened)."),
        Setting("cache.maintenance_interval", _non_negative, 60.0,
                "Seconds between lease expiry, last-use index flushes and eviction runs "
                "(eviction also runs after commits that cross the bound); 0: never."),
        Setting("replicate.token", _token_value, None,
                "A bearer token sent as is to replication targets."),
        Setting("replicate.user", STR, None,
                "User name for the replication targets' token flow (with "
                "replicate.token_file)."),
        Setting("replicate.token_file", STR, None, "File holding that user's API token."),
        Setting("replicate.realms", STRLIST, [],
                "Token services (URL prefixes) replication credentials may be sent to; "
                "default: auth.realm."),
        Setting("replicate.ca_file", STR, None, "CA certificates for https targets."),
        Setting("replicate.targets", store_urls, [],
                "Stores (URL prefixes) the cache may replicate to; empty: any."),
        Setting("replicate.chunk_size", positive(byte_size), 8 * 1024 * 1024,
                "Blobs larger than this are uploaded in chunks of this size."),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        self._check_cache(values, source)
        if values["auth.disabled"]:
            return
        keys.require_keys(values, source, "or auth.disabled = true for a local experiment")
        if not values["auth.realm"]:
            raise ConfigError("set auth.realm, the token endpoint registry clients are sent "
                              "to", key="auth.realm", source=source)


    @staticmethod
    def _check_cache(values: dict[str, Any], source: str) -> None:
        for token, user, token_file in (
                ("cache.upstream_token", "cache.upstream_user", "cache.upstream_token_file"),
                ("replicate.token", "replicate.user", "replicate.token_file")):
            if bool(values[user]) != bool(values[token_file]):
                raise ConfigError(f"set both {user} and {token_file}, or neither",
                                  key=token_file if values[user] else user, source=source)
            if values[user] and values[token]:
                raise ConfigError(f"set either {token} or {user} and {token_file}, not both",
                                  key=token, source=source)
        if not values["cache.enabled"]:
            return
        if not values["cache.upstreams"]:
            raise ConfigError("a cache needs at least one upstream store", key="cache.upstreams",
                              source=source)


def cache_config_from(values: dict[str, Any]) -> CacheConfig | None:
    """The :class:`CacheConfig` of parsed option values (None unless cache.enabled)."""
    if not values.get("cache.enabled"):
        return None
    return CacheConfig(
        upstreams=values["cache.upstreams"], max_bytes=values["cache.max_bytes"],
        upstream_token=values["cache.upstream_token"],
        upstream_user=values["cache.upstream_user"],
        upstream_token_file=values["cache.upstream_token_file"],
        upstream_realms=values["cache.upstream_realms"],
        upstream_ca_file=values["cache.upstream_ca_file"],
        upstream_timeout=values["cache.upstream_timeout"],
        upstream_retries=values["cache.upstream_retries"],
        retry_after=values["cache.retry_after"], tag_refresh=values["cache.tag_refresh"],
        lease_default=values["cache.lease_default"], lease_max=values["cache.lease_max"],
        maintenance_interval=values["cache.maintenance_interval"],
        replicate_token=values["replicate.token"], replicate_user=values["replicate.user"],
        replicate_token_file=values["replicate.token_file"],
        replicate_realms=values["replicate.realms"],
        replicate_ca_file=values["replicate.ca_file"],
        replicate_targets=values["replicate.targets"],
        replicate_chunk_size=values["replicate.chunk_size"])


def config_from(values: dict[str, Any]) -> ImageStoreConfig:
    """An :class:`ImageStoreConfig` from parsed option values."""
    return ImageStoreConfig(
        root=values["root"], listen=values["listen"], service=values["service"],
        keys_url=values["auth.keys_url"], keys_file=values["auth.keys_file"],
        keys_refresh=values["auth.keys_refresh"], issuer=values["auth.issuer"],
        ca_file=values["auth.ca_file"], realm=values["auth.realm"],
        auth_disabled=values["auth.disabled"], anonymous_pull=values["anonymous_pull"],
        upload_max_age=values["uploads.max_age"],
        manifest_max_size=values["manifests.max_size"], gc_interval=values["gc.interval"],
        gc_grace=values["gc.grace"], access_log=values["http.access_log"],
        io_threads=values["io_threads"], cache=cache_config_from(values),
        quota=QuotaConfig(namespace_bytes=values["quota.namespace_bytes"],
                          top_level_bytes=values["quota.top_level_bytes"],
                          namespaces=values["quota.namespaces"],
                          uploads_per_subject=values["quota.uploads_per_subject"]))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = ImageStoreService(reactor, config_from(options.values))
    service.exit_on_failure = True
    add_operator_services(reactor, service, options.values, service.namespace(),
                          service.metrics.registry)
    return service
