"""Sampler sweeps: an Optuna sampler proposes, proposals train together, every one is told.

A sweep with `sampler:` other than `grid` declares a search space and a budget instead of
axes:

    sweep:
      name: adam_search
      sampler: tpe              # tpe | gp | qmc | random | cmaes
      trials: 96                # budget: proposals
      population: 32            # proposals asked at once and trained as one population
      space:
        optimizer.lr: {low: 1e-5, high: 10, log: true}
        optimizer.betas.0: {low: 0.5, high: 0.999}
        train.batch_size: [8, 32, 128]          # a list: categorical
        optimizer: [adam, sgd]                  # a config group: its options
      seeds: [0, 1, 2]          # every proposal trains once per seed (paired)

Each round the driver asks the sampler for `population` proposals at once (TPE marks the
ones still training with the constant liar, so the asks spread out), queues each
proposal's copies for the other seeds with the same params (`enqueue_trial`), trains all
of them as one batched computation and tells every trial its own objective. An Optuna
trial is one training run (a proposal x one seed): its params are the proposal's (stored
with their real distributions, so optuna-dashboard draws log-lr axes), its seed and
proposal number are user attributes. The budget counts proposals already told or queued,
so a resumed search spends only what is left; trials left RUNNING by a killed run are
failed and their params queued again (`study.lease`, `study.queue`).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from study import lease, queue
from study.compositions import Compose, compose_plain, group_override
from study.config import GROUPS, TRANSFORM_GROUPS, TRIAL_KEYS, build_trial, plain_config
from study.engine import Engine
from study.grid import GridPoint, check_sweep_claims, group_label
from study.schema import ConfigError, StudyConfig

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "gp", "qmc", "random", "cmaes")
PROPOSAL = "proposal"  # user attribute: the number of the trial the sampler proposed
SEED = "seed"  # user attribute: the trial seed of this copy of the proposal


@dataclass(frozen=True)
class SearchPlan:
    """A sampler sweep: its space, seeds, budget and how to build a trial from params.

    `axes` maps each categorical key of the space to its choices: what trials.parquet's
    metadata and the claims pair and group on (proposals of a continuous key never repeat,
    so pairing on one would leave every group alone); claims may still name a continuous
    key as their own axis (a trend over `optimizer.lr`).
    """

    name: str
    sampler: str
    space: dict[str, BaseDistribution]
    seeds: list[int]
    trials: int
    population: int
    sampler_seed: int
    build: Callable[[dict[str, Any], int], GridPoint] = field(repr=False, compare=False)
    claims: list[Any] = field(default_factory=list)
    pruner: dict[str, Any] | None = None  # `sweep.pruner`; None: every run trains to the end
    # {key: {stored choice: config value}} of the choices stored as text (`choice_values`)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def axes(self) -> dict[str, list[Any]]:
        """Each categorical key's choices as config values (a list choice as the list that
        trials.parquet's column holds, not the text Optuna stores)."""
        return {name: [self.values.get(name, {}).get(c, c) for c in d.choices]
                for name, d in self.space.items() if isinstance(d, CategoricalDistribution)}

    @property
    def searched(self) -> list[str]:
        """The space's numeric keys: each proposal draws its own value, so they are no
        axes with levels (trials.parquet's metadata names them apart)."""
        return [name for name, d in self.space.items()
                if not isinstance(d, CategoricalDistribution)]

    @property
    def total(self) -> int:
        """Training runs the budget buys: proposals x seeds."""
        return self.trials * len(self.seeds)

    @property
    def points(self) -> list[GridPoint]:
        """One point per `corners()`, then the `peak()` where it is none of them: what
        validation, the data, objective and memory checks look at before any proposal
        exists."""
        corners = self.corners()
        peak = self.peak
        params = corners if peak is None or peak in corners else [*corners, peak]
        return [self.build(p, self.seeds[0]) for p in params]

    def corners(self) -> list[dict[str, Any]]:
        """The params of the space's lower corner with each categorical key set to each of
        its choices in turn (the corner alone when no key is categorical)."""
        corner = {n: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low
                  for n, d in self.space.items()}
        corners = [{**corner, name: c} for name, dist in self.space.items()
                   if isinstance(dist, CategoricalDistribution) for c in dist.choices]
        return corners or [corner]

    @functools.cached_property
    def peak(self) -> dict[str, Any] | None:
        """The params of the largest trial a proposal can draw by its estimated memory
        (`planner.estimate_trial_bytes`), each categorical key at its first choice: every
        numeric key at its high end, then each in turn at its low end where that is larger
        (fewer examples per batch are more steps); None without a numeric key. Computed
        once: 1 + len(searched) trials built."""
        from study.engine.planner import estimate_trial_bytes

        if not self.searched:
            return None
        peak = {**self.corners()[0], **{n: self.space[n].high for n in self.searched}}
        largest = estimate_trial_bytes(self.build(peak, self.seeds[0]).trial)
        for name in self.searched:
            other = {**peak, name: self.space[name].low}
            size = estimate_trial_bytes(self.build(other, self.seeds[0]).trial)
            if size > largest:
                peak, largest = other, size
        return peak


