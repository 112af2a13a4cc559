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

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from study.engine.base import OnEval
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
from study.optim import adaptive, preconditioner
from study.seeds import seed_streams
from study.tasks import Dataset
from study.trace import Trace
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
        def hook(i: int):
            return None if on_eval is None else (
                lambda step, val: i in on_eval(step, {i: val}))

        return [train_trial(trial, torch.device(device), hook(i))
                for i, trial in enumerate(trials)]


def train_trial(trial: TrialSpec, device: torch.device,
                on_eval: Callable[[int, float], bool] | None = None) -> Trace:
    """Train one trial; see `Trace` for what is recorded and when it stops.

    `on_eval(step, validation loss)` is called after every evaluation; True stops the trial
    there (its trace ends at that evaluation, not diverged; at the last one it changes
    nothing)."""
    seeds = seed_streams(trial.seed)
    data = trial_dataset(trial, seeds.data)
    dtype = trial.train.torch_dtype
    x_train, y_train, x_val, y_val = _to_device(data, dtype, device)
    params = init_parameters(trial.model, trial.task.input_dim, trial.task.output_dim,
                             torch.Generator().manual_seed(seeds.init))
    dropout = torch.Generator().manual_seed(dropout_seed(trial.seed))
    model = build_module(trial.model, params, dtype, device, dropout)
    for transform in trial.transforms:
        if hasattr(transform, "edit_module"):
            model = transform.edit_module(model)
    optimizer = trial.optimizer.build(model.parameters())
    loop = trial.loop
    criterion = evaluation_loss(data, device, dtype)
    objective = training_loss(loop, data, trial.task.output_dim, device)
    base_lr = trial.optimizer.lr
    plateau = (Plateau(loop.plateau_factor, loop.plateau_patience, loop.plateau_threshold)
               if loop.plateau_factor is not None else None)
    stopper = (EarlyStopper(loop.early_stopping_patience)
               if loop.early_stopping_patience is not None else None)

    n = data.n_train
    batch = trial.train.resolved_batch_size(n)
    planned = trial.train.total_steps(n)
    per_epoch = trial.train.steps_per_epoch(n)
    eval_at = set(trial.train.eval_steps(n))
    order = torch.Generator().manual_seed(seeds.order)
    classify = data.loss == "cross_entropy"

    step_loss: list[float] = []
    grad_norm: list[float] = []
    # Instrumentation beyond the plain loop (see Trace): per-step layer, parameter and
    # update norms; per-eval activation health on a fixed probe batch.
    extra: dict[str, list[float]] = {k: [] for k in (
        "grad_norm_first", "grad_norm_last", "param_norm", "update_norm", "update_cosine")}
    evals: list[tuple[float, ...]] = []
    divergence_step = None
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    previous_update: torch.Tensor | None = None

    diag_at = set(trial.diagnostics.steps(trial.train, n))
    diag: list[tuple[float, float, float, float]] = []

    def diagnose(step: int) -> None:
        if step in diag_at:
            diag.append((step, *measure_diagnostics(trial, model, data, x_train, y_train,
                                                    optimizer)))

    def evaluate(step: int) -> bool:
        model.train(trial.model.dropout_at_eval)  # the failure: model.eval() forgotten
        with torch.no_grad():
            hidden: list[torch.Tensor] = []
            hooks = [m.register_forward_hook(lambda _m, _i, z: hidden.append(z[:PROBE_SIZE]))
                     for m in list(model)[:-1] if isinstance(m, torch.nn.Linear)]
            out_train = model(x_train)  # the probe: pre-activations of its first rows
            for hook in hooks:
                hook.remove()
            out_val = model(x_val)
            dead, saturated = activation_stats(hidden, trial.model.activation)
            row = (step, criterion(out_train, y_train).item(), criterion(out_val, y_val).item(),
                   _accuracy(out_train, y_train) if classify else np.nan,
                   _accuracy(out_val, y_val) if classify else np.nan,
                   dead.item(), saturated.item())
        evals.append(row)
        model.train()
        return bool(np.isfinite(row[1]) and np.isfinite(row[2]))

    def stop_after_eval(step: int) -> bool:
        """Plateau and early-stopping bookkeeping on the eval just recorded."""
        val = evals[-1][2]
        if plateau is not None and step > 0:
            plateau.update(val, base_lr * plateau.multiplier)
        told = on_eval is not None and on_eval(step, val)
        stop = stopper is not None and stopper.update(val)
        return (stop or told) and step < planned

    step = 0
    stopped = False
    diagnose(0)
    if not evaluate(0):
        divergence_step = 0
    else:
        stopped = stop_after_eval(0)
    while divergence_step is None and not stopped and step < planned:
        perm = (torch.randperm(n, generator=order) if loop.shuffle else torch.arange(n))
        perm = perm.to(device)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            if loop.zero_grad:
                optimizer.zero_grad()
            if loop.scheduled:
                lr = base_lr * loop.lr_factor(step, per_epoch, planned)
                if plateau is not None:
                    lr = lr * plateau.multiplier
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss = objective(model(x_train[idx]), y_train[idx])
            loss.backward()
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
            )
            step_loss.append(loss.item())
            grad_norm.append(norm.item())
            if not (np.isfinite(step_loss[-1]) and np.isfinite(grad_norm[-1])):
                divergence_step = step
                break
            before = parameters_to_vector(model.parameters()).detach().clone()
            extra["grad_norm_first"].append(torch.linalg.vector_norm(weights[0].grad).item())
            extra["grad_norm_last"].append(torch.linalg.vector_norm(weights[-1].grad).item())
            if loop.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip_norm)
            optimizer.step()
            with torch.no_grad():
                update = parameters_to_vector(model.parameters()) - before
                extra["param_norm"].append(torch.linalg.vector_norm(before).item())
                extra["update_norm"].append(torch.linalg.vector_norm(update).item())
                extra["update_cosine"].append(
                    np.nan if previous_update is None
                    else F.cosine_similarity(update, previous_update, dim=0, eps=1e-30).item())
                previous_update = update
            step += 1
            diagnose(step)
            if step in eval_at:
                if not evaluate(step):
                    divergence_step = step
                    break
                if stop_after_eval(step):
                    stopped = True
                    break

    ev = np.array(evals, dtype=np.float64).reshape(-1, 7)
    dg = np.array(diag, dtype=np.float64).reshape(-1, 4) if diag_at else None
    precond = dg is not None and trial.diagnostics.sharpness and adaptive(trial.optimizer)
    return Trace(
        step_loss=np.asarray(step_loss, dtype=np.float64),
        grad_norm=np.asarray(grad_norm, dtype=np.float64),
        eval_step=ev[:, 0].astype(np.int64),
        train_loss=ev[:, 1],
        val_loss=ev[:, 2],
        train_acc=ev[:, 3] if classify else None,
        val_acc=ev[:, 4] if classify else None,
        divergence_step=divergence_step,
        planned_steps=planned,
        irreducible_loss=data.irreducible_loss,
        input_free_loss=data.input_free_loss(),
        dead_fraction=ev[:, 5],
        saturation_fraction=ev[:, 6],
        **{k: np.asarray(v, dtype=np.float64) for k, v in extra.items()},
        diag_step=None if dg is None else dg[:, 0].astype(np.int64),
        sharpness=None if dg is None else dg[:, 1],
        noise_scale=None if dg is None else dg[:, 2],
        precond_sharpness=dg[:, 3] if precond else None,
    )


def measure_diagnostics(trial: TrialSpec, model: torch.nn.Sequential, data: Dataset,
                        x_train: torch.Tensor, y_train: torch.Tensor,
                        optimizer: torch.optim.Optimizer | None = None
                        ) -> tuple[float, float, float]:
    """(sharpness, noise scale, preconditioned sharpness) of `model` now, NaN for those not
    asked for; the preconditioned one with sharpness, for an adaptive `optimizer`, read from
    its state (`study.optim.preconditioner`)."""
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
