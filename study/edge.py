"""The stability edge by search: for every configuration of a sweep's other axes, the largest
learning rate at which every seed trains without diverging, to a stated relative precision.

A sweep declares it with `sweep.edge` instead of a learning-rate axis:

    sweep:
      name: stable_lr
      axes: {optimizer: [sgd, adam], train.batch_size: [8, 32, full]}
      seeds: [0, 1, 2]
      edge: {low: 1e-4, high: 10, precision: 0.1, candidates: 4}

Round 0 tries `candidates` log-spaced learning rates from `low` to `high` (ends included)
for every configuration; each later round tries `candidates` log-spaced rates strictly
inside the configuration's bracket (lo, hi): hi is the smallest rate tried at which any
seed diverged, lo the largest rate tried below it. Each round divides the bracket's log
width by candidates + 1, and every unresolved configuration's candidates x seeds train as
one batched sweep (`sweep.run_sweep`: enqueued, taken, told like grid points). A
configuration is resolved once hi / lo - 1 <= precision, when nothing diverged up to
`high` (the edge lies beyond the range), or when even `low` diverged (below it).

The edge is lo, `edge_high` is hi. The brackets are a pure function of the told trials, so
a resumed search recomputes them from the storage and trains only what is missing.
Divergence is the trial's `status == "diverged"` (docs/metrics.md).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState

from study.engine import Engine
from study.grid import GridPoint, SweepPlan, check_sweep_claims
from study.schema import ConfigError

AXIS = "optimizer.lr"
# The finest relative precision an edge search takes: a bracket of width hi / lo - 1 below
# about 1e-15 has no float64 rate inside it, so a finer precision could never be reached.
MIN_PRECISION = 1e-12
EDGE_COLUMNS = ["edge", "edge_high", "precision", "resolved", "bound", "rates_tried",
                "trials", "seed_edge_min", "seed_edge_max", "grid_precision_same_cost"]


@dataclass(frozen=True)
class EdgeSpec:
    """`sweep.edge`: the learning-rate range, the relative precision, rates per round."""

    low: float
    high: float
    precision: float = 0.05
    candidates: int = 4

    def __post_init__(self) -> None:
        """Raise ConfigError naming `sweep.edge.<key>` unless candidates is an integer >= 2,
        0 < low < high, both finite, low a normal float and high / low a float above 1 and
        finite (the rounds are counted from its logarithm), and the precision finite and at
        least MIN_PRECISION."""
        if not (isinstance(self.candidates, int) and not isinstance(self.candidates, bool)
                and self.candidates >= 2):
            raise ConfigError(f"sweep.edge.candidates: expected an integer >= 2, got "
                              f"{self.candidates!r}")
        checks = {"low": self.low > 0 and math.isfinite(self.low),
                  "high": math.isfinite(self.high) and self.high > self.low,
                  "precision": self.precision > 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"sweep.edge.{name}: out of range (0 < low < high finite, "
                                  f"precision > 0, candidates >= 2): {getattr(self, name)!r}")
        if not math.isfinite(self.precision):
            raise ConfigError(f"sweep.edge.precision: must be a finite number, got "
                              f"{self.precision!r}")
        if self.precision < MIN_PRECISION:
            raise ConfigError(f"sweep.edge.precision: must be >= {MIN_PRECISION:g} (finer "
                              f"brackets hold rates that float64 cannot tell apart), got "
                              f"{self.precision!r}")
        if self.low < sys.float_info.min:
            raise ConfigError(f"sweep.edge.low: must be >= {sys.float_info.min:.4g} (the "
                              f"smallest normal float64), got {self.low!r}")
        if not 1 < self.high / self.low < math.inf:
            raise ConfigError(f"sweep.edge.high: high / low must be a float above 1 and "
                              f"below {sys.float_info.max:.4g}, got high {self.high!r} for "
                              f"low {self.low!r}")

    def first_round(self) -> list[float]:
        return np.geomspace(self.low, self.high, self.candidates).tolist()

    def rounds_needed(self) -> int:
        """Rounds after the first until a bracket of adjacent first-round rates is within
        the precision."""
        width = math.log(self.high / self.low) / (self.candidates - 1)
        target = math.log1p(self.precision)
        return max(0, math.ceil(math.log(width / target) / math.log(self.candidates + 1)))


@dataclass(frozen=True)
class Bracket:
    """What the rates tried say about one configuration's edge."""

    lo: float | None  # largest rate tried below hi (None: none below hi)
    hi: float | None  # smallest rate tried at which any seed diverged (None: none did)

    def resolved(self, spec: EdgeSpec) -> bool:
        if self.hi is None or self.lo is None:
            return True
        return self.hi / self.lo - 1 <= spec.precision

    def next_rates(self, spec: EdgeSpec) -> list[float]:
        if self.resolved(spec):
            return []
        inner = np.geomspace(self.lo, self.hi, spec.candidates + 2)[1:-1]
        return inner.tolist()


