"""Tasks: deterministic generators of (X, y) from a data seed. No Hydra; only the real-data
tasks (`table`) read files.

Each task is a frozen dataclass whose fields are its config keys (the YAML under conf/task/
instantiates it through `_target_`) and whose `generate(seed)` returns a `Dataset`.
"""

from study.tasks.base import Dataset, Task
from study.tasks.classification import Blobs, Spirals
from study.tasks.regression import FunctionFit, LinearRegression, TeacherMLP
from study.tasks.table import SklearnData, Table

__all__ = ["Blobs", "Dataset", "FunctionFit", "LinearRegression", "SklearnData", "Spirals",
           "Table", "Task", "TeacherMLP"]
