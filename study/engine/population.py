"""The population engine: many trials of one structure trained as one batched computation.

Parameters are one [T, P] tensor (`study.engine.network`), the optimizer update a handful of
elementwise ops on it (`study.optim`). Per step there is no Python loop over trials and no
host synchronisation: records are written into preallocated [steps, ..., T] device tensors
and copied back once, at the end.

Each trial reproduces the reference engine's numbers: its own data draw, its own init, its
own batch order (one `torch.randperm` per epoch from its order generator, batches
`perm[start:start + batch]`, the last one partial), and the same records (`Trace`). Nothing
couples the rows: every reduction (loss, norms, accuracy, diagnostics) is per trial.

A full batch is the whole training split, in every epoch: its order changes only the order
in which the loss and the gradient are summed. Such a population (without dropout) trains on
the split in its stored order, so that an evaluation and the next step share one forward pass
over the same parameters (the evaluation's train rows are the step's batch). That saves a
third of a full-batch step's products; the traces stay within the contract's rounding
(docs/performance.md).

Divergence: a trial whose minibatch loss, gradient norm or eval loss is non-finite is frozen
from that point (its parameters and optimizer state no longer change) and its trace is cut
there exactly as the reference engine cuts it. Every `check_every` steps and at each epoch
the engine counts the trials still alive (one synchronisation): it stops when none is, and
drops frozen rows from the computation once they are a large enough share.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from study.engine.base import OnEval, population_key
from study.engine.fused import FusedUpdate, fusable
from study.engine.network import Network, eval_losses, train_loss_and_grad
from study.failures import trial_dataset
from study.failures.loop import EarlyStopper, Plateau, class_weights
from study.models import (
    PROBE_SIZE,
    RELU_FAMILY,
    SATURATION_Z,
    dropout_mask,
    dropout_seed,
    init_parameters,
)
from study.optim import adaptive, make_population_optimizer
from study.seeds import seed_streams
from study.tasks import Dataset
from study.trace import EVAL_FIELDS, STEP_FIELDS, Trace
from study.trial import TrialSpec

__all__ = ["BatchedEngine", "DatasetCache", "Network"]

log = logging.getLogger(__name__)
Tensor = torch.Tensor


class DatasetCache:
    """Trial data keyed by (task, data transforms, data seed): trials sharing them share one
    dataset."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.items: OrderedDict[tuple[str, str, int], Dataset] = OrderedDict()

    def get(self, trial: TrialSpec, seed: int) -> Dataset:
        key = data_key(trial, seed)
        if key not in self.items:
            self.items[key] = trial_dataset(trial, seed)
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(key)
        return self.items[key]


def data_key(trial: TrialSpec, seed: int) -> tuple[str, str, int]:
    """What determines a trial's data: task, data transforms, data seed."""
    return repr(trial.task), repr(trial.data_transforms), seed


def reference_only(trial: TrialSpec) -> str | None:
    """Why `trial` cannot train batched (None: it can)."""
    for transform in trial.transforms:
        if hasattr(transform, "edit_module"):
            return f"{type(transform).__name__} edits the nn.Module"
    return None


