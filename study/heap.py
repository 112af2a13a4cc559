"""When Python's cyclic garbage collector runs in the harness's own processes.

The collector's full (oldest-generation) collection visits every tracked object of the
process, and it makes one each time the objects that survived younger collections grew by
a quarter of the old ones. A run's start-up grows the heap from nothing to ~330,000
tracked objects (Hydra, torch, numba, pandas, Optuna and the plan), none of them garbage:
each growth by a quarter pays for a full pass over all of it, and the last ones take
0.1-0.4 s each, on the start-up's one thread or beside the kernel's threads in training.
So a process of the command line collects nothing while it imports and sets up (`hold`),
and then freezes what it holds (`settle`: `gc.freeze` moves every tracked object to a
generation the collector never visits) and collects as usual from there, over the objects
made afterwards only.

The cost: garbage cycles made before `settle` are never freed (a few thousand objects of
imports and composition, well under a megabyte). Garbage made afterwards (a population's
records, a figure) is collected as before. Processes forked after `settle` (the report's
workers) inherit the frozen heap and never visit it either; `gc.freeze` also keeps their
copy-on-write pages of it unwritten.
"""

from __future__ import annotations

import gc

_held = False  # whether `hold` ran in this process (or in the one it was forked from)


def hold() -> None:
    """No cyclic collection until `settle` (the process is importing and setting up)."""
    global _held
    _held = True
    gc.disable()


def settle() -> None:
    """After `hold`: freeze every object tracked now out of later collections, and collect
    again. Without `hold` (a process that embeds the harness, a test), nothing."""
    global _held
    if _held:
        _held = False
        gc.freeze()
        gc.enable()
