"""The log server: stores job logs pushed by supervisors and serves them, live.

    treadmill/logserver/
    ├── names.py    checks of job ids and stream names (the grammar: protocol/logs.py)
    ├── streams.py  append-only stream files (StreamStore), the writer thread, retention
    ├── follow.py   reading a byte range or following a stream (HTTP and WebSocket)
    ├── api.py      the HTTP API (Klein) and its capability checks
    ├── metrics.py  Prometheus metrics
    ├── service.py  the service tree
    └── tap.py      ``twistd treadmill-logserver`` options

``docs/logserver.md`` documents the API, the storage, the fsync policy,
retention and the shipping protocol (``treadmill/protocol/logs.py`` holds the
names, URLs and close codes; ``treadmill/supervisor/logship.py`` is the
supervisor's side).
"""
