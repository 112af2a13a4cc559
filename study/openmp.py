"""Idle OpenMP threads that sleep instead of spinning, set before torch loads OpenMP.

torch's CPU kernels (and MKL inside them) and numba's fused update run on GNU OpenMP
thread pools. Between parallel regions, and at each region's closing barrier, an idle
thread spins on its core by default. On a machine where other processes want the cores
(a shared server, a laptop, `workers=N`), a spinning thread takes the time slice that the
thread it waits for needs, and each of the engine's many sub-millisecond regions waits a
scheduler tick: lr_batch ran 8 times slower with two threads at a load of 5 than with the
threads passive (docs/performance.md). `OMP_WAIT_POLICY=PASSIVE` makes waiting threads
sleep; on idle cores it costs a few percent.

The setting is read once, when each OpenMP runtime loads, so it must be in the environment
before the first `import torch`: `study/__init__.py` applies it, and so it holds for
`python -m study`, `python -m study.bench` and any script that imports `study` before
torch. A value already in the environment (`OMP_WAIT_POLICY=ACTIVE`) is kept.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"


def prefer_passive_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment already names a policy."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