# ------------------------------------------------------------------------------ expand
def expand_search(cfg: Any, compose: Compose, overrides: Sequence[str],
                  choices: dict[str, str], typed: StudyConfig) -> SearchPlan:
    """The SearchPlan of a validated config whose sweep names a sampler."""
    sweep = typed.sweep
    if sweep.sampler not in SAMPLERS:
        raise ConfigError(f"sweep.sampler: must be grid or one of {', '.join(SAMPLERS)}, got "
                          f"{sweep.sampler!r}")
    if sweep.axes:
        raise ConfigError("sweep.axes: a sampler sweep declares sweep.space, not axes")
    if typed.workers > 1:
        raise ConfigError("workers: a sampler sweep asks and tells from one process (its "
                          "populations are its parallelism); use workers=1")
    if not sweep.space:
        raise ConfigError("sweep.space: a sampler sweep needs a search space")
    if not (isinstance(sweep.trials, int) and sweep.trials >= 1):
        raise ConfigError(f"sweep.trials: the budget must be a number of proposals >= 1, got "
                          f"{sweep.trials!r}")
    # unset: the whole budget in one round; 0 is no population, not "unset"
    population = sweep.trials if sweep.population is None else sweep.population
    if not (isinstance(population, int) and population >= 1):
        raise ConfigError(f"sweep.population: must be >= 1, got {population!r}")
    for name in sweep.space:
        check_space_key(name)
    for name in sweep.space:
        # a key under another non-group key: whichever is set last overwrites the other
        over = next((o for o in sweep.space if o not in GROUPS
                     and name.startswith(f"{o}.")), None)
        if over is not None:
            raise ConfigError(f"sweep.space.{name}: lies under sweep.space.{over}, which sets "
                              f"it too; search one of the two")
    space = {name: distribution(name, spec) for name, spec in sweep.space.items()}
    if sweep.sampler == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError("sweep.sampler: cmaes needs the cmaes package (pip install "
                              "cmaes)")
        categorical = [n for n, d in space.items() if isinstance(d, CategoricalDistribution)]
        if categorical:  # said once here; Optuna would warn at every proposal
            log.info("%s: CMA-ES samples no categorical key; %s drawn at random for each "
                     "proposal (Optuna's independent sampling)", sweep.name,
                     ", ".join(categorical))
    base_labels = {g: group_label(cfg, g, choices.get(g)) for g in GROUPS}
    base = plain_config(cfg)
    values = choice_values(sweep.space)
    composed: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}

    def groups(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple((g, params[g]) for g in space if g in GROUPS)

    def wanted(params_list: list[dict[str, Any]]) -> dict[tuple, tuple[list[str], bool]]:
        # compose_plain's requests: each combination of group options not composed yet,
        # validated, in the order given
        return {picked: ([group_override(g, v) for g, v in picked], True)
                for picked in dict.fromkeys(map(groups, params_list))
                if picked and picked not in composed}

    def build(params: dict[str, Any], seed: int) -> GridPoint:
        picked = groups(params)
        if picked and picked not in composed:
            composed.update(compose_plain(compose, overrides, wanted([params])))
        plain = copy.deepcopy(composed[picked] if picked else base)
        for name, value in params.items():
            if name not in GROUPS:
                set_key(plain, name, values.get(name, {}).get(value, value))
        labels = {**base_labels, **{g: str(v) for g, v in picked}}
        return GridPoint({**params, SEED: seed}, build_trial(plain, seed, labels))

    pruner = dict(sweep.pruner) if sweep.pruner else None
    make_pruner(pruner)  # a bad pruner fails now
    plan = SearchPlan(sweep.name, sweep.sampler, space, list(sweep.seeds), sweep.trials,
                      population, typed.seed, build, list(sweep.claims), pruner, values)
    check_sweep_claims(plan.claims, {name: [] for name in space}, searched=plan.searched)
    # The corners' group options composed side by side (study.compositions.compose_plain); a
    # proposal that picks another combination composes it when it is built.
    composed.update(compose_plain(compose, overrides, wanted(plan.corners())))
    plan.points  # noqa: B018 - every categorical choice builds (bad options fail now)
    return plan


def check_space_key(name: str) -> None:
    """Raise ConfigError unless `name` is a key of a trial's configuration: a config group
    or a dotted key under one of `TRIAL_KEYS` (a trial would ignore any other key, its
    seed included: it comes from sweep.seeds)."""
    where = f"sweep.space.{name}"
    top = name.split(".")[0]
    if top == "seed":
        raise ConfigError(f"{where}: seeds are declared by sweep.seeds, not searched")
    if top not in TRIAL_KEYS:
        raise ConfigError(f"{where}: not part of a trial's configuration (a space searches "
                          f"keys of {', '.join(TRIAL_KEYS)})")
    if name not in GROUPS and "." not in name:
        raise ConfigError(f"{where}: not a config group ({', '.join(GROUPS)}) nor a dotted "
                          f"key such as train.epochs")


def distribution(name: str, spec: Any) -> BaseDistribution:
    """The Optuna distribution of one `sweep.space` entry (ConfigError names the key): a
    list is categorical over its choices as stored (`stored_choice`); {low, high[, log,
    step, int]} a finite range, with a step > 0, integer where low and high are integers
    (and no step is a float) or `int` is set."""
    where = f"sweep.space.{name}"
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{where}: no choices")
        values = [stored_choice(name, v) for v in spec]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: duplicate choices in {list(spec)}")
        return CategoricalDistribution(values)
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
        raise ConfigError(f"{where}: expected {{low, high[, log, step]}} or a list of "
                          f"choices, got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "step", "int"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (low, high, log, step, "
                          f"int)")
    low, high, step = spec["low"], spec["high"], spec.get("step")
    log_scale = bool(spec.get("log", False))
    integer = bool(spec.get("int")) or (isinstance(low, int) and isinstance(high, int)
                                         and not isinstance(step, float))
    for key in ("low", "high", "step"):
        value = spec.get(key)
        if key == "step" and value is None:
            continue
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (ValueError, TypeError, OverflowError):
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{where}.{key}: must be a finite number, got {value!r}")
        if integer and not number.is_integer():
            raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    # `step: 0` is no step of 1: a proposal would never be asked for it
    if step is not None and float(step) <= 0:
        raise ConfigError(f"{where}.step: must be > 0, got {step!r}")
    try:
        if integer:
            return IntDistribution(int(low), int(high), log=log_scale,
                                   step=1 if step is None else int(step))
        return FloatDistribution(float(low), float(high), log=log_scale,
                                 step=None if step is None else float(step))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def stored_choice(name: str, value: Any) -> Any:
    """How a choice of space key `name` is stored in Optuna: as it is where Optuna stores it
    (None, bool, int, float, str); a list or mapping as text, JSON (`choice_values` reads it
    back), or for a failure/mitigation key its Hydra list ("[a, b]" selects both)."""
    if not isinstance(value, (list, tuple, dict)):
        return value
    return str(value) if name in TRANSFORM_GROUPS else json.dumps(value)


def choice_values(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{key: {stored choice: config value}} of the `sweep.space` entries whose choices are
    stored as text (`stored_choice`), the failure/mitigation keys' aside (Hydra reads
    theirs)."""
    return {name: {stored_choice(name, v): v for v in spec
                   if isinstance(v, (list, tuple, dict))}
            for name, spec in space.items()
            if isinstance(spec, (list, tuple)) and name not in GROUPS}


def set_key(plain: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` of `plain` (a list element by its index: `optimizer.betas.0`)."""
    *parents, leaf = key.split(".")
    node: Any = plain
    for part in parents:
        node = node[int(part)] if isinstance(node, list) and part.isdigit() else (
            node.get(part) if isinstance(node, dict) else None)
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        node[int(leaf)] = value
    elif isinstance(node, dict) and leaf in node:
        node[leaf] = value
    else:
        raise ConfigError(f"sweep.space.{key}: no such key in the composed config")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for `name`, seeded. TPE uses the constant liar, so proposals asked
    while others still train spread out; GP and CMA-ES cannot propose several at once in
    Optuna and propose from the trials already told (docs/design.md)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        with warnings.catch_warnings():  # chosen by name: its "experimental" note is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if name == "cmaes":
        # its categorical keys' fallback is said once, by expand_search
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


PRUNERS = {"successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner",
           "median": "MedianPruner", "percentile": "PercentilePruner"}
# The least value of each integer argument of a pruner. Optuna checks some of them only
# when the pruner first decides, mid-training (a hyperband min_resource of 0 divides by
# zero there), and takes floats where it counts in integers; all are checked at the plan.
_MEDIAN_INTS = {"n_startup_trials": 0, "n_warmup_steps": 0, "interval_steps": 1,
                "n_min_trials": 1}
PRUNER_INTS = {
    "successive_halving": {"min_resource": 1, "reduction_factor": 2,
                           "min_early_stopping_rate": 0, "bootstrap_count": 0},
    "hyperband": {"min_resource": 1, "max_resource": 1, "reduction_factor": 2,
                  "bootstrap_count": 0},
    "median": _MEDIAN_INTS,
    "percentile": _MEDIAN_INTS,
}
# Integer arguments that may also be "auto" (estimated from the first trials told).
PRUNER_AUTO = {"successive_halving": ("min_resource",), "hyperband": ("max_resource",)}


def make_pruner(spec: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """Optuna's pruner for `sweep.pruner` ({type, ...its keyword arguments}); none: Nop.

    Its arguments are checked first (`check_pruner`): Optuna checks some only when the
    pruner first decides, mid-training."""
    if not spec:
        return optuna.pruners.NopPruner()
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in PRUNERS:
        raise ConfigError(f"sweep.pruner.type: must be one of {', '.join(PRUNERS)}, got "
                          f"{kind!r}")
    check_pruner(kind, spec)
    try:
        return getattr(optuna.pruners, PRUNERS[kind])(**spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep.pruner: {err}") from None


def check_pruner(kind: str, args: dict[str, Any]) -> None:
    """Raise ConfigError naming `sweep.pruner.<key>` for an argument of pruner `kind` that
    Optuna would refuse, or fail on, once it decides: an unknown or missing key, an integer
    argument that is not an integer at least its least value (or "auto" where allowed), a
    percentile outside [0, 100]; for hyperband, a max_resource below min_resource (no
    bracket: nothing would ever be pruned) or so far above it that Optuna's bracket count
    overflows, and bootstrap_count with max_resource auto. Successive halving's
    bootstrap_count needs an integer min_resource."""
    cls = getattr(optuna.pruners, PRUNERS[kind])
    params = inspect.signature(cls).parameters
    for key in args:
        if key not in params:
            raise ConfigError(f"sweep.pruner.{key}: unknown key for {kind} (known keys: type, "
                              f"{', '.join(params)})")
    for key, param in params.items():
        if param.default is inspect.Parameter.empty and key not in args:
            raise ConfigError(f"sweep.pruner.{key}: the {kind} pruner needs it")
    for key, least in PRUNER_INTS[kind].items():
        if key not in args:
            continue
        value = args[key]
        auto = key in PRUNER_AUTO.get(kind, ())
        if auto and value == "auto":
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            also = " or 'auto'" if auto else ""
            raise ConfigError(f"sweep.pruner.{key}: must be an integer >= {least}{also}, got "
                              f"{value!r}")
    if kind == "percentile":
        value = args["percentile"]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and 0 <= value <= 100):
            raise ConfigError(f"sweep.pruner.percentile: must be a number from 0 to 100, got "
                              f"{value!r}")
    auto_key = {"hyperband": "max_resource", "successive_halving": "min_resource"}.get(kind)
    if auto_key and args.get("bootstrap_count", 0) > 0 and args.get(
            auto_key, params[auto_key].default) == "auto":
        raise ConfigError(f"sweep.pruner.bootstrap_count: > 0 needs an integer {auto_key}, "
                          f"not auto")
    if kind == "hyperband":
        low = args.get("min_resource", params["min_resource"].default)
        high = args.get("max_resource", params["max_resource"].default)
        factor = args.get("reduction_factor", params["reduction_factor"].default)
        if high == "auto":
            return
        if high < low:
            raise ConfigError(f"sweep.pruner.max_resource: must be >= min_resource ({low}), "
                              f"got {high} (hyperband would have no bracket)")
        try:  # Optuna's bracket count (HyperbandPruner._try_initialization)
            math.log(high / low, factor)
        except OverflowError:
            raise ConfigError(f"sweep.pruner.max_resource: too large: hyperband's brackets "
                              f"need max_resource / min_resource below 1.8e308, got {high}"
                              ) from None


# ------------------------------------------------------------------------------ driver
def proposals_spent(study: optuna.Study) -> int:
    """Distinct proposals told, training or queued (failed copies were queued again)."""
    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                    TrialState.RUNNING, TrialState.WAITING))
    return len({t.user_attrs[PROPOSAL] for t in live if PROPOSAL in t.user_attrs})


