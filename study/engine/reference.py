"""The reference engine: the plain loop a user would write, one trial at a time.

nn.Sequential + torch.optim, shuffled minibatches from a seeded generator,
zero_grad / backward / step. It is the oracle for the population engine and the baseline of
the benchmark, so it stays deliberately plain: clarity over speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from study.engine.base import Trace
from study.engine.diagnostics import gradient_noise_scale, sharpness
from study.engine.network import Network
from study.models import PROBE_SIZE, activation_stats, build_module, init_parameters
from study.seeds import seed_streams
from study.tasks import Dataset
from study.trial import TrialSpec


def loss_fn(name: str):
    """The task's training loss (mean over the batch)."""
    return F.mse_loss if name == "mse" else F.cross_entropy


class ReferenceEngine:
    """Loops over trials; see the module docstring."""

    name = "reference"
    # Trials train one by one anyway: small batches keep the progress bar and the curves
    # files moving, and lose little work to a kill.
    population_limit = 8

    def run(self, trials: Sequence[TrialSpec], device: torch.device) -> list[Trace]:
        return [train_trial(trial, torch.device(device)) for trial in trials]


def train_trial(trial: TrialSpec, device: torch.device) -> Trace:
    """Train one trial; see `Trace` for what is recorded and when it stops."""
    seeds = seed_streams(trial.seed)
    data = trial.task.generate(seeds.data)
    dtype = trial.train.torch_dtype
    x_train, y_train, x_val, y_val = _to_device(data, dtype, device)
    params = init_parameters(trial.model, trial.task.input_dim, trial.task.output_dim,
                             torch.Generator().manual_seed(seeds.init))
    model = build_module(trial.model, params, dtype, device)
    optimizer = trial.optimizer.build(model.parameters())
    criterion = loss_fn(data.loss)

    n = data.n_train
    batch = trial.train.resolved_batch_size(n)
    planned = trial.train.total_steps(n)
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
    probe = x_train[:PROBE_SIZE]
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    previous_update: torch.Tensor | None = None

    diag_at = set(trial.diagnostics.steps(trial.train, n))
    diag: list[tuple[float, float, float]] = []

    def diagnose(step: int) -> None:
        if step in diag_at:
            diag.append((step, *measure_diagnostics(trial, model, data, x_train, y_train)))

    def evaluate(step: int) -> bool:
        with torch.no_grad():
            out_train, out_val = model(x_train), model(x_val)
            dead, saturated = activation_stats(_hidden_pre_activations(model, probe),
                                               trial.model.activation)
            row = (step, criterion(out_train, y_train).item(), criterion(out_val, y_val).item(),
                   _accuracy(out_train, y_train) if classify else np.nan,
                   _accuracy(out_val, y_val) if classify else np.nan,
                   dead.item(), saturated.item())
        evals.append(row)
        return bool(np.isfinite(row[1]) and np.isfinite(row[2]))

    step = 0
    diagnose(0)
    if not evaluate(0):
        divergence_step = 0
    while divergence_step is None and step < planned:
        perm = torch.randperm(n, generator=order).to(device)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            optimizer.zero_grad()
            loss = criterion(model(x_train[idx]), y_train[idx])
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
            if step in eval_at and not evaluate(step):
                divergence_step = step
                break

    ev = np.array(evals, dtype=np.float64).reshape(-1, 7)
    dg = np.array(diag, dtype=np.float64).reshape(-1, 3) if diag_at else None
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
        dead_fraction=ev[:, 5],
        saturation_fraction=ev[:, 6],
        **{k: np.asarray(v, dtype=np.float64) for k, v in extra.items()},
        diag_step=None if dg is None else dg[:, 0].astype(np.int64),
        sharpness=None if dg is None else dg[:, 1],
        noise_scale=None if dg is None else dg[:, 2],
    )


def measure_diagnostics(trial: TrialSpec, model: torch.nn.Sequential, data: Dataset,
                        x_train: torch.Tensor, y_train: torch.Tensor) -> tuple[float, float]:
    """(sharpness, noise scale) of `model` now, NaN for the one not asked for."""
    spec = trial.diagnostics
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    net = Network(tuple((m.in_features, m.out_features) for m in layers), trial.model.activation)
    flat = net.flatten([(m.weight.detach(), m.bias.detach()) for m in layers])[None]
    values = [float("nan"), float("nan")]
    if not torch.isfinite(flat).all():
        return values[0], values[1]
    if spec.sharpness:
        values[0] = sharpness(net, flat, x_train[None], y_train[None], data.loss,
                              spec.iterations, [seed_streams(trial.seed).init]).item()
    if spec.noise_scale:
        k = spec.max_examples
        values[1] = gradient_noise_scale(net, flat, x_train[None, :k], y_train[None, :k],
                                         data.loss).item()
    return values[0], values[1]


def _hidden_pre_activations(model: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Pre-activations of every hidden layer (every Linear but the last) on `x`."""
    out, h = [], x
    layers = list(model)
    for i, layer in enumerate(layers[:-1]):
        h = layer(h)
        if isinstance(layer, torch.nn.Linear) and i + 1 < len(layers):
            out.append(h)
    return out


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).to(torch.float64).mean().item()


def _to_device(data: Dataset, dtype: torch.dtype, device: torch.device):
    def cast(y: torch.Tensor) -> torch.Tensor:
        return y.to(device) if data.loss == "cross_entropy" else y.to(device=device, dtype=dtype)

    return (data.x_train.to(device=device, dtype=dtype), cast(data.y_train),
            data.x_val.to(device=device, dtype=dtype), cast(data.y_val))
