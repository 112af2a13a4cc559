"""The population engine: many trials of one structure trained as one batched computation.

Parameters are one [T, P] tensor (`study.engine.network`), the optimizer update a handful of
elementwise ops on it (`batched_optimizers`). Per step there is no Python loop over trials and no
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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import partial

import torch

from study.engine import trial_major
from study.engine.base import OnEval, Pending, batch_key
from study.engine.batched_optimizers import (
    OPTIMIZERS,
    adaptive,
    make_population_optimizer,
)
from study.engine.fused import FusedUpdate, fusable
from study.engine.landscape import gradient_noise_scale, sharpness
from study.engine.network import Network, eval_losses, train_loss_and_grad
from study.engine.population_data import DatasetCache, PopulationData, shared
from study.engine.population_loop import LoopState
from study.engine.population_params import ParameterState
from study.engine.population_traces import DIAG_FIELDS, StepRecord, TraceBuffers
from study.models import PROBE_SIZE, RELU_FAMILY, SATURATION_Z, init_parameters
from study.seeds import SeedStreams, seed_streams
from study.trace import Trace
from study.transform import ModuleTransform
from study.trial import TrialSpec

__all__ = ["BatchedEngine", "DatasetCache", "Network"]

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def reference_only(trial: TrialSpec) -> str | None:
    """Why `trial` cannot train batched (None: it can): a transform that edits the module,
    or an optimizer spec of a class with no batched update (a user's own; also a subclass
    of one of study's, whose changes the batched update would not make)."""
    if type(trial.optimizer) not in OPTIMIZERS:
        return f"{type(trial.optimizer).__name__} has no batched update"
    for transform in trial.transforms:
        if isinstance(transform, ModuleTransform):
            return f"{type(transform).__name__} edits the nn.Module"
    return None


class BatchedEngine:
    """Trains each population of `trials` as one batched computation; see the module doc."""

    name = "batched"
    population_limit = None  # a population takes whatever fits the memory budget

    def __init__(self, check_every: int = 32, compact_below: float = 0.75,
                 fused: bool = True, trial_major: bool = True) -> None:
        self.check_every = check_every
        self.compact_below = compact_below
        self.fused = fused  # False: always the eager update (batched_optimizers), also on the CPU
        # False: never the trial-major kernel (study.engine.trial_major), always layer-major
        self.trial_major = trial_major and fused
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
                groups[batch_key(trial, device)].append(i)
        for indices in groups.values():
            indices = _optimizer_blocks(trials, indices)
            population = [trials[i] for i in indices]
            for i, trace in zip(indices, self._train(population, torch.device(device),
                                                     _shifted(on_eval, indices)), strict=True):
                traces[i] = trace
        return traces  # type: ignore[return-value]

    def start(self, trials: Sequence[TrialSpec], device: torch.device,
              on_eval: OnEval | None = None) -> Pending:
        """`run` in the background where it can be (`base.start`, `in_background`): the
        population is set up here, then trained on the kernel's threads while the caller
        goes on. Anything else trains here, as `run` trains it, and comes back done. The
        traces are the same either way."""
        if not self.in_background(trials, device, on_eval):
            return Pending.done(self.run(trials, device, on_eval))
        order = _optimizer_blocks(trials, range(len(trials)))  # `run`'s order
        pending = self._start_trial_major([trials[i] for i in order])

        def result() -> list[Trace]:
            traces: list[Trace | None] = [None] * len(trials)
            for i, trace in zip(order, pending.result(), strict=True):
                traces[i] = trace
            return traces  # type: ignore[return-value]

        return Pending(result, pending.cancel, pending.thread_cpu_s)

    def in_background(self, trials: Sequence[TrialSpec], device: torch.device,
                      on_eval: OnEval | None = None) -> bool:
        """Whether `start` trains `trials` in the background: one population on the
        trial-major kernel with nothing to run between its evaluations (no `on_eval`, early
        stopping, plateau or diagnostics: the kernel trains the whole run in one call)."""
        if not self.trial_major or not trials or _watched(trials[0], on_eval):
            return False
        key = batch_key(trials[0], device)
        return (all(reference_only(t) is None and batch_key(t, device) == key
                    for t in trials)
                and trial_major.fits(trials, torch.device(device)))

    def train(self, trials: Sequence[TrialSpec], device: torch.device) -> list[Trace]:
        """Train trials that share one `batch_key`.

        Note:
            A lone trial is trained next to a copy of itself: torch's CPU `bmm` takes another
            kernel for a batch of one, whose rounding differs, while every batch of two or
            more gives each row the same bits. With the copy, a trial's trace is bit-identical
            whatever population it trains in (tests/study/engine/test_population.py).
        """
        first = batch_key(trials[0], device)
        if any(batch_key(t, device) != first for t in trials[1:]):
            raise ValueError("a population's trials must share one batch_key")
        return self._train(trials, device)

    def _train(self, trials: Sequence[TrialSpec], device: torch.device,
               on_eval: OnEval | None = None) -> list[Trace]:
        """`train` of trials already known to share one batch_key."""
        if self.trial_major and trial_major.fits(trials, device):
            return self._train_trial_major(trials, on_eval)
        if len(trials) == 1:
            return _Population([trials[0]] * 2, device, self, on_eval, real=1).run()[:1]
        return _Population(trials, device, self, on_eval).run()


    def _train_trial_major(self, trials: Sequence[TrialSpec],
                           on_eval: OnEval | None = None) -> list[Trace]:
        """`_train` on the trial-major kernel (`trial_major.fits` holds)."""
        return self._start_trial_major(trials, on_eval).result()

    def _start_trial_major(self, trials: Sequence[TrialSpec],
                           on_eval: OnEval | None = None) -> Pending:
        """Each trial's run on the trial-major kernel as one loop nest between evaluations
        and diagnostics, which run here as `_Population` runs them; the same records. With
        nothing to run between evaluations, the kernel trains the whole run in one call
        that goes on in the background (`Kernel.start`)."""
        first, cpu = trials[0], torch.device("cpu")
        dtype = first.train.torch_dtype
        seeds = [seed_streams(t.seed) for t in trials]
        data = PopulationData(trials, seeds, self.datasets, cpu, dtype)
        task, train, n_train = first.task, first.train, data.n_train
        net = Network(tuple(first.model.layer_sizes(task.input_dim, task.output_dim)),
                      first.model.activation)
        planned, eval_steps = train.total_steps(n_train), train.eval_steps(n_train)
        diag_steps = first.diagnostics.steps(train, n_train)
        traces = TraceBuffers(len(trials), planned, eval_steps, diag_steps, dtype, cpu)
        params = _initial_parameters(net, trials, seeds).to(dtype).contiguous()
        kernel = trial_major.Kernel(net, params, [t.optimizer for t in trials], data,
                                    train.resolved_batch_size(n_train), first.loop.shuffle,
                                    eval_steps, traces.steps.numpy(),
                                    traces.evals.numpy(), first.loop,
                                    [t.loop.clip_norm for t in trials])
        loop = LoopState(trials, cpu, dtype, train.steps_per_epoch(n_train), planned)
        adaptive_rows = [adaptive(t.optimizer) for t in trials]

        def result() -> list[Trace]:
            return traces.traces(trials, data.irreducible, data.input_free, adaptive_rows,
                                 data.loss == "cross_entropy")

        if not _watched(first, on_eval):
            # Nothing to do between evaluations: the whole run, the first evaluation
            # included, in one call.
            if loop.spec.scheduled:
                kernel.schedule(0, [loop.learning_rates(s) for s in range(planned)])
            running = kernel.start(0, planned, eval_first=True)
            return Pending(lambda: (running.wait(), result())[1], running.cancel,
                           lambda: running.cpu_s)
        # One call per evaluation or diagnostics step; the loop runs in between.
        eval_at = {s: k for k, s in enumerate(eval_steps)}
        diag_at = {s: k for k, s in enumerate(diag_steps)}
        done = 0
        for i, boundary in enumerate(sorted({*eval_steps, *diag_steps})):
            if loop.spec.scheduled:  # a plateau changes the rates only at an evaluation
                kernel.schedule(done, [loop.learning_rates(s) for s in range(done, boundary)])
            kernel.advance(done, boundary, eval_first=i == 0)
            done = boundary
            if boundary in diag_at:  # the reference's order: diagnostics, then evaluation
                flat = torch.from_numpy(kernel.params)
                values = diagnostics(trials, net, data, flat, [s.init for s in seeds],
                                     adaptive_rows, partial(kernel.preconditioner, boundary))
                traces.write_diagnostics(diag_at[boundary], values)
            if boundary in eval_at and (loop.tracks_validation or on_eval is not None):
                val = traces.validation_losses(eval_at[boundary])
                alive = kernel.alive.tolist()
                told: set[int] = set()
                if on_eval is not None:
                    told = set(on_eval(boundary, {t: val[t] for t in range(len(trials))
                                                  if alive[t]}))
                stopped = loop.after_eval(boundary, val, alive, told)
                for row in stopped:
                    traces.stopped_at[row] = boundary
                kernel.stop(stopped)
            if not kernel.alive.any():
                break
        return Pending.done(result())


def _optimizer_blocks(trials: Sequence[TrialSpec], indices: Iterable[int]) -> list[int]:
    """`indices` with the rows of one optimizer type contiguous (stable): each type's
    update runs on its block."""
    return sorted(indices, key=lambda i: type(trials[i].optimizer).__name__)


def _watched(trial: TrialSpec, on_eval: OnEval | None) -> bool:
    """Whether the population loop runs between evaluations of `trial`'s population: an
    `on_eval` hook, early stopping or a plateau (`LoopSpec.tracks_validation`), or
    diagnostics. Without, the kernel trains the whole run in one call."""
    return (on_eval is not None or trial.loop.tracks_validation
            or trial.diagnostics.enabled)


def _shifted(on_eval: OnEval | None, indices: Sequence[int]) -> OnEval | None:
    """`on_eval` for a part of the trials: local index j is `indices[j]` of the whole."""
    if on_eval is None:
        return None

    def hook(step: int, values: dict[int, float]) -> set[int]:
        local = {indices[j]: j for j in values}
        return {local[i] for i in on_eval(step, {indices[j]: v for j, v in values.items()})}

    return hook


class _Population:
    """One population during training: its rows (trials still computed) and their parts
    (data, loop state, parameter and optimizer state, records), which drop rows together
    (`check`)."""

    def __init__(self, trials: Sequence[TrialSpec], device: torch.device,
                 engine: BatchedEngine, on_eval: OnEval | None = None,
                 real: int | None = None) -> None:
        first = trials[0]
        self.engine, self.device, self.trials = engine, device, list(trials)
        # The hook sees the first `real` rows (a lone trial trains beside a copy of itself).
        self.on_eval, self.real = on_eval, len(trials) if real is None else real
        self.on_cpu = device.type == "cpu"
        dtype = first.train.torch_dtype
        seeds = [seed_streams(t.seed) for t in trials]
        self.data = data = PopulationData(trials, seeds, engine.datasets, device, dtype)
        n_train, task, train = data.n_train, first.task, first.train
        self.net = Network(tuple(first.model.layer_sizes(task.input_dim, task.output_dim)),
                           first.model.activation)
        self.batch = train.resolved_batch_size(n_train)
        self.planned = train.total_steps(n_train)
        self.epochs = train.epochs
        self.loop = LoopState(trials, device, dtype, train.steps_per_epoch(n_train),
                              self.planned)
        self.traces = TraceBuffers(len(trials), self.planned, train.eval_steps(n_train),
                               first.diagnostics.steps(train, n_train), dtype, device)
        # The reference's order after each step: diagnostics, then evaluation.
        self.diag_at = {s: k for k, s in enumerate(self.traces.diag_steps)}
        self.eval_at = {s: k for k, s in enumerate(self.traces.eval_steps)}
        params = _initial_parameters(self.net, trials, seeds).to(device=device, dtype=dtype)
        self.init_seeds = [s.init for s in seeds]  # diagnostics draw their start from it
        self.adaptive = [adaptive(t.optimizer) for t in trials]
        self.state = ParameterState(self.net, params, self._optimizer(params),
                                    accumulate=not first.loop.zero_grad)
        # One batch per epoch, no dropout: train on the split as stored, and let an evaluation
        # hand its forward pass to the next step (see the module doc).
        self.whole_split = self.batch >= n_train and self.loop.dropout_gens is None
        self.shared: tuple[Tensor, list] | None = None  # an evaluation's (outputs, saved)
        self.alive = torch.ones(len(trials), dtype=torch.bool, device=device)
        self.all_alive = self.on_cpu  # host-side flag, CPU only (see mark_diverged)
        self.eval_buffers: list[Tensor] = []

    def _optimizer(self, params: Tensor):
        """The CPU's fused update (study.engine.fused) where it applies, else the eager one."""
        specs = [t.optimizer for t in self.trials]
        decay_layers = self.loop.spec.decay_layers  # the fused kernel takes no decay mask
        if (self.engine.fused and self.on_cpu and decay_layers is None
                and fusable(specs, self.loop.clip is not None, self.loop.spec.zero_grad)):
            return FusedUpdate(specs, params)
        return make_population_optimizer(specs, params, decay_mask(self.net, decay_layers))

    def run(self) -> list[Trace]:
        step = 0
        self.after(0)
        for _ in range(self.epochs):
            if self.check(force=True) is False:
                break
            x_epoch, y_epoch = self.epoch_batches()
            for start in range(0, self.data.n_train, self.batch):
                self.train_step(step, x_epoch[:, start:start + self.batch],
                                y_epoch[:, start:start + self.batch])
                step += 1
                self.after(step)
                if step % self.engine.check_every == 0:
                    kept = self.check()
                    if kept is False:
                        break
                    if kept is not None:
                        x_epoch, y_epoch = x_epoch[kept], y_epoch[kept]
        return self.traces.traces(self.trials, self.data.irreducible, self.data.input_free,
                                   self.adaptive, self.data.loss == "cross_entropy")

    def after(self, step: int) -> None:
        """What follows `step` updates, in the reference's order: diagnostics, evaluation."""
        if step in self.diag_at:
            self.diagnose(self.diag_at[step])
        if step in self.eval_at:
            self.evaluate(self.eval_at[step])
            self.after_eval(self.eval_at[step], step)

    def epoch_batches(self) -> tuple[Tensor, Tensor]:
        """This epoch's training split per row: x [T, N, in], y [T, N, ...], shuffled
        (`whole_split`: the split as stored)."""
        if self.whole_split:
            return self.data.x_train, self.data.y_train
        return self.data.epoch(self.loop.spec.shuffle)

    def masks(self, rows: Sequence[int]) -> list[Tensor] | None:
        """Dropout masks per hidden layer for blocks of `rows` examples (`LoopState.masks`)."""
        widths = [fo for _, fo in self.net.sizes[:-1]]
        return self.loop.masks(rows, widths, self.data.dtype, self.device)

    def train_step(self, step: int, xb: Tensor, yb: Tensor) -> None:
        state, spec = self.state, self.loop.spec
        params = state.params
        layers = state.layers(params)
        masks = self.masks([xb.shape[1]])
        if self.shared is not None:  # the last evaluation's forward: same rows, same params
            out, saved = self.shared
            self.shared = None
            n = xb.shape[1]
            out, saved = out[:, :n], [(h[:, :n], z[:, :n], a[:, :n]) for h, z, a in saved]
        else:
            out, saved = self.net.forward(params, xb, layers, masks)
        loss, grad_out = train_loss_and_grad(out, yb, self.data.loss, spec.loss,
                                             spec.huber_delta, self.data.class_weights)
        record = self.traces.step_buffer(step)  # [STEP_FIELDS, T], written in place
        named = StepRecord(*record)
        named.step_loss.copy_(loss)
        lrs = self.loop.learning_rates(step) if spec.scheduled else None
        if state.fused:
            state.fused_step(saved, grad_out, layers, masks, record, loss, self.alive, lrs)
            self.alive_changed()
        else:
            used = state.eager_gradient(saved, grad_out, layers, masks, named)
            alive = self.mark_diverged(record[:2])  # step_loss and grad_norm
            state.eager_step(used, named, alive, self.loop.clip, lrs)
        self.traces.commit_step(step, record)

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
        """Evaluation `k` of the full splits, and activation health on the probe batch (the
        first training examples, unshuffled)."""
        data, params = self.data, self.state.params
        rows, examples = data.x_eval.shape[:2]
        if len(self.eval_buffers) != len(self.net.sizes) or self.eval_buffers[0].shape[0] != rows:
            self.eval_buffers = [data.x_eval.new_empty(rows, examples, fo)
                                 for _, fo in self.net.sizes]
        hidden: list[tuple] = []
        probe = min(PROBE_SIZE, data.n_train)
        masks = (self.masks([data.n_train, examples - data.n_train])
                 if self.loop.dropout_at_eval else None)
        activation = self.net.activation
        inspect = lambda z: hidden.append(activation_health(activation, z[:, :probe]))  # noqa: E731
        if self.whole_split and self.traces.eval_steps[k] < self.planned:  # a step follows
            out, saved = self.net.forward(params, data.x_eval, self.state.layers(params),
                                          inspect=inspect)
            self.shared = (out, saved)
        else:
            out = self.net.evaluate(params, data.x_eval, self.eval_buffers, inspect,
                                    self.state.layers(params), masks)
        values = list(eval_losses(out, data.y_eval, data.loss, data.n_train, data.target_scale))
        nan = torch.full((rows,), math.nan, dtype=torch.float64, device=self.device)
        dead, saturated = combine_health(hidden, nan, probe)
        self.traces.write_eval(k, torch.stack([nan if v is None else v.to(torch.float64)
                                                for v in (*values, dead, saturated)]))
        self.alive &= torch.isfinite(values[0]) & torch.isfinite(values[1])
        self.alive_changed()

    def after_eval(self, k: int, step: int) -> None:
        """Plateau, early stopping and `on_eval` on the validation losses of eval `k` (one
        sync)."""
        if not self.loop.tracks_validation and self.on_eval is None:
            return
        val = self.traces.validation_losses(k)
        alive = self.alive.tolist()
        ids = self.traces.id_list
        for row in self.loop.after_eval(step, val, alive, self.told(step, val, alive)):
            self.traces.stopped_at[ids[row]] = step
            self.alive[row] = False
        self.alive_changed()

    def told(self, step: int, val: list[float], alive: list[bool]) -> set[int]:
        """The rows the `on_eval` hook stops after `step`; it sees the alive rows among the
        first `real` trials, by trial index."""
        if self.on_eval is None:
            return set()
        ids = self.traces.id_list
        told = set(self.on_eval(step, {i: val[row] for row, i in enumerate(ids)
                                       if alive[row] and i < self.real}))
        if self.real < len(self.trials) and 0 in told:
            told.add(1)  # the copy of a lone trial stops with it
        return {row for row, i in enumerate(ids) if i in told}

    def diagnose(self, k: int) -> None:
        """Opt-in diagnostics of every row (`diagnostics`)."""
        ids = self.traces.id_list
        values = diagnostics([self.trials[i] for i in ids], self.net, self.data,
                             self.state.params, [self.init_seeds[i] for i in ids],
                             [self.adaptive[i] for i in ids], self.state.preconditioner)
        self.traces.write_diagnostics(k, values)

    def check(self, force: bool = False) -> Tensor | bool | None:
        """Synchronise on the alive count: False = none left; rows kept if it compacted."""
        alive = int(self.alive.sum())
        if alive == 0:
            return False
        rows = len(self.traces.id_list)
        if alive == rows or (not force and alive > self.engine.compact_below * rows):
            return None
        kept = self.alive.nonzero().squeeze(1)
        if alive == 1:  # keep two rows (see BatchedEngine.train)
            kept = torch.cat([kept, (~self.alive).nonzero()[0]])
            if len(kept) == rows:
                return None
        self.shared = None  # an evaluation's forward of the dropped rows too
        index = kept.tolist()
        for part in (self.data, self.loop, self.state, self.traces):
            part.select(kept, index)
        self.alive = self.alive[kept]
        self.alive_changed()
        return kept


def diagnostics(trials: Sequence[TrialSpec], net: Network, data: PopulationData,
                params: Tensor, init_seeds: Sequence[int], adaptive_rows: Sequence[bool],
                preconditioner) -> Tensor:
    """[DIAG_FIELDS, rows]: the opt-in sharpness, noise scale and preconditioned sharpness
    (adaptive rows; `preconditioner()` gives their [rows, P] preconditioner) of each row of
    `params` (`data`'s rows, one per trial); NaN for non-finite parameters and where not
    asked for."""
    spec = trials[0].diagnostics
    finite = torch.isfinite(params).all(dim=1)
    flat = torch.where(finite[:, None], params, torch.zeros_like(params))
    x, y = data.x_train, data.y_train
    values = torch.full((len(DIAG_FIELDS), len(trials)), math.nan, dtype=torch.float64,
                        device=params.device)
    if spec.sharpness:
        values[0] = sharpness(net, flat, x, y, data.loss, spec.iterations, init_seeds)
        if any(adaptive_rows):
            values[2] = sharpness(net, flat, x, y, data.loss, spec.iterations, init_seeds,
                                  preconditioner=preconditioner())
    if spec.noise_scale:
        m = spec.max_examples
        values[1] = gradient_noise_scale(net, flat, x[:, :m], y[:, :m], data.loss)
    values[:, ~finite] = math.nan
    return values


def decay_mask(net: Network, layers: tuple[int, ...] | None) -> Tensor | None:
    """[P] bool: the entries of a parameter row that weight decay applies to (the weight
    matrices of linear `layers`, see `LoopSpec.decay_layers`); None when it applies to all."""
    if layers is None:
        return None
    mask = torch.zeros(1, net.n_params, dtype=torch.bool)
    views = net.layers(mask)
    for i in layers:
        views[i][0].fill_(True)
    return mask[0]


def _initial_parameters(net: Network, trials: Sequence[TrialSpec], seeds: Sequence[SeedStreams]
                        ) -> Tensor:
    """[T, P] each trial's initialization from its init seed, on the CPU.

    Trials of one model and init seed (the seeds of a grid, repeated across its other axes)
    get the same draw: it is drawn once and shared, not drawn again per trial."""
    task = trials[0].task
    drawn, which = shared([(trial.model, s.init) for trial, s in zip(trials, seeds,
                                                                      strict=True)])
    rows = [net.flatten(init_parameters(model, task.input_dim, task.output_dim,
                                        torch.Generator().manual_seed(init)))
            for model, init in drawn]
    return torch.stack(rows)[torch.tensor(which)]


def activation_health(activation: str, z: Tensor) -> tuple[Tensor | None, Tensor | None, int]:
    """Per hidden layer: (dead units [T], saturated entries [T], units) on `z` [T, B, U].

    The definitions of `models.activation_stats` in fewer passes: a unit is dead when
    its largest pre-activation over the probe is <= 0 (NaN compares False either way).
    """
    dead = (z.amax(dim=1) <= 0).sum(dim=1) if activation in RELU_FAMILY else None
    saturated = ((z.abs() > SATURATION_Z[activation]).sum(dim=(1, 2))
                 if activation in SATURATION_Z else None)
    return dead, saturated, z.shape[-1]


def combine_health(layers: list, nan: Tensor, probe: int) -> tuple[Tensor, Tensor]:
    """(dead fraction, saturation fraction) [T] over all hidden units (NaN: undefined)."""
    units = sum(u for _, _, u in layers)
    dead = saturated = nan
    if layers and layers[0][0] is not None:
        dead = sum(d for d, _, _ in layers).to(torch.float64) / units
    if layers and layers[0][1] is not None:
        saturated = sum(s for _, s, _ in layers).to(torch.float64) / (units * probe)
    return dead, saturated
