"""Helpers shared by the tests of every area (no fakes: those are in ``tests.fakes``).

- ``waiting``: ``sleep``, ``within`` (a Deferred with a deadline), ``eventually`` (polling).
- ``ports``: free loopback ports and port ranges.
- ``daemons``: a role as a ``twistd`` child process, ``run_python``.
"""
