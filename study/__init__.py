"""`study`: a harness for systematic training-stability studies.

Importing this package is cheap (no torch): `analysis` imports `study.records` and
`study.claims` only.
"""

import os

# Idle OpenMP threads sleep instead of spinning. torch's CPU kernels (MKL inside them) and
# numba's fused update run on GNU OpenMP pools, whose idle threads spin by default, at
# barriers too. Where other processes want the cores (a shared server, a laptop,
# `workers=N`), a spinning thread holds the time slice the thread it waits for needs, and
# each of the engine's many sub-millisecond parallel regions can wait a scheduler tick:
# lr_batch ran 8 times slower with two threads at a load of 5 than with passive waits.
# On idle cores passive waits cost 1.5-1.7x in wall time instead (docs/performance.md):
# robustness on shared machines is the default, ACTIVE the choice for a dedicated one.
# OpenMP reads the policy once, when it loads, so it is set here, before any torch import;
# a policy already in the environment (OMP_WAIT_POLICY=ACTIVE) is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
