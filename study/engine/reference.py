"""The reference engine: the plain loop a user would write, one trial at a time.

nn.Sequential + torch.optim, shuffled minibatches from a seeded generator,
zero_grad / backward / step, and whatever the trial's failure modes and mitigations change
in that loop (`LoopSpec`): the training loss, zero_grad left out, no shuffling,
`clip_grad_norm_`, the learning rate set per step from the schedule, ReduceLROnPlateau and
early stopping on the validation loss after each evaluation. It is the oracle for the
population engine and the baseline of the benchmark, so it stays deliberately plain:
clarity over speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from study.engine.base import OnEval
from study.engine.batched_optimizers import adaptive, preconditioner
from study.engine.landscape import gradient_noise_scale, sharpness
from study.engine.network import Network
from study.failures import trial_dataset
from study.failures.loop import EarlyStopper, Plateau, class_weights
from study.models import (
    PROBE_SIZE,
    activation_stats,
    build_module,
    dropout_seed,
    init_parameters,
)
from study.seeds import seed_streams
from study.tasks import Dataset
from study.trace import Trace
from study.transform import ModuleTransform
from study.trial import LoopSpec, TrialSpec


def loss_fn(name: str):
    """The task's training loss (mean over the batch)."""
    return F.mse_loss if name == "mse" else F.cross_entropy


