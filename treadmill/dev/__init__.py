"""Development tooling: not used by the daemons."""