def bracket(tried: dict[float, bool]) -> Bracket:
    """The bracket of `tried` (rate -> whether any seed diverged there)."""
    diverged = sorted(r for r, d in tried.items() if d)
    hi = diverged[0] if diverged else None
    below = [r for r in tried if hi is None or r < hi]
    return Bracket(max(below) if below else None, hi)


@dataclass(frozen=True)
class EdgePlan:
    """A sweep's configurations (the grid of its other axes) and its edge spec."""

    name: str
    axes: dict[str, list[Any]]
    seeds: list[int]
    spec: EdgeSpec
    configs: list[list[GridPoint]]  # one list per configuration: a point per seed
    claims: list[Any] = field(default_factory=list)

    @property
    def searched(self) -> list[str]:
        """The learning rate: each configuration tries rates of its own (no axis levels)."""
        return [AXIS]

    @property
    def total(self) -> int:
        """Training runs of a full search (an estimate: configurations resolved early cost
        fewer)."""
        rates = self.spec.candidates * (1 + self.spec.rounds_needed())
        return len(self.configs) * len(self.seeds) * rates

    @property
    def points(self) -> list[GridPoint]:
        return [p for config in self.configs for p in config]

    def at(self, config: Sequence[GridPoint], rate: float) -> list[GridPoint]:
        """The points of `config` (one per seed) at learning rate `rate`."""
        out = []
        for point in config:
            trial = point.trial
            trial = dataclasses.replace(trial, optimizer=dataclasses.replace(trial.optimizer,
                                                                             lr=float(rate)))
            out.append(GridPoint({**point.params, AXIS: float(rate)}, trial))
        return out

    def distributions(self) -> dict[str, BaseDistribution]:
        return {AXIS: FloatDistribution(self.spec.low, self.spec.high, log=True)}


def expand_edge(base: SweepPlan, edge: dict[str, Any], claims: list[Any]) -> EdgePlan:
    """The EdgePlan of a grid plan `base` (its axes must not include the learning rate)."""
    if AXIS in base.axes:
        raise ConfigError(f"sweep.axes.{AXIS}: an edge search finds the learning rate; do not "
                          f"list it as an axis")
    unknown = set(edge) - {f.name for f in dataclasses.fields(EdgeSpec)}
    if unknown:
        raise ConfigError(f"sweep.edge.{sorted(unknown)[0]}: unknown key (low, high, "
                          f"precision, candidates)")
    if not {"low", "high"} <= set(edge):
        raise ConfigError("sweep.edge: needs low and high (the learning-rate range)")
    try:
        spec = EdgeSpec(**{k: (v if k == "candidates" else float(v))
                           for k, v in edge.items()})
    except ConfigError:  # a value out of range: it names its key
        raise
    except (TypeError, ValueError) as err:  # not a number
        raise ConfigError(f"sweep.edge: {err}") from None
    check_sweep_claims(claims, {**base.axes, AXIS: []}, searched=[AXIS])
    configs: dict[str, list[GridPoint]] = {}
    for point in base.points:
        label = repr({k: v for k, v in point.params.items() if k != "seed"})
        configs.setdefault(label, []).append(point)
    return EdgePlan(base.name or "edge", base.axes, base.seeds, spec, list(configs.values()),
                    claims)


def told(study: optuna.Study) -> dict[str, bool]:
    """Key -> diverged, for every COMPLETE trial."""
    return {t.user_attrs["key"]: t.user_attrs.get("status") == "diverged"
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "key" in t.user_attrs}


def tried_rates(plan: EdgePlan, config: Sequence[GridPoint], rates: Sequence[float],
                results: dict[str, bool]) -> dict[float, bool]:
    """Rate -> any seed diverged, over the `rates` whose every seed is told."""
    out = {}
    for rate in rates:
        keys = [p.trial.key() for p in plan.at(config, rate)]
        if all(k in results for k in keys):
            out[rate] = any(results[k] for k in keys)
    return out


