"""The rendezvous proxy: publishes a host-local TCP port on a public TCP port or a WebSocket.

See ``docs/proxy.md``. Modules: ``messages`` (the control protocol and the
data header), ``splice`` (joining two connections with backpressure; also
used by the supervisor and ``tml``), ``ports``, ``registry`` (jobs, tunnels,
waiting clients), ``legs`` (client and data connections), ``control`` (the
control WebSocket), ``api`` (HTTP routes), ``service``, ``metrics``, ``tap``.
"""
