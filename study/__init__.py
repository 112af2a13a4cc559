"""`study`: a harness for systematic training-stability studies.

Importing this package is cheap (no torch): `analysis` imports `study.records` only.
"""

__version__ = "0.1.0"
