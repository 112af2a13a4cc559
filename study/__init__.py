"""`study`: a harness for systematic training-stability studies.

Importing this package is cheap (no torch): `analysis` imports `study.records` and
`study.claims` only.
"""

import os

# Idle OpenMP threads spin briefly, then sleep. torch's CPU kernels (MKL inside them) and
# numba's fused update run on GNU OpenMP pools, whose idle threads spin for about 3 ms by
# default, at barriers too. Where other processes want the cores (a shared server, a
# laptop, `workers=N`), a spinning thread holds the time slice the thread it waits for
# needs, and each of the engine's many sub-millisecond parallel regions can wait a
# scheduler tick: lr_batch ran 8 times slower with two threads at a load of 5. Sleeping at
# once (a spin count of 0) costs 1.4-1.7x in wall time on idle cores instead, where a
# thread is woken for each short region. A bound of 1,000 spins (about 10 us) keeps both:
# as fast as endless spinning on idle cores and as fast as sleeping under load
# (docs/performance.md). OpenMP reads both variables once, when it loads, so they are set
# here, before any torch import. A policy already in the environment
# (OMP_WAIT_POLICY=ACTIVE) is kept, and so is a spin count.
# SET_AT_IMPORT names the variables set here, not by the user: `python -m study.bench
# --peer` starts the peers without them, in the environment the user gave.
SET_AT_IMPORT: tuple[str, ...] = ()
if "OMP_WAIT_POLICY" not in os.environ:
    SET_AT_IMPORT = ("OMP_WAIT_POLICY",) + (
        () if "GOMP_SPINCOUNT" in os.environ else ("GOMP_SPINCOUNT",))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"
