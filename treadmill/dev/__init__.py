"""Development tooling: not used by the daemons.

Modules: ``pgcluster`` (a private PostgreSQL cluster), ``devstack`` (a whole testbed on
one machine), ``fakeboard`` (a simulated serial board), ``fleet`` (many mock supervisors
in one process, for load tests).
"""
