"""The harness of the benchmarks in ``tools/bench``: what every script shares.

The scripts run as scripts, so this folder's parent is on ``sys.path``;
importing the package puts the checkout's root there too (for ``treadmill``).
Standard library only, but for ``daemons`` (which imports ``treadmill`` lazily).

Modules:
- ``cli``: progress lines, ``BenchError``, the output options, ``run`` (clean-up,
  signals, JSON or table).
- ``host``: the machine and the checkout (versions, CPUs, how busy, revision).
- ``procs``: ports, starting, waiting for and stopping processes, py-spy, HTTP.
- ``procfs``: ``/proc`` readings (memory, CPU, run queue) and the samplers
  ``Sampler`` and ``Monitor``.
- ``daemons``: PostgreSQL, Treadmill roles under twistd, nginx, tokens.
- ``report``: wrk (run and parsed), percentiles, table cells.
- ``api``: the switchboard API over keep-alive connections (fleet benchmarks).
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
