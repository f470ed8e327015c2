"""Versioned SQL migrations of the switchboard database (NNNN_name.sql)."""
