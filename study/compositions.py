"""The configurations a grid composes, one per combination of its group options: which
(`compositions`), composed as plain dicts (`compose_plain`), and composed ahead (`Ahead`).

A Hydra composition costs about 0.2 s of Python that holds the GIL, and lr_batch's grid
needs six (2 tasks x 3 optimizers). They depend on nothing but Hydra, so `python -m study`
starts them in a process forked right after Hydra has composed the command line, while it
imports torch and the engine on its own core (about 2 s, single-threaded); by the time the
grid is expanded they are there. Nothing here imports torch: that is the point.

A composition done ahead is the one `compose_plain` would do (the same overrides, the same
Hydra state, inherited by the fork) and it is validated where it is used, so the plan is
the same with or without it (tests/study/test_compositions.py). One that failed ahead, or
that the forked process did not reach, is composed again where it is needed, so its error
is raised there, as without it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from omegaconf import DictConfig, OmegaConf

from study import heap
from study.parallel import K, end_forked, fork_serving, run_jobs
from study.schema import GROUPS, TRANSFORM_GROUPS, plain_config

log = logging.getLogger(__name__)
Compose = Callable[[Sequence[str]], DictConfig]
# Plain configs composed ahead, keyed by their whole override list (None: failed there).
Ready = Mapping[tuple[str, ...], "dict[str, Any] | None"]


def combination(value: Any) -> str:
    """An axis value of a failure/mitigation axis as one label: "outliers+unscaled"."""
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) if value else "none"
    return str(value)


def group_override(group: str, value: Any) -> str:
    """The Hydra override selecting `value` of `group` ("a+b" selects both options)."""
    if group in TRANSFORM_GROUPS:
        options = [v for v in str(value).split("+") if v]
        return f"{group}=[{','.join(options)}]" if len(options) != 1 else f"{group}={options[0]}"
    return f"{group}={value}"


def compositions(axes: Mapping[str, Sequence[Any]]) -> dict[tuple, tuple[list[str], bool]]:
    """What a grid over `axes` composes, as `compose_plain` takes it, keyed by the picked
    `(group, option)` pairs: each combination of the spec axes' options (validated), and
    each failure/mitigation option alone. A failure/mitigation node is composed once per
    option and swapped into every configuration: its product with the other group axes
    would cost minutes for a sweep over every failure mode. In the order the grid meets
    them, so the first that fails is the one reported."""
    group_axes = [a for a in axes if a in GROUPS]
    spec_axes = [a for a in group_axes if a not in TRANSFORM_GROUPS]
    wanted: dict[tuple, tuple[list[str], bool]] = {}
    for group_values in itertools.product(*(axes[a] for a in group_axes)):
        picked = dict(zip(group_axes, group_values, strict=True))
        spec_picked = tuple((g, picked[g]) for g in spec_axes)
        if spec_picked:
            wanted.setdefault(spec_picked,
                              ([group_override(g, v) for g, v in spec_picked], True))
        for g, v in picked.items():
            if g in TRANSFORM_GROUPS:
                wanted.setdefault(((g, v),), ([group_override(g, v)], False))
    return wanted


def compose_plain(compose: Compose, overrides: Sequence[str],
                  wanted: Mapping[K, tuple[Sequence[str], bool]],
                  ready: Ready | None = None) -> dict[K, dict[str, Any]]:
    """`{key: plain_config(compose([*overrides, *extra]))}` for each `key: (extra, check)`
    of `wanted`, validated (`study.config.validate`) where `check`.

    Those in `ready` (composed ahead, `Ahead.take`) are taken from there; the others are
    composed side by side in forked processes (`study.parallel`; Hydra's merging holds the
    GIL). One that failed ahead or in a worker is composed again here, in `wanted`'s
    order, so the error raised is the one composing them in turn would raise.
    """
    from study.config import validate_plain

    ready = ready or {}
    jobs = {key: (_plain_or_none, (compose, [*overrides, *extra], check))
            for key, (extra, check) in wanted.items() if (*overrides, *extra) not in ready}
    done = run_jobs(jobs) if jobs else {}
    out: dict[K, dict[str, Any]] = {}
    for key, (extra, check) in wanted.items():
        whole = (*overrides, *extra)
        plain = ready.get(whole) if whole in ready else done[key]
        if plain is None:
            plain = _plain(compose, list(whole), check)
        elif check and whole in ready:
            validate_plain(plain)
        out[key] = plain
    return out


def _plain(compose: Compose, overrides: list[str], check: bool) -> dict[str, Any]:
    from study.config import validate

    node = compose(overrides)
    if check:
        validate(node)  # a value that does not resolve is a ConfigError here too
    return plain_config(node)


def _plain_or_none(compose: Compose, overrides: list[str], check: bool) -> dict[str, Any] | None:
    # In a worker: an error travels back as None, not pickled (Hydra's exceptions do not
    # all survive pickling), and the caller raises it by composing again.
    try:
        return _plain(compose, overrides, check)
    except Exception:  # noqa: BLE001
        return None


def grid_axes(cfg: DictConfig) -> dict[str, list[Any]]:
    """The group axes of `cfg`'s grid sweep as `expand_grid` reads them (failure and
    mitigation values as "a+b" labels), from the composed, unvalidated config; empty
    when it has none or they cannot be read (validation says why, later)."""
    try:
        sweep = OmegaConf.select(cfg, "sweep")
        if sweep is None or OmegaConf.select(cfg, "sweep.sampler", default="grid") != "grid":
            return {}
        axes = OmegaConf.to_container(sweep.axes, resolve=True) if "axes" in sweep else {}
    except Exception:  # noqa: BLE001  (validate() reports it)
        return {}
    if not isinstance(axes, dict):
        return {}
    return {name: [combination(v) if name in TRANSFORM_GROUPS else v for v in values]
            for name, values in axes.items() if name in GROUPS and isinstance(values, list)}


class Ahead:
    """A forked process composing a grid's configurations while this one imports torch."""

    def __init__(self, pid: int, conn: Connection, count: int) -> None:
        self._pid: int | None = pid
        self._conn = conn
        self._count = count  # compositions it was given
        self._ready: dict[tuple[str, ...], dict[str, Any] | None] = {}

    @classmethod
    def start(cls, cfg: DictConfig, compose: Compose, overrides: Sequence[str]
              ) -> Ahead | None:
        """Fork the process composing `cfg`'s grid (`compositions` of `grid_axes`, with
        `overrides`); None without a group axis, where forking is not used (not Linux,
        one core) or when it fails."""
        try:
            wanted = [[*overrides, *extra]
                      for extra, _ in compositions(grid_axes(cfg)).values()]
        except Exception:  # noqa: BLE001  (an unhashable option: validation says so, later)
            return None
        if not wanted:
            return None
        forked = fork_serving(functools.partial(_compose_all, compose, wanted))
        return cls(*forked, len(wanted)) if forked is not None else None

    def take(self, timeout: float = 0.0) -> dict[tuple[str, ...], dict[str, Any] | None]:
        """The compositions done by now, or within `timeout` seconds (by whole override
        list; None: it failed there), then the process is ended: those it has not reached
        are composed where they are needed, side by side."""
        end = time.monotonic() + timeout
        with contextlib.suppress(EOFError, OSError):
            while (self._pid is not None and len(self._ready) < self._count
                   and self._conn.poll(max(0.0, end - time.monotonic()))):
                whole, plain = self._conn.recv()
                self._ready[tuple(whole)] = plain
        self.close()
        return self._ready

    def close(self) -> None:
        """End the process and reap it. Safe to call twice."""
        if self._pid is None:
            return
        end_forked(self._pid, self._conn)
        self._pid = None


def _compose_all(compose: Compose, wanted: list[list[str]], conn: Connection) -> int:
    """In the forked process: compose each override list in turn and send it back."""
    heap.settle()  # each composition leaves cycles (OmegaConf's parent links) to collect
    for whole in wanted:
        try:
            plain = plain_config(compose(whole))
        except Exception:  # noqa: BLE001  (composed again where it is needed)
            plain = None
        conn.send((whole, plain))
    conn.close()
    return 0