class BatchedEngine:
    """Trains each population of `trials` as one batched computation; see the module doc."""

    name = "batched"

    def __init__(self, check_every: int = 32, compact_below: float = 0.75,
                 fused: bool = True) -> None:
        self.check_every = check_every
        self.compact_below = compact_below
        self.fused = fused  # False: always the eager update (study.optim), also on the CPU
        self.datasets = DatasetCache()

    def run(self, trials: Sequence[TrialSpec], device: torch.device,
            on_eval: OnEval | None = None) -> list[Trace]:
        """One Trace per trial, in order; trials of different structure train separately.

        `on_eval`: see `Engine` (asked once per population evaluation, for its rows).

        Trials the batched computation cannot express (`reference_only`) train on the
        reference engine instead, and the log says so.
        """
        groups: dict[str, list[int]] = defaultdict(list)
        traces: list[Trace | None] = [None] * len(trials)
        fallback = [(i, reason) for i, t in enumerate(trials)
                    if (reason := reference_only(t)) is not None]
        if fallback:
            from study.engine.reference import ReferenceEngine

            log.warning("%d trial(s) fall back to the reference engine (%s)", len(fallback),
                        "; ".join(sorted({r for _, r in fallback})))
            ref = ReferenceEngine().run([trials[i] for i, _ in fallback], device,
                                        _shifted(on_eval, [i for i, _ in fallback]))
            for (i, _), trace in zip(fallback, ref, strict=True):
                traces[i] = trace
        for i, trial in enumerate(trials):
            if traces[i] is None:
                groups[repr(population_key(trial))].append(i)
        for indices in groups.values():
            # Rows of one optimizer type contiguous: each type's update runs on its block.
            indices.sort(key=lambda i: type(trials[i].optimizer).__name__)
            population = [trials[i] for i in indices]
            for i, trace in zip(indices, self._train(population, torch.device(device),
                                                     _shifted(on_eval, indices)), strict=True):
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
        first = repr(population_key(trials[0]))
        if any(repr(population_key(t)) != first for t in trials[1:]):
            raise ValueError("a population's trials must share one population_key")
        return self._train(trials, device)

    def _train(self, trials: Sequence[TrialSpec], device: torch.device,
               on_eval: OnEval | None = None) -> list[Trace]:
        """`train` of trials already known to share one population_key."""
        if len(trials) == 1:
            return _Population([trials[0]] * 2, device, self, on_eval, real=1).run()[:1]
        return _Population(trials, device, self, on_eval).run()


def _shifted(on_eval: OnEval | None, indices: Sequence[int]) -> OnEval | None:
    """`on_eval` for a part of the trials: local index j is `indices[j]` of the whole."""
    if on_eval is None:
        return None

    def hook(step: int, values: dict[int, float]) -> set[int]:
        local = {indices[j]: j for j in values}
        return {local[i] for i in on_eval(step, {indices[j]: v for j, v in values.items()})}

    return hook


