"""The data of a population: each row's own draw, gathered per epoch in its own batch order.

Trials sharing a data draw (same task, data transforms and data seed) share one copy of it;
each row indexes its draw's training rows per epoch and holds its full splits for the
evaluations. Trials sharing an order seed share its batch orders: one generator per seed
draws each epoch's order once for all of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from study.failures import trial_dataset
from study.failures.loop import class_weights
from study.seeds import SeedStreams
from study.tasks import Dataset
from study.trial import TrialSpec

Tensor = torch.Tensor
DataKey = tuple[str, str, int]


def shared(keys: Sequence) -> tuple[list, list[int]]:
    """The distinct `keys` in order of first appearance, and each key's position among
    them: what rows of one key (a seed) draw once for all of them."""
    positions: dict = {}
    index = [positions.setdefault(key, len(positions)) for key in keys]
    return list(positions), index


def kept_shares(index: Sequence[int], rows: Sequence[int]) -> tuple[list[int], list[int]]:
    """After keeping `rows` of a `shared` index: the positions still used, in order, and
    each kept row's position among them (a draw no kept row uses is dropped)."""
    mine = [index[i] for i in rows]
    used = {position: j for j, position in enumerate(sorted(set(mine)))}
    return list(used), [used[position] for position in mine]


class DatasetCache:
    """Trial data keyed by (task, data transforms, data seed): trials sharing them share one
    dataset."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.items: OrderedDict[DataKey, Dataset] = OrderedDict()

    def get(self, trial: TrialSpec, seed: int) -> Dataset:
        key = data_key(trial, seed)
        if key not in self.items:
            self.items[key] = trial_dataset(trial, seed)
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(key)
        return self.items[key]


def data_key(trial: TrialSpec, seed: int) -> DataKey:
    """What determines a trial's data: task, data transforms, data seed."""
    return repr(trial.task), repr(trial.data_transforms), seed


class PopulationData:
    """Per row: its training rows (gathered from the distinct draws), its full splits for
    evaluation, its batch-order generator (`order_generators[order_index[row]]`, one per
    distinct order seed) and what its loss needs (target scale, class weights). Per trial
    (original index, never compacted): the reference losses of its draw.
    """

    def __init__(self, trials: Sequence[TrialSpec], seeds: Sequence[SeedStreams],
                 cache: DatasetCache, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        keys = [data_key(t, s.data) for t, s in zip(trials, seeds, strict=True)]
        # One draw per distinct key (in order of first appearance), asked of the cache once:
        # a population may hold more distinct draws than the cache keeps, and asking per
        # trial would regenerate them.
        draws: dict[DataKey, Dataset] = {}
        for k, t, s in zip(keys, trials, seeds, strict=True):
            if k not in draws:
                draws[k] = cache.get(t, s.data)
        data = list(draws.values())
        mine = [draws[k] for k in keys]  # each trial's own draw
        self.loss, self.n_train = data[0].loss, data[0].n_train
        self.y_dtype = torch.int64 if self.loss == "cross_entropy" else dtype
        self.irreducible = [d.irreducible_loss for d in mine]
        free = {id(d): d.input_free_loss() for d in data}
        self.input_free = [free[id(d)] for d in mine]
        position = {k: i for i, k in enumerate(draws)}
        self._stack_splits(data, [position[k] for k in keys])
        # Each row's generator would draw what every row of its order seed draws, epoch
        # after epoch: one generator per seed, drawn once per epoch for all its rows.
        order_seeds, self.order_index = shared([s.order for s in seeds])
        self.order_generators = [torch.Generator().manual_seed(seed) for seed in order_seeds]
        self._loss_inputs(trials, mine)

    def _stack_splits(self, data: list[Dataset], which_draw: list[int]) -> None:
        """[D, N, ...] per distinct draw; each row indexes its draw's rows."""
        which = torch.tensor(which_draw, device=self.device)
        x_train = self._stack([d.x_train for d in data], self.dtype)
        y_train = self._stack([d.y_train for d in data], self.y_dtype)
        self.x_flat = x_train.flatten(0, 1)  # [D * n_train, in]
        self.y_flat = y_train.flatten(0, 1)
        self.row_offset = which * self.n_train  # [T]
        x_val = self._stack([d.x_val for d in data], self.dtype)
        y_val = self._stack([d.y_val for d in data], self.y_dtype)
        self.x_eval = torch.cat([x_train, x_val], 1)[which]  # [T, n_train + n_val, in]
        self.y_eval = torch.cat([y_train, y_val], 1)[which]

    def _loss_inputs(self, trials: Sequence[TrialSpec], data: list[Dataset]) -> None:
        """Per row: the evaluation's target scale and the training loss's class weights
        (None when no row has one)."""
        task = trials[0].task
        self.target_scale: Tensor | None = None
        if any(d.target_scale is not None for d in data):
            ones = torch.ones(task.output_dim, dtype=torch.float64)
            self.target_scale = torch.stack([
                ones if d.target_scale is None else d.target_scale for d in data
            ])[:, None, :].to(device=self.device, dtype=self.dtype)
        self.class_weights: Tensor | None = None
        if trials[0].loop.loss == "weighted_cross_entropy":
            self.class_weights = torch.stack(
                [class_weights(d.y_train, task.output_dim) for d in data]
            ).to(device=self.device, dtype=self.dtype)

    def _stack(self, tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.stack(tensors).to(device=self.device, dtype=dtype)

    @property
    def x_train(self) -> Tensor:
        """Each row's training split as stored [T, N, in]."""
        return self.x_eval[:, :self.n_train]

    @property
    def y_train(self) -> Tensor:
        return self.y_eval[:, :self.n_train]

    def epoch(self, shuffle: bool) -> tuple[Tensor, Tensor]:
        """This epoch's training split per row, x [T, N, in] and y [T, N, ...]: one
        `torch.randperm` from each order generator, each row taking its own generator's
        (`shuffle`), else the stored order (the failure: the same order every epoch)."""
        rows_n = len(self.order_index)
        if shuffle:
            drawn = torch.stack([torch.randperm(self.n_train, generator=g)
                                 for g in self.order_generators])
            perms = drawn[torch.tensor(self.order_index)]
        else:
            perms = torch.arange(self.n_train).expand(rows_n, -1)
        rows = (perms.to(self.device) + self.row_offset[:, None]).flatten()
        shape = (rows_n, self.n_train)
        return (self.x_flat.index_select(0, rows).view(*shape, -1),
                self.y_flat.index_select(0, rows).view(*shape, *self.y_flat.shape[1:]))

    def select(self, kept: Tensor, index: list[int]) -> None:
        """Keep the rows `kept` (`index` on the host)."""
        self.row_offset = self.row_offset[kept]
        self.x_eval, self.y_eval = self.x_eval[kept], self.y_eval[kept]
        if self.target_scale is not None:
            self.target_scale = self.target_scale[kept]
        if self.class_weights is not None:
            self.class_weights = self.class_weights[kept]
        used, self.order_index = kept_shares(self.order_index, index)
        self.order_generators = [self.order_generators[g] for g in used]
