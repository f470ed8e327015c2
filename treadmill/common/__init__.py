"""The daemon kit shared by every role: configuration, logging, TLS, manhole, metrics, tokens."""