def run_search(plan: SearchPlan, study: optuna.Study, engine: Engine, device: torch.device,
               run_dir, objective: str, on_progress: Callable[[int, int], None] | None = None,
               direction: str = "minimize", leases: lease.Lease | None = None,
               stop: Callable[[], bool] = lambda: False, dashboard: bool = False) -> Any:
    """Spend the rest of `plan`'s budget in rounds of `population` proposals (module doc).

    Returns a `sweep.SweepOutcome`; `stop()` is polled between rounds (what a round queued
    and did not train stays queued: a resume trains it first)."""
    from study.sweep import SweepOutcome, train_population

    leases = leases or lease.Lease()
    started = time.perf_counter()
    me = lease.Worker.here()
    study.sampler = make_sampler(plan.sampler, plan.sampler_seed)
    study.pruner = make_pruner(plan.pruner)
    complete = (TrialState.COMPLETE, TrialState.PRUNED)
    done_before = len(study.get_trials(deepcopy=False, states=complete))
    trained = 0
    with lease.Heartbeat(queue.heartbeat(study), me, leases.heartbeat_s) as heart:
        reclaimed = queue.reclaim_stale(
            study, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), me,
            leases.grace_s, lambda t: _requeue(study, t))
        if on_progress:
            on_progress(done_before, plan.total)
        while not stop():
            with queue.batched(study):  # the round's asks, copies and takes: one append
                taken = _round(plan, study, me)
            if not taken:
                break
            heart.beat()
            trained += train_population(study, engine, device, run_dir, taken, objective,
                                        direction, prune=plan.pruner is not None,
                                        dashboard=dashboard)
            heart.beat()
            if on_progress:
                on_progress(len(study.get_trials(deepcopy=False, states=complete)),
                            plan.total)
    return SweepOutcome(plan.total, trained, done_before, time.perf_counter() - started,
                        reclaimed, stop())


