"""`study`: a harness for systematic training-stability studies.

Importing this package is cheap (no torch): `analysis` imports `study.records` only.
"""

from study.openmp import prefer_passive_wait

prefer_passive_wait()  # before any torch import: OpenMP reads it once, when it loads

__version__ = "0.1.0"
