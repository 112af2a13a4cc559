"""Independent seed streams derived from one trial seed.

A trial seed fans out into three streams (data, init, batch order) through numpy's
SeedSequence with fixed spawn keys, so changing the model never changes the data, changing
the batch size never changes the initialization, and every arm of a comparison that shares
a trial seed sees the same three streams (paired analysis).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_STREAMS = {"data": 0, "init": 1, "order": 2}


@dataclass(frozen=True)
class SeedStreams:
    """Three 63-bit seeds for torch.Generator.manual_seed, one per stream."""

    data: int
    init: int
    order: int


@lru_cache(maxsize=4096)  # a population asks once per trial; sweeps reuse a few seeds
def seed_streams(seed: int) -> SeedStreams:
    """Derive the data / init / order seeds of trial seed `seed` (deterministic, pure)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    derived = {
        name: int(np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(1, np.uint64)[0])
        >> 1  # torch seeds are signed 64-bit: keep 63 bits
        for name, key in _STREAMS.items()
    }
    return SeedStreams(**derived)
