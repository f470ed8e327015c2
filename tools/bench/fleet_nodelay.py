"""Experiment for ``supervisors.py --what-if-nodelay``: the fleet with TCP_NODELAY.

    python tools/bench/fleet_nodelay.py ARGS...   # same arguments as treadmill.dev.fleet

Autobahn's Twisted adapter calls ``transport.setTcpNoDelay(self.tcpNoDelay)``
in ``connectionMade`` *before* it copies the factory's options onto the
protocol, so the attribute is missing, the ``AttributeError`` is swallowed and
the supervisor's socket keeps Nagle's algorithm. A supervisor then sends
``ack`` and the ``starting`` event back to back, and the second waits for the
switchboard's delayed ACK (about 40 ms on Linux). This wrapper sets the
attribute on the supervisor's protocol class, in this process only, to
measure what the fix would gain; it changes no file of the product.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from treadmill.dev import fleet  # noqa: E402
from treadmill.supervisor.link import SupervisorProtocol  # noqa: E402

SupervisorProtocol.tcpNoDelay = True  # type: ignore[attr-defined]

if __name__ == "__main__":
    fleet.main(sys.argv[1:])
