"""Experiment for ``supervisors.py --what-if-nodelay``: the fleet with TCP_NODELAY.

    python tools/bench/fleet_nodelay.py ARGS...   # same arguments as treadmill.dev.fleet

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
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