def run_edge(plan: EdgePlan, study: optuna.Study, engine: Engine, device: torch.device,
             run_dir, objective: str, on_progress: Callable[[int, int], None] | None = None,
             direction: str = "minimize", leases: Any = None,
             stop: Callable[[], bool] = lambda: False, dashboard: bool = False) -> Any:
    """Rounds of every unresolved configuration's candidates, until all are resolved."""
    from study.lease import Lease
    from study.sweep import SweepOutcome, run_sweep

    leases = leases or Lease()
    trained, reclaimed, wall = 0, 0, 0.0
    done_before = len(told(study))  # runs of earlier invocations (a resume's)
    stopped = False
    while not stop():
        results = told(study)
        points = [p for config in plan.configs
                  for rate in schedule(plan, config, results)[1] for p in plan.at(config, rate)]
        if not points:
            break
        round_plan = SweepPlan(plan.name, {**plan.axes, AXIS: []}, plan.seeds, points,
                               distributions=plan.distributions())
        outcome = run_sweep(round_plan, study, engine, device, run_dir, objective,
                            on_progress=None, direction=direction, leases=leases, stop=stop,
                            dashboard=dashboard)
        trained, reclaimed = trained + outcome.trained, reclaimed + outcome.reclaimed
        wall += outcome.wall_time_s
        stopped = outcome.stopped
        if on_progress:
            on_progress(len(told(study)), max(plan.total, len(told(study))))
        if stopped:
            break
    return SweepOutcome(len(told(study)), trained, done_before, wall, reclaimed,
                        stopped or stop())


def schedule(plan: EdgePlan, config: Sequence[GridPoint], results: dict[str, bool]
             ) -> tuple[dict[float, bool], list[float]]:
    """(rates told so far -> any seed diverged, the rates `config` trains next): the first
    round's, then each bracket's interior, replayed from the told trials."""
    rates = plan.spec.first_round()
    while True:
        tried = tried_rates(plan, config, rates, results)
        if len(tried) < len(rates):  # this round is not fully told yet: (re)train it
            return tried, [r for r in rates if r not in tried]
        nxt = bracket(tried).next_rates(plan.spec)
        if not nxt:
            return tried, []
        rates = rates + nxt


def edges_frame(plan: EdgePlan, study: optuna.Study) -> pd.DataFrame:
    """One row per configuration: its axis values, then `EDGE_COLUMNS`.

    `edge` = lo, `edge_high` = hi (NaN when none diverged), `bound` says which side is open
    ("below low", "above high" or ""), `seed_edge_min/max` the spread of the same rule
    applied to each seed alone, `grid_precision_same_cost` the relative spacing a log grid
    over [low, high] with as many rates would have had."""
    results = told(study)
    rows = []
    for config in plan.configs:
        tried, _ = schedule(plan, config, results)
        b = bracket(tried)
        per_seed = []
        for i in range(len(plan.seeds)):
            alone = {r: results[plan.at(config, r)[i].trial.key()] for r in tried}
            per_seed.append(bracket(alone).lo)
        finite = [e for e in per_seed if e is not None]
        n = max(len(tried), 2)
        rows.append({
            **{k: v for k, v in config[0].params.items() if k != "seed"},
            "edge": np.nan if b.lo is None else b.lo,
            "edge_high": np.nan if b.hi is None else b.hi,
            "precision": np.nan if b.lo is None or b.hi is None else b.hi / b.lo - 1,
            "resolved": b.resolved(plan.spec),
            "bound": "below low" if b.lo is None else ("above high" if b.hi is None else ""),
            "rates_tried": len(tried), "trials": len(tried) * len(plan.seeds),
            "seed_edge_min": min(finite) if finite else np.nan,
            "seed_edge_max": max(finite) if finite else np.nan,
            "grid_precision_same_cost": (plan.spec.high / plan.spec.low) ** (1 / (n - 1)) - 1,
        })
    return pd.DataFrame(rows)


def describe_edge(plan: EdgePlan) -> str:
    s = plan.spec
    return (f"edge search of {AXIS} in [{s.low:g}, {s.high:g}] to {s.precision:.0%} for "
            f"{len(plan.configs)} configurations x {len(plan.seeds)} seeds, {s.candidates} "
            f"rates per round (about {plan.total} trials)")