def training_loss(loop: LoopSpec, data: Dataset, n_classes: int, device: torch.device):
    """The training objective of `loop.loss`, written as a user would (see LoopSpec)."""
    if loop.loss == "task":
        return loss_fn(data.loss)
    if loop.loss == "huber":
        return lambda out, y: F.huber_loss(out, y, delta=loop.huber_delta)
    if loop.loss == "weighted_cross_entropy":
        weights = class_weights(data.y_train, n_classes)
        return lambda out, y: F.cross_entropy(out, y, weight=weights.to(device, out.dtype))
    if loop.loss == "mse_onehot":
        return lambda out, y: F.mse_loss(out, F.one_hot(y, n_classes).to(out.dtype))

    def bce_by_hand(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # no sigmoid
        target = F.one_hot(y, n_classes).to(out.dtype)
        return -(target * torch.log(out) + (1 - target) * torch.log(1 - out)).mean()

    return bce_by_hand


def evaluation_loss(data: Dataset, device: torch.device, dtype: torch.dtype):
    """The task's loss, in the original target units when targets were standardized."""
    if data.target_scale is None:
        return loss_fn(data.loss)
    scale = data.target_scale.to(device=device, dtype=dtype)
    return lambda out, y: ((out - y) * scale).square().mean()


class ReferenceEngine:
    """Loops over trials; see the module docstring."""

    name = "reference"
    # Trials train one by one anyway: small batches keep the progress bar and the curves
    # files moving, and lose little work to a kill.
    population_limit = 8

    def run(self, trials: Sequence[TrialSpec], device: torch.device,
            on_eval: OnEval | None = None) -> list[Trace]:
        return [train_trial(trial, torch.device(device), _hook_for(on_eval, i))
                for i, trial in enumerate(trials)]


def _hook_for(on_eval: OnEval | None, i: int) -> Callable[[int, float], bool] | None:
    """`on_eval` as trial `i` alone sees it: True when it names `i`."""
    if on_eval is None:
        return None
    return lambda step, val: i in on_eval(step, {i: val})


def train_trial(trial: TrialSpec, device: torch.device,
                on_eval: Callable[[int, float], bool] | None = None) -> Trace:
    """Train one trial; see `Trace` for what is recorded and when it stops.

    `on_eval(step, validation loss)` is called after every evaluation; True stops the trial
    there (its trace ends at that evaluation, not diverged; at the last one it changes
    nothing)."""
    run = _setup(trial, device)
    control = _LoopControl(trial, run.plan, on_eval)
    records = _TraceLists(run.model)
    if _after_updates(run, records, control, 0):
        for step, idx in zip(range(run.plan.planned), _minibatches(run), strict=False):
            if not _train_step(run, records, idx, control.learning_rate(step)):
                records.divergence_step = step
                break
            if not _after_updates(run, records, control, step + 1):
                break
    return records.trace(run)


@dataclass(frozen=True)
class _Plan:
    """When a trial steps, evaluates and measures its diagnostics (`TrainSpec`)."""

    batch: int
    planned: int
    per_epoch: int
    eval_at: frozenset[int]
    diag_at: frozenset[int]

    @classmethod
    def of(cls, trial: TrialSpec, n_train: int) -> _Plan:
        train = trial.train
        return cls(train.resolved_batch_size(n_train), train.total_steps(n_train),
                   train.steps_per_epoch(n_train), frozenset(train.eval_steps(n_train)),
                   frozenset(trial.diagnostics.steps(train, n_train)))


@dataclass(frozen=True)
class _Run:
    """What one trial trains with, set up once: its data on the device, the module, the
    optimizer and the two losses."""

    trial: TrialSpec
    data: Dataset
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    model: torch.nn.Sequential
    optimizer: torch.optim.Optimizer
    objective: Callable  # the training loss (LoopSpec.loss)
    criterion: Callable  # the task's loss, for the evaluations
    order: torch.Generator  # the minibatch order
    plan: _Plan


def _setup(trial: TrialSpec, device: torch.device) -> _Run:
    seeds = seed_streams(trial.seed)
    data = trial_dataset(trial, seeds.data)
    dtype = trial.train.torch_dtype
    params = init_parameters(trial.model, trial.task.input_dim, trial.task.output_dim,
                             torch.Generator().manual_seed(seeds.init))
    dropout = torch.Generator().manual_seed(dropout_seed(trial.seed))
    model = build_module(trial.model, params, dtype, device, dropout)
    for transform in trial.transforms:
        if isinstance(transform, ModuleTransform):
            model = transform.edit_module(model)
    optimizer = build_optimizer(trial, model)
    return _Run(trial, data, *_to_device(data, dtype, device), model, optimizer,
                objective=training_loss(trial.loop, data, trial.task.output_dim, device),
                criterion=evaluation_loss(data, device, dtype),
                order=torch.Generator().manual_seed(seeds.order),
                plan=_Plan.of(trial, data.n_train))


class _LoopControl:
    """The learning rate of each step (schedule and ReduceLROnPlateau) and whether a trial
    stops after an evaluation (early stopping, or `on_eval`)."""

    def __init__(self, trial: TrialSpec, plan: _Plan,
                 on_eval: Callable[[int, float], bool] | None) -> None:
        loop = self.loop = trial.loop
        self.plan, self.on_eval, self.base_lr = plan, on_eval, trial.optimizer.lr
        self.plateau = (Plateau(loop.plateau_factor, loop.plateau_patience,
                                loop.plateau_threshold)
                        if loop.plateau_factor is not None else None)
        self.stopper = (EarlyStopper(loop.early_stopping_patience)
                        if loop.early_stopping_patience is not None else None)

    def learning_rate(self, step: int) -> float | None:
        """The learning rate for the update after `step` updates (None: never changed)."""
        if not self.loop.scheduled:
            return None
        lr = self.base_lr * self.loop.lr_factor(step, self.plan.per_epoch, self.plan.planned)
        if self.plateau is not None:
            lr = lr * self.plateau.multiplier
        return lr

    def stops(self, step: int, val: float) -> bool:
        """Plateau and early-stopping bookkeeping on the validation loss `val` after `step`
        updates; True: the trial stops there (never at the last step)."""
        if self.plateau is not None and step > 0:
            self.plateau.update(val, self.base_lr * self.plateau.multiplier)
        told = self.on_eval is not None and self.on_eval(step, val)
        stop = self.stopper is not None and self.stopper.update(val)
        return (stop or told) and step < self.plan.planned


class _TraceLists:
    """What the loop records, as Python lists until `trace`. Beyond the plain loop (see
    Trace): per-step layer, parameter and update norms; per-eval activation health on a
    fixed probe batch."""

    def __init__(self, model: torch.nn.Sequential) -> None:
        self.step_loss: list[float] = []
        self.grad_norm: list[float] = []
        self.extra: dict[str, list[float]] = {k: [] for k in (
            "grad_norm_first", "grad_norm_last", "param_norm", "update_norm", "update_cosine")}
        self.evals: list[tuple[float, ...]] = []  # (step, *EVAL_FIELDS)
        self.diag: list[tuple[float, float, float, float]] = []  # (step, sharpness, ...)
        self.divergence_step: int | None = None
        self.weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
        self.previous_update: torch.Tensor | None = None

    def update(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """The parameter norm before an update, the update's norm and its cosine with the
        previous update."""
        update = after - before
        self.extra["param_norm"].append(torch.linalg.vector_norm(before).item())
        self.extra["update_norm"].append(torch.linalg.vector_norm(update).item())
        self.extra["update_cosine"].append(
            np.nan if self.previous_update is None
            else F.cosine_similarity(update, self.previous_update, dim=0, eps=1e-30).item())
        self.previous_update = update

    def trace(self, run: _Run) -> Trace:
        trial, data = run.trial, run.data
        classify = data.loss == "cross_entropy"
        ev = np.array(self.evals, dtype=np.float64).reshape(-1, 7)
        dg = np.array(self.diag, dtype=np.float64).reshape(-1, 4) if run.plan.diag_at else None
        precond = dg is not None and trial.diagnostics.sharpness and adaptive(trial.optimizer)
        return Trace(
            step_loss=np.asarray(self.step_loss, dtype=np.float64),
            grad_norm=np.asarray(self.grad_norm, dtype=np.float64),
            eval_step=ev[:, 0].astype(np.int64),
            train_loss=ev[:, 1],
            val_loss=ev[:, 2],
            train_acc=ev[:, 3] if classify else None,
            val_acc=ev[:, 4] if classify else None,
            divergence_step=self.divergence_step,
            planned_steps=run.plan.planned,
            irreducible_loss=data.irreducible_loss,
            input_free_loss=data.input_free_loss(),
            dead_fraction=ev[:, 5],
            saturation_fraction=ev[:, 6],
            **{k: np.asarray(v, dtype=np.float64) for k, v in self.extra.items()},
            diag_step=None if dg is None else dg[:, 0].astype(np.int64),
            sharpness=None if dg is None else dg[:, 1],
            noise_scale=None if dg is None else dg[:, 2],
            precond_sharpness=dg[:, 3] if precond else None,
        )


def _minibatches(run: _Run) -> Iterator[torch.Tensor]:
    """Row indices of each minibatch, epoch after epoch: one `torch.randperm` per epoch from
    the trial's order generator (the stored order without shuffling), the last batch of an
    epoch partial."""
    n, batch = run.data.n_train, run.plan.batch
    while True:
        perm = torch.randperm(n, generator=run.order) if run.trial.loop.shuffle else torch.arange(n)
        perm = perm.to(run.x_train.device)
        for start in range(0, n, batch):
            yield perm[start:start + batch]


def _train_step(run: _Run, records: _TraceLists, idx: torch.Tensor, lr: float | None) -> bool:
    """One update on the minibatch `idx`; False (and no update) when its loss or gradient
    norm is not finite."""
    model, optimizer, loop = run.model, run.optimizer, run.trial.loop
    if loop.zero_grad:
        optimizer.zero_grad()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    loss = run.objective(model(run.x_train[idx]), run.y_train[idx])
    loss.backward()
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
    )
    records.step_loss.append(loss.item())
    records.grad_norm.append(norm.item())
    if not (np.isfinite(records.step_loss[-1]) and np.isfinite(records.grad_norm[-1])):
        return False
    before = parameters_to_vector(model.parameters()).detach().clone()
    first, last = records.weights[0].grad, records.weights[-1].grad
    records.extra["grad_norm_first"].append(torch.linalg.vector_norm(first).item())
    records.extra["grad_norm_last"].append(torch.linalg.vector_norm(last).item())
    if loop.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip_norm)
    optimizer.step()
    with torch.no_grad():
        records.update(before, parameters_to_vector(model.parameters()))
    return True


