"""What a failure mode or mitigation may do: one protocol per capability.

A transform (one entry of conf/failure/ or conf/mitigation/) implements any of these; the
trial, the engines and `study.failures.apply_transforms` ask which through `isinstance`, so
a user's transform needs no base class, only the methods it wants:

- `Applicability.check(task)` raises `NotApplicable` (a ValueError) for a task it does not
  apply to;
- `SpecTransform.apply_spec(trial)` returns the trial with its model, optimizer, training or
  loop spec rewritten;
- `DataTransform.apply_data(data, generator)` returns the changed data, shapes kept;
- `ModuleTransform.edit_module(module)` returns a changed reference `nn.Sequential` (its
  trials then train on the reference engine);
- `ObjectiveNote.objective_note` names how the training objective departs from the task's
  loss (for example "standardized targets").

Kept free of study's other modules, so the trial spec and the failures package both import it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Applicability(Protocol):
    def check(self, task: Any) -> None: ...


@runtime_checkable
class SpecTransform(Protocol):
    def apply_spec(self, trial: Any) -> Any: ...


@runtime_checkable
class DataTransform(Protocol):
    def apply_data(self, data: Any, generator: Any) -> Any: ...


@runtime_checkable
class ModuleTransform(Protocol):
    def edit_module(self, module: Any) -> Any: ...


@runtime_checkable
class ObjectiveNote(Protocol):
    objective_note: str


@runtime_checkable
class Parametrized(Protocol):
    """A transform whose record parameters are not its dataclass fields (for example a
    function transform's keyword arguments)."""

    def params(self) -> dict[str, Any]: ...
