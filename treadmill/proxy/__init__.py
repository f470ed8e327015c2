"""The rendezvous proxy: publishes a host-local TCP port on a public TCP port or a WebSocket.

See ``docs/proxy.md``. The control protocol and the data header are
``treadmill.protocol.proxy``; the byte splice is ``treadmill.common.splice``.
Modules: ``ports``, ``tunnels`` (``TunnelTable``: the jobs, their tunnels, waiting
clients), ``pool`` (the dial-back pool's accounting), ``legs`` (client and data
connections), ``control`` (the control WebSocket), ``api`` (HTTP routes), ``service``,
``metrics``, ``tap``.
"""
