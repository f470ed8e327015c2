"""The Treadmill image store: an OCI Distribution registry (``treadmill-imagestore``).

Modules, from the bottom up:

- :mod:`~treadmill.imagestore.names`: repository names, tags, digests (validation).
- :mod:`~treadmill.imagestore.errors`: the OCI error shape and codes.
- :mod:`~treadmill.imagestore.storage`: the on-disk layout (stable; read over NFS).
- :mod:`~treadmill.imagestore.manifests`: manifest media types, checks, references.
- :mod:`~treadmill.imagestore.uploads`: upload sessions, streamed bodies, commits.
- :mod:`~treadmill.imagestore.quota`: namespace byte quotas.
- :mod:`~treadmill.imagestore.sending`: serving blob bytes with backpressure.
- :mod:`~treadmill.imagestore.gc`: garbage collection of unreferenced blobs.
- :mod:`~treadmill.imagestore.auth`: capability tokens and the registry token challenge.
- :mod:`~treadmill.imagestore.api`: the HTTP API (Klein).
- :mod:`~treadmill.imagestore.site`: the HTTP site, whose requests stream upload bodies to disk.
- :mod:`~treadmill.imagestore.metrics`: the Prometheus metrics.
- :mod:`~treadmill.imagestore.settings`: the settings of ``settings.toml`` (with the types
  and groups it names), which the ``tap`` and ``CacheConfig`` are made from.
- :mod:`~treadmill.imagestore.service`, :mod:`~treadmill.imagestore.tap`: the daemon.

The image cache (``cache.enabled``): :mod:`~treadmill.imagestore.cache` (last
use, pins, eviction, lease state), :mod:`~treadmill.imagestore.pullthrough`
(fetching from upstreams), :mod:`~treadmill.imagestore.leases`,
:mod:`~treadmill.imagestore.replicate`, :mod:`~treadmill.imagestore.cache_api`,
:mod:`~treadmill.imagestore.modes` (what the OCI routes do differently in a cache).

See ``docs/imagestore.md``.
"""
