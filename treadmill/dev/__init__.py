"""Development tooling, not used by the daemons: ``devstack`` (a whole stack on one
machine), ``pgcluster`` (throw-away PostgreSQL clusters), ``fakeboard`` (a simulated
serial board) and ``fleet`` (many mock supervisors in one process, for load tests)."""