def _after_updates(run: _Run, records: _TraceLists, control: _LoopControl, step: int) -> bool:
    """Diagnostics and evaluation due after `step` updates (in that order); False when the
    trial ends there (a non-finite evaluation loss, or a stop)."""
    if step in run.plan.diag_at:
        records.diag.append((step, *measure_diagnostics(
            run.trial, run.model, run.data, run.x_train, run.y_train, run.optimizer)))
    if step not in run.plan.eval_at:
        return True
    row = _evaluate(run, step)
    records.evals.append(row)
    if not (np.isfinite(row[1]) and np.isfinite(row[2])):
        records.divergence_step = step
        return False
    return not control.stops(step, row[2])


def _evaluate(run: _Run, step: int) -> tuple[float, ...]:
    """(step, *EVAL_FIELDS) of the full splits, activation health on the probe batch (the
    first training rows); in training mode when the trial forgets `model.eval()`."""
    model, trial = run.model, run.trial
    model.train(trial.model.dropout_at_eval)
    with torch.no_grad():
        out_train, hidden = _forward_probed(model, run.x_train)
        out_val = model(run.x_val)
        dead, saturated = activation_stats(hidden, trial.model.activation)
        classify = run.data.loss == "cross_entropy"
        row = (step, run.criterion(out_train, run.y_train).item(),
               run.criterion(out_val, run.y_val).item(),
               _accuracy(out_train, run.y_train) if classify else np.nan,
               _accuracy(out_val, run.y_val) if classify else np.nan,
               dead.item(), saturated.item())
    model.train()
    return row