class _Population:
    """The state of one population during training (rows = trials still computed)."""

    def __init__(self, trials: Sequence[TrialSpec], device: torch.device,
                 engine: BatchedEngine, on_eval: OnEval | None = None,
                 real: int | None = None) -> None:
        first = trials[0]
        self.engine, self.device, self.trials = engine, device, list(trials)
        # The hook sees the first `real` rows (a lone trial trains beside a copy of itself).
        self.on_eval, self.real = on_eval, len(trials) if real is None else real
        self.on_cpu = device.type == "cpu"
        self.dtype = first.train.torch_dtype
        task = first.task
        seeds = [seed_streams(t.seed) for t in trials]
        keys = [data_key(t, s.data) for t, s in zip(trials, seeds, strict=True)]
        # One draw per distinct key (in order of first appearance), asked of the cache once:
        # a population may hold more distinct draws than the cache keeps, and asking per
        # trial would regenerate them.
        draws: dict[tuple[str, str, int], Dataset] = {}
        for k, t, s in zip(keys, trials, seeds, strict=True):
            if k not in draws:
                draws[k] = engine.datasets.get(t, s.data)
        data = list(draws.values())
        mine = [draws[k] for k in keys]  # each trial's own draw
        self.loss, self.n_train = data[0].loss, data[0].n_train
        self.y_dtype = torch.int64 if self.loss == "cross_entropy" else self.dtype
        self.irreducible = [d.irreducible_loss for d in mine]
        free = {id(d): d.input_free_loss() for d in data}
        self.input_free = [free[id(d)] for d in mine]
        self.net = Network(tuple(first.model.layer_sizes(task.input_dim, task.output_dim)),
                           first.model.activation)

        # Data: [D, N, ...] per distinct draw; each trial indexes its draw's rows.
        position = {k: i for i, k in enumerate(draws)}
        which = torch.tensor([position[k] for k in keys], device=device)
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
        self.orders = [torch.Generator().manual_seed(s.order) for s in seeds]
        self.init_seeds = [s.init for s in seeds]  # diagnostics draw their start from it
        self.setup_loop(trials, mine, task.output_dim)
        specs = [t.optimizer for t in trials]
        # The CPU's fused update (study.engine.fused) where it applies, else the eager one.
        self.fused: FusedUpdate | None = None
        self.optimizer = None
        if engine.fused and self.on_cpu and fusable(specs, self.clip is not None,
                                                    self.accumulated is None):
            self.fused = FusedUpdate(specs, self.params)
        else:
            self.optimizer = make_population_optimizer(specs, self.params)

        train = first.train
        self.batch = train.resolved_batch_size(self.n_train)
        self.planned = train.total_steps(self.n_train)
        self.per_epoch = train.steps_per_epoch(self.n_train)
        self.eval_steps = train.eval_steps(self.n_train)
        self.diag_steps = first.diagnostics.steps(train, self.n_train)
        self.epochs = train.epochs
        # One batch per epoch, no dropout: train on the split as stored, and let an evaluation
        # hand its forward pass to the next step (see the module doc).
        self.whole_split = self.batch >= self.n_train and self.dropout_gens is None
        self.shared: tuple[Tensor, list] | None = None  # an evaluation's (outputs, saved)
        n = len(trials)
        # Records (NaN = not computed: the trace is cut before any of those).
        nan = math.nan
        self.steps = torch.full((self.planned, len(STEP_FIELDS), n), nan, dtype=self.dtype,
                                device=device)
        self.evals = torch.full((len(self.eval_steps), len(EVAL_FIELDS), n), nan,
                                dtype=torch.float64, device=device)
        # sharpness, noise scale, preconditioned sharpness
        self.diags = torch.full((len(self.diag_steps), 3, n), nan, dtype=torch.float64,
                                device=device)
        self.adaptive = [adaptive(t.optimizer) for t in trials]
        self.ids = torch.arange(n, device=device)  # original index of each computed row
        self.compacted = False  # rows dropped: ids is no longer arange(n)
        self.alive = torch.ones(n, dtype=torch.bool, device=device)
        self.all_alive = self.on_cpu  # host-side flag, CPU only (see mark_diverged)
        self.allocate()
        self.eval_buffers: list[Tensor] = []
        self.previous_norm: Tensor | None = None  # |previous update| [T]; None before one
        sizes = self.net.sizes
        self.offsets = np.cumsum([0] + [n for fi, fo in sizes for n in (fi * fo, fo)])
        self.first_weight = slice(0, sizes[0][0] * sizes[0][1])
        last = self.net.n_params - sizes[-1][1] - sizes[-1][0] * sizes[-1][1]
        self.last_weight = slice(last, last + sizes[-1][0] * sizes[-1][1])

    def setup_loop(self, trials: Sequence[TrialSpec], data: list[Dataset], classes: int
                   ) -> None:
        """Per-trial state of what failure modes and mitigations change in the loop."""
        loop = self.loop = trials[0].loop
        n, device = len(trials), self.device
        self.id_list = list(range(n))  # original index of each computed row, on the host
        self.target_scale = None
        if any(d.target_scale is not None for d in data):
            ones = torch.ones(trials[0].task.output_dim, dtype=torch.float64)
            self.target_scale = torch.stack([
                ones if d.target_scale is None else d.target_scale for d in data
            ])[:, None, :].to(device=device, dtype=self.dtype)
        self.class_weights = None
        if loop.loss == "weighted_cross_entropy":
            self.class_weights = torch.stack([class_weights(d.y_train, classes) for d in data]
                                             ).to(device=device, dtype=self.dtype)
        self.clip = None
        if loop.clip_norm is not None:
            self.clip = torch.tensor([t.loop.clip_norm for t in trials], dtype=torch.float64,
                                     device=device).to(self.dtype)
        self.accumulated = None if loop.zero_grad else torch.zeros_like(self.params)
        self.base_lr = [t.optimizer.lr for t in trials]
        self.plateaus = ([Plateau(t.loop.plateau_factor, t.loop.plateau_patience,
                                  t.loop.plateau_threshold) for t in trials]
                         if loop.plateau_factor is not None else None)
        self.stoppers = ([EarlyStopper(t.loop.early_stopping_patience) for t in trials]
                         if loop.early_stopping_patience is not None else None)
        self.stopped_at: dict[int, int] = {}
        model = trials[0].model
        self.dropout = model.dropout
        self.dropout_at_eval = model.dropout_at_eval and model.dropout > 0
        self.dropout_gens = ([torch.Generator().manual_seed(dropout_seed(t.seed)) for t in trials]
                             if model.dropout > 0 else None)

    def masks(self, rows: Sequence[int]) -> list[Tensor] | None:
        """Dropout masks [T, sum(rows), width] per hidden layer, drawn per trial in the
        reference's order: for each block of `rows` examples, every hidden layer in turn."""
        if self.dropout_gens is None:
            return None
        widths = [fo for _, fo in self.net.sizes[:-1]]
        per_trial = []
        for i in self.id_list:  # drawn on the host (the trials' generators live there)
            g = self.dropout_gens[i]
            blocks = [[dropout_mask((r, w), self.dropout, g, self.dtype, "cpu")
                       for w in widths] for r in rows]
            per_trial.append([torch.cat([b[layer] for b in blocks]) for layer in
                              range(len(widths))])
        # One copy per layer that does not wait for the device (not one per trial).
        return [torch.stack([m[layer] for m in per_trial]).to(self.device, non_blocking=True)
                for layer in range(len(widths))]

    def learning_rates(self, step: int) -> list[float]:
        """Each computed row's learning rate for the update after `step` updates."""
        factor = self.loop.lr_factor(step, self.per_epoch, self.planned)
        lrs = [self.base_lr[i] * factor for i in self.id_list]
        if self.plateaus is not None:
            lrs = [lr * self.plateaus[i].multiplier for lr, i in zip(lrs, self.id_list,
                                                                    strict=True)]
        return lrs

    def after_eval(self, k: int, step: int) -> None:
        """Plateau, early stopping and `on_eval` on the validation losses of eval `k` (one
        sync)."""
        if self.plateaus is None and self.stoppers is None and self.on_eval is None:
            return
        val = self.evals[k, 1].tolist()
        alive = self.alive.tolist()
        told: set[int] = set()
        if self.on_eval is not None:
            rows = [i for row, i in enumerate(self.id_list) if alive[row] and i < self.real]
            told = set(self.on_eval(step, {i: val[i] for i in rows}))
            if self.real < len(self.trials) and 0 in told:
                told.add(1)  # the copy of a lone trial stops with it
        for row, i in enumerate(self.id_list):
            if not alive[row]:
                continue
            if self.plateaus is not None and step > 0:
                plateau = self.plateaus[i]
                plateau.update(val[i], self.base_lr[i] * plateau.multiplier)
            stop = self.stoppers is not None and self.stoppers[i].update(val[i])
            if (stop or i in told) and step < self.planned:
                self.stopped_at[i] = step
                self.alive[row] = False
        self.alive_changed()

    def layers(self, flat: Tensor) -> list:
        """`Network.layers` of a parameter buffer, kept while the buffer lives."""
        key = (flat.data_ptr(), tuple(flat.shape))
        if key not in self.views:
            self.views[key] = self.net.layers(flat)
        return self.views[key]

    def allocate(self) -> None:
        """Work buffers shaped like the parameter rows (again after rows were dropped)."""
        self.views: dict[tuple, list] = {}
        self.grad = torch.empty_like(self.params)
        if self.fused is None:  # the eager update's next params and update
            self.spare, self.update = torch.empty_like(self.params), torch.empty_like(self.params)
        else:  # the fused update's gradient: self.grad's memory as per-layer [T, n] blocks
            self.blocks = self.net.part_views(self.grad.view(-1), len(self.params))
        self.record = self.params.new_empty(len(STEP_FIELDS), len(self.params))
        previous = getattr(self, "previous", None)
        self.previous = torch.empty_like(self.params) if previous is None else previous

    def _stack(self, tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.stack(tensors).to(device=self.device, dtype=dtype)

    def run(self) -> list[Trace]:
        step, next_eval, next_diag = 0, 0, 0
        evals, diags = self.eval_steps, self.diag_steps

        def after(step: int) -> None:  # the reference's order: diagnostics, then evaluation
            nonlocal next_eval, next_diag
            if next_diag < len(diags) and diags[next_diag] == step:
                self.diagnose(next_diag)
                next_diag += 1
            if next_eval < len(evals) and evals[next_eval] == step:
                self.evaluate(next_eval)
                self.after_eval(next_eval, step)
                next_eval += 1

        after(0)
        for _ in range(self.epochs):
            if self.check(force=True) is False:
                break
            x_epoch, y_epoch = self.epoch_batches()
            for start in range(0, self.n_train, self.batch):
                self.train_step(step, x_epoch[:, start:start + self.batch],
                                y_epoch[:, start:start + self.batch])
                step += 1
                after(step)
                if step % self.engine.check_every == 0:
                    kept = self.check()
                    if kept is False:
                        break
                    if kept is not None:
                        x_epoch, y_epoch = x_epoch[kept], y_epoch[kept]
        return self.traces()

    def epoch_batches(self) -> tuple[Tensor, Tensor]:
        """This epoch's shuffled training split per trial: x [T, N, in], y [T, N, ...]
        (`whole_split`: the split as stored)."""
        if self.whole_split:
            return self.x_eval[:, :self.n_train], self.y_eval[:, :self.n_train]
        if self.loop.shuffle:
            perms = torch.stack([torch.randperm(self.n_train, generator=g) for g in self.orders])
        else:  # the failure: the stored order, every epoch
            perms = torch.arange(self.n_train).expand(len(self.orders), -1)
        rows = (perms.to(self.device) + self.row_offset[:, None]).flatten()
        shape = (len(self.orders), self.n_train)
        return (self.x_flat.index_select(0, rows).view(*shape, -1),
                self.y_flat.index_select(0, rows).view(*shape, *self.y_flat.shape[1:]))

    def train_step(self, step: int, xb: Tensor, yb: Tensor) -> None:
        params = self.params
        layers = self.layers(params)
        masks = self.masks([xb.shape[1]])
        if self.shared is not None:  # the last evaluation's forward: same rows, same params
            out, saved = self.shared
            self.shared = None
            n = xb.shape[1]
            out, saved = out[:, :n], [(h[:, :n], z[:, :n], a[:, :n]) for h, z, a in saved]
        else:
            out, saved = self.net.forward(params, xb, layers, masks)
        loop = self.loop
        loss, grad_out = train_loss_and_grad(out, yb, self.loss, loop.loss, loop.huber_delta,
                                             self.class_weights)
        # This step's records [STEP_FIELDS, T], written in place: straight into the record
        # tensor while the rows are the population's, else into a buffer copied over by id.
        rec = self.record if self.compacted else self.steps[step]
        rec[0].copy_(loss)
        lrs = self.learning_rates(step) if loop.scheduled else None
        if self.fused is not None:  # records, freezing and update in one kernel call
            # The gradient stays in its per-layer blocks (no concatenation into [T, P]).
            self.net.backward_parts(params, saved, grad_out, layers, masks, out=self.blocks)
            self.fused.step(params, self.grad.view(-1), self.offsets, self.previous, rec, loss,
                            self.alive, lrs)
            self.alive_changed()
        else:
            self.eager_update(params, saved, grad_out, layers, masks, rec, lrs)
        if self.compacted:
            self.steps[step].index_copy_(1, self.ids, rec)

    def eager_update(self, params: Tensor, saved: list, grad_out: Tensor, layers: list,
                     masks: list[Tensor] | None, rec: Tensor, lrs: list[float] | None) -> None:
        """Backward pass, records 1-6 into `rec` and the update, with the batched optimizers
        (`study.optim`; every device)."""
        # [T, P] buffers are reused step after step: params and the next params alternate,
        # and so do this update and the previous one (a fresh tensor costs page faults).
        new, grad, update = self.spare, self.grad, self.update
        self.net.backward(params, saved, grad_out, out=grad, layers=layers, masks=masks)
        used = grad  # the gradient the optimizer sees (torch: p.grad)
        if self.accumulated is not None:  # zero_grad forgotten: p.grad keeps summing
            used = self.accumulated.add_(grad)
        torch.linalg.vector_norm(used, dim=1, out=rec[1])
        torch.linalg.vector_norm(used[:, self.first_weight], dim=1, out=rec[2])
        torch.linalg.vector_norm(used[:, self.last_weight], dim=1, out=rec[3])
        torch.linalg.vector_norm(params, dim=1, out=rec[4])
        alive = self.mark_diverged(rec[:2])
        if self.clip is not None:  # clip_grad_norm_: max_norm / (norm + 1e-6), at most 1
            coef = (self.clip / (rec[1] + 1e-6)).clamp(max=1.0)
            used.mul_(coef[:, None])
        if used is not grad:
            grad.copy_(used)  # the optimizer uses grad as scratch space
        if lrs is not None:
            self.optimizer.set_lr(lrs)
        self.optimizer.step(params, grad, alive, out=new)
        torch.sub(new, params, out=update)
        torch.linalg.vector_norm(update, dim=1, out=rec[5])
        if self.previous_norm is None:
            rec[6].fill_(math.nan)
            self.previous_norm = rec[5].clone()
        else:  # F.cosine_similarity(eps=1e-30) with the norms already at hand
            torch.linalg.vecdot(update, self.previous, dim=1, out=rec[6])
            rec[6].div_(rec[5].clamp_min(1e-30).mul_(self.previous_norm.clamp_min(1e-30)))
            self.previous_norm.copy_(rec[5])
        self.params, self.spare = new, params
        self.update, self.previous = self.previous, update

    def mark_diverged(self, values: Tensor) -> Tensor | None:
        """Freeze the rows whose `values` [k, T] are not all finite; returns the optimizer's
        `alive` argument (None: every row alive, nothing to mask).

        On the CPU reading a value costs nothing (no device to wait for): while every row is
        alive, one finite sum proves they all still are, and the optimizer skips the masking
        of frozen rows (two passes over [T, P]). A sum that overflows takes the long way.
        """
        if self.on_cpu and self.all_alive and math.isfinite(float(values.sum())):
            return None
        self.alive &= torch.isfinite(values).all(dim=0)
        self.alive_changed()
        return None if self.all_alive else self.alive

    def alive_changed(self) -> None:
        """Refresh the host's all-alive flag after `alive` changed (CPU only; see
        `mark_diverged`)."""
        # numpy reads 117 flags in ~1 us; a torch reduction costs ~40 us of dispatch
        self.all_alive = self.on_cpu and bool(self.alive.numpy().all())

    def evaluate(self, k: int) -> None:
        rows, examples = self.x_eval.shape[:2]
        if len(self.eval_buffers) != len(self.net.sizes) or self.eval_buffers[0].shape[0] != rows:
            self.eval_buffers = [self.x_eval.new_empty(rows, examples, fo)
                                 for _, fo in self.net.sizes]
        hidden: list[Tensor] = []
        probe = min(PROBE_SIZE, self.n_train)  # the first training examples, unshuffled
        masks = (self.masks([self.n_train, examples - self.n_train])
                 if self.dropout_at_eval else None)
        inspect = lambda z: hidden.append(self.activation_health(z[:, :probe]))  # noqa: E731
        if self.whole_split and self.eval_steps[k] < self.planned:  # a step follows
            out, saved = self.net.forward(self.params, self.x_eval, self.layers(self.params),
                                          inspect=inspect)
            self.shared = (out, saved)
        else:
            out = self.net.evaluate(self.params, self.x_eval, self.eval_buffers, inspect,
                                    self.layers(self.params), masks)
        values = list(eval_losses(out, self.y_eval, self.loss, self.n_train,
                                  self.target_scale))
        nan = torch.full((rows,), math.nan, dtype=torch.float64, device=self.device)
        dead, saturated = self.combine_health(hidden, nan)
        record = torch.stack([nan if v is None else v.to(torch.float64)
                              for v in (*values, dead, saturated)])
        self.evals[k].index_copy_(1, self.ids, record)
        self.alive &= torch.isfinite(values[0]) & torch.isfinite(values[1])
        self.alive_changed()

    def activation_health(self, z: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per hidden layer: (dead units [T], saturated entries [T], units) on `z` [T, B, U].

        The definitions of `models.activation_stats` in fewer passes: a unit is dead when
        its largest pre-activation over the probe is <= 0 (NaN compares False either way).
        """
        activation = self.net.activation
        dead = (z.amax(dim=1) <= 0).sum(dim=1) if activation in RELU_FAMILY else None
        saturated = ((z.abs() > SATURATION_Z[activation]).sum(dim=(1, 2))
                     if activation in SATURATION_Z else None)
        return dead, saturated, z.shape[-1]

    def combine_health(self, layers: list, nan: Tensor) -> tuple[Tensor, Tensor]:
        """(dead fraction, saturation fraction) [T] over all hidden units (NaN: undefined)."""
        units = sum(u for _, _, u in layers)
        probe = min(PROBE_SIZE, self.n_train)
        dead = saturated = nan
        if layers and layers[0][0] is not None:
            dead = sum(d for d, _, _ in layers).to(torch.float64) / units
        if layers and layers[0][1] is not None:
            saturated = sum(s for _, s, _ in layers).to(torch.float64) / (units * probe)
        return dead, saturated

    def diagnose(self, k: int) -> None:
        """Opt-in sharpness / noise scale / preconditioned sharpness (adaptive rows) of every
        row (NaN for non-finite parameters)."""
        from study.engine.landscape import gradient_noise_scale, sharpness

        spec = self.trials[0].diagnostics
        finite = torch.isfinite(self.params).all(dim=1)
        flat = torch.where(finite[:, None], self.params, torch.zeros_like(self.params))
        x, y = self.x_eval[:, :self.n_train], self.y_eval[:, :self.n_train]
        values = torch.full((3, len(self.ids)), math.nan, dtype=torch.float64,
                            device=self.device)
        if spec.sharpness:
            values[0] = sharpness(self.net, flat, x, y, self.loss, spec.iterations,
                                  self.init_seeds)
            if any(self.adaptive[i] for i in self.id_list):
                p = (self.fused or self.optimizer).preconditioner()
                values[2] = sharpness(self.net, flat, x, y, self.loss, spec.iterations,
                                      self.init_seeds, preconditioner=p)
        if spec.noise_scale:
            m = spec.max_examples
            values[1] = gradient_noise_scale(self.net, flat, x[:, :m], y[:, :m], self.loss)
        values[:, ~finite] = math.nan
        self.diags[k].index_copy_(1, self.ids, values)

    def check(self, force: bool = False) -> Tensor | bool | None:
        """Synchronise on the alive count: False = none left; rows kept if it compacted."""
        alive = int(self.alive.sum())
        if alive == 0:
            return False
        rows = len(self.ids)
        if alive == rows or (not force and alive > self.engine.compact_below * rows):
            return None
        kept = self.alive.nonzero().squeeze(1)
        if alive == 1:  # keep two rows (see BatchedEngine.train)
            kept = torch.cat([kept, (~self.alive).nonzero()[0]])
            if len(kept) == rows:
                return None
        self.shared = None  # an evaluation's forward of the dropped rows too
        self.ids, self.params = self.ids[kept], self.params[kept]
        (self.fused or self.optimizer).select(kept)
        self.row_offset = self.row_offset[kept]
        self.x_eval, self.y_eval = self.x_eval[kept], self.y_eval[kept]
        for name in ("target_scale", "class_weights", "clip", "accumulated"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[kept])
        self.previous = self.previous[kept]
        if self.previous_norm is not None:
            self.previous_norm = self.previous_norm[kept]
        self.allocate()
        index = kept.tolist()
        self.id_list = [self.id_list[i] for i in index]
        self.orders = [self.orders[i] for i in index]
        self.init_seeds = [self.init_seeds[i] for i in index]
        self.alive = self.alive[kept]
        self.compacted = True
        self.alive_changed()
        return kept

    def traces(self) -> list[Trace]:
        """Cut each trial's records at its first non-finite value (as the reference does)."""
        steps = self.steps.to(torch.float64).cpu().numpy().transpose(2, 1, 0)  # [T, F, steps]
        evals = self.evals.cpu().numpy().transpose(2, 1, 0)
        diags = self.diags.cpu().numpy().transpose(2, 1, 0)
        eval_steps = np.asarray(self.eval_steps, dtype=np.int64)
        diag_steps = np.asarray(self.diag_steps, dtype=np.int64)
        classify = self.loss == "cross_entropy"
        out = []
        for t in range(len(self.trials)):
            if t in self.stopped_at:  # early stopping: alive and finite up to there
                divergence, last = None, self.stopped_at[t]
                n_steps = n_updates = last
            else:
                divergence, n_steps, n_updates = self._cut(steps[t], evals[t], eval_steps)
                last = self.planned if divergence is None else divergence
            n_evals = int(np.searchsorted(eval_steps, last, side="right"))
            n_diags = int(np.searchsorted(diag_steps, last, side="right"))
            s = {name: steps[t, i, :n_steps if i < 2 else n_updates].copy()
                 for i, name in enumerate(STEP_FIELDS)}
            e = {name: evals[t, i, :n_evals].copy() for i, name in enumerate(EVAL_FIELDS)}
            if not classify:
                e["train_acc"] = e["val_acc"] = None
            diag = {}
            if len(diag_steps):
                diag = {"diag_step": diag_steps[:n_diags].copy(),
                        "sharpness": diags[t, 0, :n_diags].copy(),
                        "noise_scale": diags[t, 1, :n_diags].copy(),
                        "precond_sharpness": (diags[t, 2, :n_diags].copy()
                                              if self.adaptive[t] and
                                              self.trials[t].diagnostics.sharpness
                                              else None)}
            out.append(Trace(eval_step=eval_steps[:n_evals].copy(), divergence_step=divergence,
                             planned_steps=self.planned, irreducible_loss=self.irreducible[t],
                             input_free_loss=self.input_free[t],
                             **s, **e, **diag))
        return out

    def _cut(self, steps: np.ndarray, evals: np.ndarray, eval_steps: np.ndarray
             ) -> tuple[int | None, int, int]:
        """(divergence step, step entries, update entries) of one trial's records."""
        bad = ~(np.isfinite(steps[0]) & np.isfinite(steps[1]))
        bad_step = int(np.argmax(bad)) if bad.any() else self.planned + 1
        bad_evals = ~(np.isfinite(evals[0]) & np.isfinite(evals[1]))
        if bad_evals.any():
            bad_eval = int(eval_steps[np.argmax(bad_evals)])
            if bad_eval <= bad_step:  # an evaluation precedes that step's minibatch
                return bad_eval, bad_eval, bad_eval
        if bad_step <= self.planned:
            return bad_step, bad_step + 1, bad_step
        return None, self.planned, self.planned
