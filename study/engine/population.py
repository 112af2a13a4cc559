"""The population engine: many trials of one structure trained as one batched computation.

A population's parameters are one [T, P] tensor (row t = trial t, each layer's weight
stored transposed as [fan_in, fan_out] then its bias), so a layer is a `baddbmm` over the
trial axis, the backward pass is written out by hand (the same aten backward kernels
autograd calls) and the optimizer update is a handful of elementwise ops on [T, P]
(`study.optim`). Per step there is no Python loop over trials and no host synchronisation:
records are written into preallocated [steps, T] device tensors and copied back once.

Each trial reproduces the reference engine's numbers: its own data draw, its own init,
its own batch order (one `torch.randperm` per epoch from its order generator, batches
`perm[start:start + batch]`, the last one partial). Nothing couples the rows: every
reduction (loss, gradient norm, accuracy) is per trial.

Divergence: a trial whose minibatch loss, gradient norm or eval loss is non-finite is frozen
from that point (its parameters and optimizer state no longer change, `torch.where`), and its
trace is cut there exactly as the reference engine cuts it. Every `check_every` steps the
engine looks at how many trials are still alive (one synchronisation): it stops when none is,
and drops the frozen rows from the computation once they are a large enough share.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from study.engine.base import Trace, population_key
from study.models import init_parameters
from study.optim import make_optimizer
from study.seeds import seed_streams
from study.tasks import Dataset
from study.trial import TrialSpec

Tensor = torch.Tensor
aten = torch.ops.aten

# activation -> (forward, backward(grad, pre_activation, post_activation)); the backward
# kernels are the ones autograd calls for the nn modules (torch defaults: leaky slope 0.01,
# ELU alpha 1, exact GELU).
ACTIVATIONS = {
    "relu": (torch.relu, lambda g, z, a: aten.threshold_backward(g, a, 0)),
    "leaky_relu": (F.leaky_relu, lambda g, z, a: aten.leaky_relu_backward(g, z, 0.01, False)),
    "elu": (F.elu, lambda g, z, a: aten.elu_backward(g, 1.0, 1, 1, False, z)),
    "silu": (F.silu, lambda g, z, a: aten.silu_backward(g, z)),
    "gelu": (F.gelu, lambda g, z, a: aten.gelu_backward(g, z)),
    "tanh": (torch.tanh, lambda g, z, a: aten.tanh_backward(g, a)),
    "sigmoid": (torch.sigmoid, lambda g, z, a: aten.sigmoid_backward(g, a)),
    "identity": (None, None),
}


@dataclass(frozen=True)
class Network:
    """Layer layout of the flat [T, P] parameter rows, with batched forward and backward."""

    sizes: tuple[tuple[int, int], ...]  # (fan_in, fan_out) per layer
    activation: str

    @property
    def n_params(self) -> int:
        return sum(fi * fo + fo for fi, fo in self.sizes)

    def layers(self, flat: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Views (weight [T, fan_in, fan_out], bias [T, 1, fan_out]) into `flat` [T, P]."""
        out, offset = [], 0
        for fi, fo in self.sizes:
            w = flat[:, offset:offset + fi * fo].view(-1, fi, fo)
            offset += fi * fo
            out.append((w, flat[:, None, offset:offset + fo]))
            offset += fo
        return out

    def flatten(self, parameters: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One trial's `init_parameters` (weight [fan_out, fan_in], bias) as a flat row."""
        return torch.cat([t for w, b in parameters for t in (w.T.reshape(-1), b)])

    def forward(self, flat: Tensor, x: Tensor) -> tuple[Tensor, list]:
        """Outputs [T, B, out] for inputs [T, B, in], and what the backward pass needs."""
        act = ACTIVATIONS[self.activation][0]
        saved, h = [], x
        layers = self.layers(flat)
        for i, (w, b) in enumerate(layers):
            z = torch.baddbmm(b, h, w)
            a = z if act is None or i == len(layers) - 1 else act(z)
            saved.append((h, z, a))
            h = a
        return h, saved

    def backward(self, flat: Tensor, saved: list, grad_out: Tensor) -> Tensor:
        """Gradient rows [T, P] from the gradient of the outputs [T, B, out]."""
        act_backward = ACTIVATIONS[self.activation][1]
        layers = self.layers(flat)
        parts: list[Tensor] = []
        g = grad_out
        for i in range(len(layers) - 1, -1, -1):
            h, _, _ = saved[i]
            parts.append(g.sum(1))
            parts.append(torch.bmm(h.transpose(1, 2), g).flatten(1))
            if i > 0:
                g = torch.bmm(g, layers[i][0].transpose(1, 2))
                if act_backward is not None:
                    _, z, a = saved[i - 1]
                    g = act_backward(g, z, a)
        return torch.cat(parts[::-1], dim=1)


def loss_and_grad(out: Tensor, y: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Per-trial mean loss [T] over the batch and its gradient wrt `out` [T, B, C].

    Mirrors `F.cross_entropy` (log_softmax + nll) and `F.mse_loss` with mean reduction, and
    the backward kernels autograd uses for them, trial by trial.
    """
    batch = out.shape[1]
    if loss == "mse":
        diff = out - y
        return diff.square().mean(dim=(1, 2)), diff * (2.0 / diff[0].numel())
    logp = torch.log_softmax(out, dim=-1)
    target = y[..., None]
    value = -logp.gather(-1, target).sum(dim=(1, 2)) / batch
    grad_logp = torch.zeros_like(logp).scatter_(-1, target, -1.0 / batch)
    return value, aten._log_softmax_backward_data(grad_logp, logp, -1, logp.dtype)


def eval_losses(out: Tensor, y: Tensor, loss: str, n_train: int) -> tuple[Tensor, ...]:
    """(train loss, val loss, train acc, val acc) [T] for outputs over train + val rows."""
    if loss == "mse":
        err = (out - y).square()
        return err[:, :n_train].mean(dim=(1, 2)), err[:, n_train:].mean(dim=(1, 2)), None, None
    logp = torch.log_softmax(out, dim=-1)
    nll = -logp.gather(-1, y[..., None]).squeeze(-1)
    hit = (out.argmax(dim=-1) == y).to(torch.float64)
    return (nll[:, :n_train].mean(1), nll[:, n_train:].mean(1),
            hit[:, :n_train].mean(1), hit[:, n_train:].mean(1))


class DatasetCache:
    """Task draws keyed by (task, data seed): trials sharing a seed share one dataset."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.items: OrderedDict[tuple[str, int], Dataset] = OrderedDict()

    def get(self, task, seed: int) -> Dataset:
        key = (repr(task), seed)
        if key not in self.items:
            self.items[key] = task.generate(seed)
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(key)
        return self.items[key]


class BatchedEngine:
    """Trains each population of `trials` as one batched computation; see the module doc."""

    name = "batched"

    def __init__(self, check_every: int = 32, compact_below: float = 0.75) -> None:
        self.check_every = check_every
        self.compact_below = compact_below
        self.datasets = DatasetCache()

    def run(self, trials: Sequence[TrialSpec], device: torch.device) -> list[Trace]:
        """One Trace per trial, in order; trials of different structure train separately."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, trial in enumerate(trials):
            groups[repr(population_key(trial))].append(i)
        traces: list[Trace | None] = [None] * len(trials)
        for indices in groups.values():
            population = [trials[i] for i in indices]
            for i, trace in zip(indices, self.train(population, torch.device(device)),
                                strict=True):
                traces[i] = trace
        return traces  # type: ignore[return-value]

    def train(self, trials: Sequence[TrialSpec], device: torch.device) -> list[Trace]:
        """Train trials that share one `population_key`.

        Note:
            A lone trial is trained next to a copy of itself: torch's CPU `bmm` takes another
            kernel for a batch of one, whose rounding differs, while every batch of two or
            more gives each row the same bits. With the copy, a trial's trace is bit-identical
            whatever population it trains in (tests/study/engine/test_population.py).
        """
        if len(trials) == 1:
            return _Population([trials[0]] * 2, device, self).run()[:1]
        return _Population(trials, device, self).run()


class _Population:
    """The state of one population during training (rows = trials still computed)."""

    def __init__(self, trials: Sequence[TrialSpec], device: torch.device,
                 engine: BatchedEngine) -> None:
        first = trials[0]
        if any(repr(population_key(t)) != repr(population_key(first)) for t in trials):
            raise ValueError("a population's trials must share one population_key")
        self.engine, self.device, self.trials = engine, device, list(trials)
        self.dtype = first.train.torch_dtype
        task = first.task
        seeds = [seed_streams(t.seed) for t in trials]
        data_seeds = sorted({s.data for s in seeds})
        data = [engine.datasets.get(task, s) for s in data_seeds]
        self.loss, self.n_train = data[0].loss, data[0].n_train
        self.y_dtype = torch.int64 if self.loss == "cross_entropy" else self.dtype
        self.irreducible = [data[data_seeds.index(s.data)].irreducible_loss for s in seeds]
        self.net = Network(tuple(first.model.layer_sizes(task.input_dim, task.output_dim)),
                           first.model.activation)

        # Data: [D, N, ...] per distinct draw; each trial indexes its draw's rows.
        which = torch.tensor([data_seeds.index(s.data) for s in seeds], device=device)
        x_train = self._stack([d.x_train for d in data], self.dtype)
        y_train = self._stack([d.y_train for d in data], self.y_dtype)
        self.x_flat = x_train.flatten(0, 1)  # [D * n_train, in]
        self.y_flat = y_train.flatten(0, 1)
        self.row_offset = which * self.n_train  # [T]
        x_val = self._stack([d.x_val for d in data], self.dtype)
        y_val = self._stack([d.y_val for d in data], self.y_dtype)
        self.x_eval = torch.cat([x_train, x_val], 1)[which]  # [T, n_train + n_val, in]
        self.y_eval = torch.cat([y_train, y_val], 1)[which]

        rows = []
        for trial, s in zip(trials, seeds, strict=True):
            params = init_parameters(trial.model, task.input_dim, task.output_dim,
                                     torch.Generator().manual_seed(s.init))
            rows.append(self.net.flatten(params))
        self.params = torch.stack(rows).to(device=device, dtype=self.dtype)
        self.optimizer = make_optimizer([t.optimizer for t in trials], self.params)
        self.orders = [torch.Generator().manual_seed(s.order) for s in seeds]

        train = first.train
        self.batch = train.resolved_batch_size(self.n_train)
        self.planned = train.total_steps(self.n_train)
        self.eval_steps = train.eval_steps(self.n_train)
        self.epochs = train.epochs
        n = len(trials)
        # Records [steps, T] (NaN = not computed: the trace is cut before any of them).
        self.step_loss = torch.full((self.planned, n), math.nan, dtype=self.dtype, device=device)
        self.grad_norm = torch.full_like(self.step_loss, math.nan)
        self.evals = torch.full((len(self.eval_steps), 4, n), math.nan, dtype=torch.float64,
                                device=device)
        self.ids = torch.arange(n, device=device)  # original index of each computed row
        self.alive = torch.ones(n, dtype=torch.bool, device=device)

    def _stack(self, tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.stack(tensors).to(device=self.device, dtype=dtype)

    def run(self) -> list[Trace]:
        step, next_eval = 0, 0
        if self.eval_steps[0] == 0:
            self.evaluate(0)
            next_eval = 1
        for _ in range(self.epochs):
            if self.check(force=True) is False:
                break
            x_epoch, y_epoch = self.epoch_batches()
            for start in range(0, self.n_train, self.batch):
                xb = x_epoch[:, start:start + self.batch]
                yb = y_epoch[:, start:start + self.batch]
                self.train_step(step, xb, yb)
                step += 1
                if next_eval < len(self.eval_steps) and self.eval_steps[next_eval] == step:
                    self.evaluate(next_eval)
                    next_eval += 1
                if step % self.engine.check_every == 0:
                    kept = self.check()
                    if kept is False:
                        break
                    if kept is not None:
                        x_epoch, y_epoch = x_epoch[kept], y_epoch[kept]
        return self.traces()

    def epoch_batches(self) -> tuple[Tensor, Tensor]:
        """This epoch's shuffled training split per trial: x [T, N, in], y [T, N, ...]."""
        perms = torch.stack([torch.randperm(self.n_train, generator=g) for g in self.orders])
        rows = (perms.to(self.device) + self.row_offset[:, None]).flatten()
        shape = (len(self.orders), self.n_train)
        return (self.x_flat.index_select(0, rows).view(*shape, -1),
                self.y_flat.index_select(0, rows).view(*shape, *self.y_flat.shape[1:]))

    def train_step(self, step: int, xb: Tensor, yb: Tensor) -> None:
        out, saved = self.net.forward(self.params, xb)
        loss, grad_out = loss_and_grad(out, yb, self.loss)
        grad = self.net.backward(self.params, saved, grad_out)
        norm = torch.linalg.vector_norm(grad, dim=1)
        self.step_loss[step].index_copy_(0, self.ids, loss)
        self.grad_norm[step].index_copy_(0, self.ids, norm)
        self.alive &= torch.isfinite(loss) & torch.isfinite(norm)
        self.params = self.optimizer.step(self.params, grad, self.alive)

    def evaluate(self, k: int) -> None:
        out, _ = self.net.forward(self.params, self.x_eval)
        values = eval_losses(out, self.y_eval, self.loss, self.n_train)
        for j, value in enumerate(values):
            if value is not None:
                self.evals[k, j].index_copy_(0, self.ids, value.to(torch.float64))
        self.alive &= torch.isfinite(values[0]) & torch.isfinite(values[1])

    def check(self, force: bool = False) -> Tensor | bool | None:
        """Synchronise on the alive count: False = none left; rows kept if it compacted."""
        alive = int(self.alive.sum())
        if alive == 0:
            return False
        if alive == len(self.ids) or (not force and alive > self.engine.compact_below
                                      * len(self.ids)):
            return None
        kept = self.alive.nonzero().squeeze(1)
        if alive == 1:  # keep two rows (see BatchedEngine.train)
            kept = torch.cat([kept, (~self.alive).nonzero()[0]])
            if len(kept) == len(self.ids):
                return None
        self.ids, self.params = self.ids[kept], self.params[kept]
        self.optimizer.select(kept)
        self.row_offset = self.row_offset[kept]
        self.x_eval, self.y_eval = self.x_eval[kept], self.y_eval[kept]
        self.orders = [self.orders[i] for i in kept.tolist()]
        self.alive = self.alive[kept]
        return kept

    def traces(self) -> list[Trace]:
        """Cut each trial's records at its first non-finite value (as the reference does)."""
        step_loss = self.step_loss.to(torch.float64).cpu().numpy().T
        grad_norm = self.grad_norm.to(torch.float64).cpu().numpy().T
        evals = self.evals.cpu().numpy().transpose(2, 1, 0)  # [T, 4, n_evals]
        eval_steps = np.asarray(self.eval_steps, dtype=np.int64)
        classify = self.loss == "cross_entropy"
        out = []
        for t in range(len(self.trials)):
            bad = ~(np.isfinite(step_loss[t]) & np.isfinite(grad_norm[t]))
            bad_step = int(np.argmax(bad)) if bad.any() else self.planned + 1
            bad_evals = ~(np.isfinite(evals[t, 0]) & np.isfinite(evals[t, 1]))
            bad_eval = int(eval_steps[np.argmax(bad_evals)]) if bad_evals.any() else None
            if bad_eval is not None and bad_eval <= bad_step:  # evals precede that step's batch
                divergence, n_steps = bad_eval, bad_eval
            elif bad_step <= self.planned:
                divergence, n_steps = bad_step, bad_step + 1
            else:
                divergence, n_steps = None, self.planned
            last = self.planned if divergence is None else divergence
            n_evals = int(np.searchsorted(eval_steps, last, side="right"))
            out.append(Trace(
                step_loss=step_loss[t, :n_steps].copy(),
                grad_norm=grad_norm[t, :n_steps].copy(),
                eval_step=eval_steps[:n_evals].copy(),
                train_loss=evals[t, 0, :n_evals].copy(),
                val_loss=evals[t, 1, :n_evals].copy(),
                train_acc=evals[t, 2, :n_evals].copy() if classify else None,
                val_acc=evals[t, 3, :n_evals].copy() if classify else None,
                divergence_step=divergence,
                planned_steps=self.planned,
                irreducible_loss=self.irreducible[t],
            ))
        return out
