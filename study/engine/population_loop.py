"""The loop state of a population, per row: what failure modes and mitigations change in the
training loop (`LoopSpec`): clipping thresholds, the learning rate (schedule and
ReduceLROnPlateau), early stopping and dropout masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from study.engine.population_data import kept_shares, shared
from study.failures.loop import EarlyStopper, Plateau
from study.models import dropout_mask, dropout_seed
from study.trial import TrialSpec

Tensor = torch.Tensor


class LoopState:
    """Per computed row (selected with the rows): clipping threshold, base learning rate,
    plateau and early-stopping trackers, dropout generator (`dropout_gens[dropout_index[row]]`,
    one per distinct dropout seed). None where the loop has none."""

    def __init__(self, trials: Sequence[TrialSpec], device: torch.device, dtype: torch.dtype,
                 per_epoch: int, planned: int) -> None:
        loop = self.spec = trials[0].loop
        self.per_epoch, self.planned = per_epoch, planned
        self.clip: Tensor | None = None
        if loop.clip_norm is not None:
            self.clip = torch.tensor([t.loop.clip_norm for t in trials], dtype=torch.float64,
                                     device=device).to(dtype)
        self.base_lr = [t.optimizer.lr for t in trials]
        self._base_lr = np.asarray(self.base_lr, dtype=np.float64)
        self.plateaus = ([Plateau(t.loop.plateau_factor, t.loop.plateau_patience,
                                  t.loop.plateau_threshold) for t in trials]
                         if loop.plateau_factor is not None else None)
        self.stoppers = ([EarlyStopper(t.loop.early_stopping_patience) for t in trials]
                         if loop.early_stopping_patience is not None else None)
        model = trials[0].model
        self.dropout = model.dropout
        self.dropout_at_eval = model.dropout_at_eval and model.dropout > 0
        # Rows of one seed draw the same masks step after step (the population shares its
        # dropout rate): one generator per seed draws them once for all its rows.
        self.device = device
        self.dropout_gens: list[torch.Generator] | None = None
        self.dropout_index: list[int] = []
        self._dropout_rows: Tensor | None = None  # dropout_index on the device
        if model.dropout > 0:
            seeds, self.dropout_index = shared([dropout_seed(t.seed) for t in trials])
            self.dropout_gens = [torch.Generator().manual_seed(seed) for seed in seeds]
            self._dropout_rows = torch.tensor(self.dropout_index, device=device)

    @property
    def tracks_validation(self) -> bool:
        """Whether an evaluation's validation losses change this state (plateau, stopping:
        `LoopSpec.tracks_validation`)."""
        return self.spec.tracks_validation

    def learning_rates(self, step: int) -> np.ndarray:
        """[T] float64: each row's learning rate for the update after `step` updates (its
        base rate times the schedule's factor, times its plateau's multiplier: float64
        products over the rows at once, the same bits as in Python's floats)."""
        factor = self.spec.lr_factor(step, self.per_epoch, self.planned)
        lrs = self._base_lr * factor
        if self.plateaus is not None:
            lrs = lrs * np.array([plateau.multiplier for plateau in self.plateaus])
        return lrs

    def after_eval(self, step: int, val: Sequence[float], alive: Sequence[bool],
                   told: set[int]) -> list[int]:
        """Plateau and early stopping on each alive row's validation loss `val[row]` after
        `step` updates; returns the rows that stop there (early stopping, or named in `told`
        by the caller's hook; never at the last step)."""
        stopped = []
        for row, ok in enumerate(alive):
            if not ok:
                continue
            if self.plateaus is not None and step > 0:
                plateau = self.plateaus[row]
                plateau.update(val[row], self.base_lr[row] * plateau.multiplier)
            stop = self.stoppers is not None and self.stoppers[row].update(val[row])
            if (stop or row in told) and step < self.planned:
                stopped.append(row)
        return stopped

    def masks(self, rows: Sequence[int], widths: Sequence[int], dtype: torch.dtype,
              device: torch.device) -> list[Tensor] | None:
        """Dropout masks [T, sum(rows), width] per hidden layer of `widths`, drawn per row in
        the reference's order: for each block of `rows` examples, every hidden layer in
        turn (once per dropout seed, each row taking its seed's). None without dropout."""
        if self.dropout_gens is None:
            return None
        per_seed = []
        for g in self.dropout_gens:  # drawn on the host (the trials' generators live there)
            blocks = [[dropout_mask((r, w), self.dropout, g, dtype, "cpu") for w in widths]
                      for r in rows]
            per_seed.append([torch.cat([b[layer] for b in blocks]) for layer in
                             range(len(widths))])
        # One copy per layer that does not wait for the device (not one per trial or seed),
        # then each row's seed's mask, there.
        stacked = [torch.stack([m[layer] for m in per_seed]) for layer in range(len(widths))]
        return [masks.to(device, non_blocking=True)[self._dropout_rows] for masks in stacked]

    def select(self, kept: Tensor, index: list[int]) -> None:
        """Keep the rows `kept` (`index` on the host)."""
        if self.clip is not None:
            self.clip = self.clip[kept]
        self.base_lr = [self.base_lr[i] for i in index]
        self._base_lr = np.asarray(self.base_lr, dtype=np.float64)
        if self.plateaus is not None:
            self.plateaus = [self.plateaus[i] for i in index]
        if self.stoppers is not None:
            self.stoppers = [self.stoppers[i] for i in index]
        if self.dropout_gens is not None:
            used, self.dropout_index = kept_shares(self.dropout_index, index)
            self.dropout_gens = [self.dropout_gens[g] for g in used]
            self._dropout_rows = torch.tensor(self.dropout_index, device=self.device)
