"""Helpers shared by the tests of every area (no fakes: those are in ``tests.fakes``).

- ``waiting``: ``sleep``, ``within`` (a Deferred with a deadline), ``eventually`` (polling).
- ``running``: ``stopping``, a started thing yielded by a fixture and stopped afterwards.
- ``ports``: free loopback ports and port ranges.
- ``certs``: a CA and a server certificate for localhost (``make_pki``).
- ``raw``: raw HTTP over loopback TCP (``raw_connect``, ``raw_request``).
- ``ssh``: SSH client keys, a conch client and OpenSSH exec requests for manholes.
- ``captokens``: a switchboard's capability signing key (``SigningKey``).
- ``daemons``: a role as a ``twistd`` child process; ``run_twistd`` and
  ``refused_config`` for one that should refuse to start; ``run_python``;
  ``bootstrap_admin`` (the first admin's token).
- ``processbed``: a switchboard and a mock supervisor as ``twistd`` processes (``Bed``,
  the ``bed`` fixture) for tests that kill and restart them.
- ``haproxy``: a real HAProxy running ``etc/haproxy/haproxy.cfg`` fitted to loopback
  instances (``HAProxy``, ``balancer_config``, ``HAPROXY``).
- ``metricnames``: the metric tables of docs/operations.md and the families of a scrape.
- ``units``: systemd unit files parsed as systemd reads them.
- ``pgroles``: docs/install.md's least-privileged PostgreSQL role and database, by its SQL.
"""
