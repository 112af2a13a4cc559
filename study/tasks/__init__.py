"""Synthetic tasks: deterministic generators of (X, y) from a data seed. No Hydra, no I/O.

Each task is a frozen dataclass whose fields are its config keys (the YAML under conf/task/
instantiates it through `_target_`) and whose `generate(seed)` returns a `Dataset`.
"""

from study.tasks.base import Dataset, Task
from study.tasks.classification import Blobs, Spirals
from study.tasks.regression import LinearRegression, TeacherMLP

__all__ = ["Blobs", "Dataset", "LinearRegression", "Spirals", "Task", "TeacherMLP"]