def _forward_probed(model: torch.nn.Sequential, x: torch.Tensor
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """model(x), and each hidden Linear's pre-activations on the first PROBE_SIZE rows."""
    hidden: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, z: hidden.append(z[:PROBE_SIZE]))
             for m in list(model)[:-1] if isinstance(m, torch.nn.Linear)]
    try:
        return model(x), hidden
    finally:
        for hook in hooks:
            hook.remove()


def build_optimizer(trial: TrialSpec, model: torch.nn.Sequential) -> torch.optim.Optimizer:
    """torch's optimizer over `model`, as a user writes it: one parameter group, or with
    `loop.decay_layers` the weights of those linear layers in a group with the optimizer's
    weight_decay and every other parameter in a group with none."""
    layers = trial.loop.decay_layers
    if layers is None:
        return trial.optimizer.build(model.parameters())
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    decayed = [linears[i].weight for i in layers]
    rest = [p for p in model.parameters() if all(p is not q for q in decayed)]
    return trial.optimizer.build([{"params": decayed}, {"params": rest, "weight_decay": 0.0}])


def measure_diagnostics(trial: TrialSpec, model: torch.nn.Sequential, data: Dataset,
                        x_train: torch.Tensor, y_train: torch.Tensor,
                        optimizer: torch.optim.Optimizer | None = None
                        ) -> tuple[float, float, float]:
    """(sharpness, noise scale, preconditioned sharpness) of `model` now, NaN for those not
    asked for; the preconditioned one with sharpness, for an adaptive `optimizer`, read from
    its state (`study.engine.batched_optimizers.preconditioner`)."""
    spec = trial.diagnostics
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    net = Network(tuple((m.in_features, m.out_features) for m in layers), trial.model.activation)
    flat = net.flatten([(m.weight.detach(), m.bias.detach()) for m in layers])[None]
    values = [float("nan")] * 3
    if not torch.isfinite(flat).all():
        return values[0], values[1], values[2]
    start = [seed_streams(trial.seed).init]
    if spec.sharpness:
        values[0] = sharpness(net, flat, x_train[None], y_train[None], data.loss,
                              spec.iterations, start).item()
        if optimizer is not None and adaptive(trial.optimizer):
            p = _preconditioner(trial, optimizer, net, layers)
            values[2] = sharpness(net, flat, x_train[None], y_train[None], data.loss,
                                  spec.iterations, start, preconditioner=p).item()
    if spec.noise_scale:
        k = spec.max_examples
        values[1] = gradient_noise_scale(net, flat, x_train[None, :k], y_train[None, :k],
                                         data.loss).item()
    return values[0], values[1], values[2]


def _preconditioner(trial: TrialSpec, optimizer: torch.optim.Optimizer, net: Network,
                    layers: list[torch.nn.Linear]) -> torch.Tensor:
    """[1, P] the preconditioner of torch's optimizer state, in `net`'s row layout (NaN
    before the first step)."""
    spec = trial.optimizer
    second_key = ("max_exp_avg_sq" if getattr(spec, "amsgrad", False) else
                  {"Adam": "exp_avg_sq", "AdamW": "exp_avg_sq", "RMSprop": "square_avg",
                   "Adagrad": "sum"}[type(spec).__name__])

    def row(key: str) -> torch.Tensor:
        state = optimizer.state
        return net.flatten([(state[m.weight][key], state[m.bias][key]) for m in layers])[None]

    first = optimizer.state.get(layers[0].weight, {})
    if "step" not in first or int(first["step"]) == 0:
        return torch.full((1, net.n_params), float("nan"), dtype=torch.float64)
    centered = getattr(spec, "centered", False)
    return preconditioner([spec], int(first["step"]), row(second_key),
                          row("grad_avg") if centered else None)

def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).to(torch.float64).mean().item()


def _to_device(data: Dataset, dtype: torch.dtype, device: torch.device):
    def cast(y: torch.Tensor) -> torch.Tensor:
        return y.to(device) if data.loss == "cross_entropy" else y.to(device=device, dtype=dtype)

    return (data.x_train.to(device=device, dtype=dtype), cast(data.y_train),
            data.x_val.to(device=device, dtype=dtype), cast(data.y_val))
