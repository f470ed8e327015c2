"""Helpers shared by the tests of every area (no fakes: those are in ``tests.fakes``).

- ``waiting``: ``sleep``, ``within`` (a Deferred with a deadline), ``eventually`` (polling).
- ``ports``: free loopback ports and port ranges.
- ``certs``: a CA and a server certificate for localhost (``make_pki``).
- ``daemons``: a role as a ``twistd`` child process, ``run_python``.
- ``pgroles``: docs/install.md's least-privileged PostgreSQL role and database, by its SQL.
"""
