"""Treadmill, a distributed testbed: one package per role, and the code they share.

- roles: ``switchboard/`` (users, jobs, scheduling), ``supervisor/`` (one host),
  ``proxy/`` (rendezvous proxy), ``logserver/`` (job logs), ``imagestore/`` (OCI
  registry and image cache), ``cli/`` (the ``tml`` client);
- shared: ``common/`` (the daemon kit), ``protocol/`` (wire contracts between roles),
  ``images/`` (the image format and an OCI client);
- ``web/``: the web console's files (served by the switchboard);
- ``dev/``: development tooling (not used by the daemons).

No role package imports another (``tests/test_layers.py`` checks it).
"""
