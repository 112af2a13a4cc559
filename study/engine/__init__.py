"""Trainers: take a population of trials, return one `Trace` per trial.

Every engine has the same contract (`Engine`): same inputs, same outputs, results per trial
that never depend on which other trials share the population. `reference` is the plain
PyTorch loop (the oracle and the baseline); `batched` trains a population as one computation.
`start` trains a population in the background where the engine can (`Pending`).
"""

from study.engine.base import Engine, Pending, Trace, batch_key, population_key, start
from study.engine.population import BatchedEngine
from study.engine.reference import ReferenceEngine

ENGINES: dict[str, type] = {"batched": BatchedEngine, "reference": ReferenceEngine}


def make_engine(name: str) -> Engine:
    """The engine registered under `name` (ValueError naming the options otherwise)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {name!r}")
    return ENGINES[name]()


__all__ = ["ENGINES", "BatchedEngine", "Engine", "Pending", "ReferenceEngine", "Trace",
           "make_engine", "batch_key", "population_key", "start"]