def _round(plan: SearchPlan, study: optuna.Study, me: lease.Worker
           ) -> list[tuple[optuna.Trial, GridPoint]]:
    """Take what is queued (copies of a stopped or failed round), then ask new proposals
    up to the population and the budget, each with its copies for the other seeds."""
    taken = []
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        taken.append(_take(plan, study, study.ask(plan.space), me))
    room = plan.population - len({t.user_attrs[PROPOSAL] for t, _ in taken})
    for _ in range(max(0, min(room, plan.trials - proposals_spent(study)))):
        trial = study.ask(plan.space)
        trial.set_user_attr(PROPOSAL, trial.number)
        trial.set_user_attr(SEED, plan.seeds[0])
        taken.append(_take(plan, study, trial, me))
        for seed in plan.seeds[1:]:
            study.enqueue_trial(trial.params, user_attrs={PROPOSAL: trial.number, SEED: seed})
            taken.append(_take(plan, study, study.ask(plan.space), me))
    return taken


def _take(plan: SearchPlan, study: optuna.Study, trial: optuna.Trial, me: lease.Worker
           ) -> tuple[optuna.Trial, GridPoint]:
    attrs = trial.user_attrs
    seed = attrs.get(SEED, plan.seeds[0])
    if PROPOSAL not in attrs:  # queued by hand: its own proposal
        trial.set_user_attr(PROPOSAL, trial.number)
        trial.set_user_attr(SEED, seed)
    point = plan.build(dict(trial.params), seed)
    trial.set_user_attr("key", point.trial.key())
    trial.set_user_attr("config", point.trial.flat())
    trial.set_user_attr("worker", me.record())
    return trial, point


def _requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue the params of a failed trial again, as the same proposal and seed."""
    attrs = trial.user_attrs
    if PROPOSAL in attrs:
        study.enqueue_trial(dict(trial.params), user_attrs={PROPOSAL: attrs[PROPOSAL],
                                                            SEED: attrs.get(SEED)})


def done_runs(study: optuna.Study) -> int:
    """Training runs told (COMPLETE or PRUNED trials)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                        TrialState.PRUNED)))


def describe_search(plan: SearchPlan) -> str:
    """A one-line size of a search, for the log."""
    return (f"{plan.sampler} search over {', '.join(plan.space)}: {plan.trials} proposals x "
            f"{len(plan.seeds)} seeds, {plan.population} proposals per population")

