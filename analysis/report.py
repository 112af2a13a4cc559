"""Assemble the report: load -> aggregate -> figures -> one self-contained HTML file."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from analysis import explorer, figures, findings, sections
from analysis.aggregate import (
    FINAL,
    MARKERS,
    STATUS_ORDER,
    cell_summary,
    is_status_share,
    stability_map,
    status_counts,
)
from analysis.axes import (
    SEED,
    SweepAxes,
    choose_map_layout,
    format_key,
    pooled_note,
    searched_values,
    sweep_axes,
    value_key,
)
from analysis.curves import (
    attach_curves,
    curve_facets,
    line_axis,
    select_curve_trials,
    trial_curves,
)
from analysis.edges import edge_section
from analysis.load import RunData, list_files, load_run
from study.parallel import run_jobs
from study.records import (
    CURVES_DIR,
    REPORT,
    RecordError,
    atomic_write_bytes,
    curve_trials,
    read_curves,
)

log = logging.getLogger(__name__)
MAX_FILES = 60
MAX_CURVE_PANELS = 18  # six rows of three at the page's width
# Settings named in the header when every trial shares them (the rest: .hydra/config.yaml).
HELD_COLUMNS = ("task", "model", "optimizer", "optimizer.lr", "train.batch_size",
                "train.epochs", "model.depth", "model.width", "model.activation")
ENV_FIRST = ("started", "finished", "wall_time_s", "device", "engine", "git_commit", "git",
             "hostname")


class ReportError(RecordError):
    """The run directory is readable but the report cannot be built as asked."""


def build_report(run_dir: Path, map_metric: str = FINAL,
                 claims: pd.DataFrame | None = None,
                 scoring: Callable[[], pd.DataFrame | None] | None = None) -> Path:
    """Write `run_dir/report.html` (atomically) from the run directory's files; return its path.

    `map_metric` colors the stability map (median over seeds); `claims` (columns
    `analysis.claims.COLUMNS`) overrides the claims the run directory holds, if any;
    `scoring`, claims being scored meanwhile (`study.parallel.aside`), is called once the
    sections are drawn, and a table it returns overrides them too.
    Raises study.records.RecordError, before writing anything, when `run_dir` is missing,
    not a run directory, or holds an unreadable record, and ReportError when `map_metric`
    is not a numeric column of trials.parquet.
    """
    run = load_run(Path(run_dir))
    missing = missing_curves(run)
    if missing:
        log.warning("%s", missing_curves_note(missing, run.run_dir))
    html = render_html(run, map_metric=map_metric, claims=claims, scoring=scoring)
    path = run.run_dir / REPORT
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


def missing_curves(run: RunData) -> list[int]:
    """Finished trials of `run` (trials.parquet) with no rows in any curves file."""
    have = curve_trials(run.run_dir)
    return sorted(int(t) for t in run.trials.get("trial", []) if int(t) not in have)


def missing_curves_note(missing: list[int], run_dir: Path) -> str:
    """One line saying which finished trials have no curves (files deleted or damaged)."""
    shown = ", ".join(str(t) for t in missing[:10]) + (", ..." if len(missing) > 10 else "")
    return (f"{len(missing)} finished trial(s) have no curves in {Path(run_dir) / CURVES_DIR} "
            f"(a curves file was deleted or damaged): trial(s) {shown}; their figures are "
            f"missing from the report")


def render_html(run: RunData, map_metric: str = FINAL, claims: pd.DataFrame | None = None,
                built: datetime | None = None,
                scoring: Callable[[], pd.DataFrame | None] | None = None) -> str:
    """The report's HTML text for `run` (reads the curves of the trials it draws); `claims`
    and `scoring` as for `build_report`.

    Everything but the `built` line (default: now, UTC) is a function of the run
    directory's files: rebuilding gives the same bytes.
    """
    _check_metric(run.trials, map_metric)
    axes = sweep_axes(run.trials, run.meta)
    has_trials = bool(len(run.trials))
    summary = cell_summary(run.trials, axes, map_metric) if has_trials else None
    stats_summary = (summary if map_metric == FINAL or not has_trials
                     else cell_summary(run.trials, axes))
    lab = sections.labeled(run.trials, axes) if has_trials else None
    built = built or datetime.now(timezone.utc)
    missing = missing_curves(run) if has_trials else []
    claims = claims if claims is not None else run.claims
    # The sections that draw or compute for long, built side by side (study.parallel),
    # the longest first.
    gallery_parts = sections.gallery_parts(run.run_dir, lab, axes) if has_trials else []
    jobs = {"map": (map_section, (summary, axes, map_metric)),
            "curves": (curves_section, (run, axes))}
    if has_trials:
        jobs = {"lr": (sections.lr_section, (lab, axes)),
                "cells": (sections.cell_stats_section, (lab, stats_summary, axes)),
                **jobs,
                "explorer": (explorer_section, (run, lab, axes)),
                "metrics": (sections.metric_tables_section, (lab, axes)),
                **{f"gallery {i}": (sections.gallery_entry, part)
                   for i, part in enumerate(gallery_parts)},
                "findings": (findings.findings_context, (lab, axes)),
                "diagnostics": (sections.diagnostics_section, (run.run_dir, lab, axes))}
    built_sections = run_jobs(jobs)
    if scoring is not None:  # needed from here on only: scored while the sections drew
        scored = scoring()
        claims = scored if scored is not None else claims
        run = replace(run, files=list_files(run.run_dir))  # claims.parquet written since
    found = built_sections.get("findings")
    context = {
        "findings": found and {**found, "claims": findings.claim_lines(claims)},
        **header_context(run, axes),
        "curves_warning": missing_curves_note(missing, run.run_dir) if missing else "",
        "built": built.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "map": built_sections["map"],
        "lr": built_sections["lr"] if has_trials else _empty_lr(),
        "curves": built_sections["curves"],
        "gallery": [built_sections[f"gallery {i}"] for i in range(len(gallery_parts))],
        "cells": built_sections.get("cells"),
        "pooled": pooled_note(axes),
        "metrics": built_sections.get("metrics"),
        "diagnostics": built_sections.get("diagnostics"),
        "claims": sections.claims_section(claims),
        "explorer": built_sections.get("explorer"),
        "edges": edge_section(run.edges),
    }
    env = jinja2.Environment(loader=jinja2.PackageLoader("analysis", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html").render(**context)


def _check_metric(trials: pd.DataFrame, metric: str) -> None:
    if metric == FINAL or is_status_share(metric) or (
            metric in trials and pd.api.types.is_numeric_dtype(trials[metric])):
        return
    numeric = [c for c in trials.columns if pd.api.types.is_numeric_dtype(trials[c])
               and "." not in c and c not in ("trial", SEED)]
    raise ReportError(f"map metric {metric!r} is neither a numeric column of trials.parquet "
                      f"nor a status; choose one of: {', '.join(numeric)}, or a status "
                      f"({', '.join(STATUS_ORDER)}) to color by its share of seeds")


def _empty_lr() -> dict[str, Any]:
    return {"note": "No finished trials.", "image": None, "caption": "", "table": "",
            "table_note": ""}


# -------------------------------------------------------------------------------- header
def header_context(run: RunData, axes: SweepAxes) -> dict[str, Any]:
    """Title, what varied, status counts, environment, command and files."""
    sweep = run.meta.get("sweep")
    declared = run.meta.get("axes") or {}
    varied = [{"name": name, "labels": ", ".join(format_key(k) for k in keys)}
              for name, keys in axes.values.items()]
    varied += [{"name": name, "labels": text}
               for name, text in searched_values(run.trials, axes).items()]
    constant = [name for name in declared if name not in axes.values]
    held = [(c, format_key(value_key(run.trials[c].iloc[0]))) for c in HELD_COLUMNS
            if c in run.trials and c not in axes.values and len(run.trials)
            and run.trials[c].astype(str).nunique(dropna=False) == 1]
    counts = status_counts(run.trials) if len(run.trials) else pd.DataFrame(
        columns=["status", "n", "fraction"])
    return {
        "title": f"Sweep {sweep}" if sweep else "Single configuration",
        "sweep": sweep,
        "run_dir": str(run.run_dir),
        "n_trials": len(run.trials),
        "varied": varied,
        "constant_axes": constant,
        "held": held,
        "seeds": ", ".join(str(s) for s in run.meta.get("seeds")
                           or sorted(run.trials.get(SEED, pd.Series()).unique())),
        "objective": _objective(run.meta.get("objective")),
        "statuses": counts.to_dict("records"),
        "env": env_rows(run.env),
        "versions": sorted((run.env.get("versions") or {}).items()),
        "command": run.env.get("command"),
        "rebuild": f"python -m analysis {run.run_dir}",
        "files": [{"path": p, "size": _size(n)} for p, n in run.files[:MAX_FILES]],
        "files_more": max(len(run.files) - MAX_FILES, 0),
        "hydra": dict(run.hydra),
    }


def env_rows(env: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Displayable (key, value) rows: known keys first, then any others; versions apart."""
    keys = [k for k in ENV_FIRST if k in env]
    keys += sorted(k for k in env if k not in keys and k not in ("command", "versions"))
    rows = []
    for key in keys:
        value = env[key]
        if key == "wall_time_s" and isinstance(value, (int, float)):
            rows.append(("wall time", _duration(float(value))))
        elif isinstance(value, dict):
            rows.append((key, "; ".join(f"{k}: {v}" for k, v in value.items())))
        elif isinstance(value, list):
            rows.append((key, " ".join(str(v) for v in value)))
        else:
            rows.append((key, str(value)))
    return rows


def _objective(objective: Mapping[str, Any] | None) -> str:
    if not objective:
        return "not recorded"
    return f"{objective.get('direction', '?')} {objective.get('metric', '?')}"


def _duration(seconds: float) -> str:
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes:02d} min {sec:02.0f} s"
    return f"{minutes} min {sec:04.1f} s" if minutes else f"{sec:.2f} s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------- trial explorer
def explorer_section(run: RunData, lab: pd.DataFrame, axes: SweepAxes) -> dict[str, Any]:
    """The explorer's JSON payload, its script and the script's CSP hash, and a size note."""
    payload = explorer.payload_json(explorer.explorer_payload(lab, axes, run.run_dir))
    script = resources.files("analysis").joinpath("templates/explorer.js").read_text(
        encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    n = len(lab)
    size = len(payload.encode("utf-8"))
    return {"data": payload, "script": script, "hash": f"sha256-{digest}",
            "size": f"{_size(size)} for {n} trial{'s' if n != 1 else ''} "
                    f"(about {size / max(n, 1) / 1024:.1f} KiB each)",
            "n": n}


# ----------------------------------------------------------------------- figure sections
def map_section(summary: pd.DataFrame | None, axes: SweepAxes,
                metric: str = FINAL) -> dict[str, Any]:
    """Stability-map image and caption, or a one-line note why there is none."""
    layout = choose_map_layout(axes)
    if summary is None or layout is None:
        return _section(note="No stability map: fewer than two axes vary in this run.")
    smap = stability_map(summary, axes, layout, metric)
    facets = " x ".join(a for a in (layout.row, *layout.cols) if a) or "none"
    color = ("median over seeds of the final validation loss, capped at each trial's "
             "initial loss (a trial that blew up or stopped counts as no better than its "
             "initialization), divided by the median initial validation loss of the same "
             "task (tasks have different loss scales: 1 = the task's typical initial loss; "
             "a trial that started below it and learned nothing reads below 1, the statuses "
             "and symbols say whether a cell learned)" if smap.normalized
             else f"share of the configuration's seeds that ended {metric}, 0 to 1"
             if smap.share else f"median over seeds of {smap.metric}")
    scale = "log scale" if smap.log_color else "linear scale"
    symbols = "; ".join(f'"{figures.SYMBOLS[m]}" = {text}' for m, text in MARKERS.items())
    caption = (f"x: {layout.x}; y: {layout.y}; panels: {facets}. Color ({scale}): {color}. "
               f"Symbols: {symbols}. Gray: no trials.")
    if axes.searched:
        caption += (f" Every cell's median and symbols are over its seeds{pooled_note(axes)}:"
                    f" \"seeds\" there means its trials.")
    if smap.n_below or smap.n_above:
        low, high = smap.color_limits
        caption += (f" The color scale spans {low:.3g} to {high:.3g} (robust limits: the "
                    f"quartiles of the cells ± 3 interquartile ranges"
                    f"{', in log10 units' if smap.log_color else ''}, or the 5th to 95th "
                    f"percentiles when most cells share one value); "
                    f"{smap.n_below + smap.n_above} cell(s) beyond it "
                    f"({smap.n_below} below, {smap.n_above} above) take the end color, as the "
                    f"color bar's pointed ends show.")
    undefined = summary[(summary["n"] > 0) & (summary["n_defined"] == 0)]
    if len(undefined):
        caption += (f" Hatched: {len(undefined)} configuration(s) with trials "
                    f"({int(undefined['n'].sum())} in all) for which {smap.metric} is "
                    f"undefined (NaN in trials.parquet, e.g. a spike count without "
                    f"minibatch noise to measure it against, or a ratio without a net "
                    f"decrease); see docs/metrics.md.")
    return _section(figures.figure_to_data_uri(figures.plot_stability_map(smap)), caption)


def curves_section(run: RunData, axes: SweepAxes) -> dict[str, Any]:
    """Loss-curve image and caption (sweep gallery, or one trial's curves), or a note."""
    if run.trials.empty:
        return _section(note="No curves: the run has no finished trials.")
    if not len(axes):
        return _single_trial_curves(run)
    row, cols = curve_facets(axes)
    selection, fixed = select_curve_trials(run.trials, axes, row, cols)
    curves = read_curves(run.run_dir, trials=selection["trial"].tolist())
    split = "val" if (curves["split"] == "val").any() else "train"
    frame = attach_curves(selection, curves, split=split)
    if frame.empty:
        return _section(note="No curves recorded for the selected trials.")
    line = line_axis(axes, [a for a in (row, *cols) if a]) or "trial"
    held = "; ".join(f"{k} = {v}" for k, v in fixed.items()) or (
        "nothing else of the grid" if axes.searched else "nothing else varies")
    if axes.searched:
        held += f"; searched, and different in every curve: {', '.join(axes.searched)}"
    facets = list(dict.fromkeys(zip(frame["row"], frame["col"], strict=True)))
    shown = ""
    if len(facets) > MAX_CURVE_PANELS:
        keep = pd.Series(list(zip(frame["row"], frame["col"], strict=True)),
                         index=frame.index).isin(facets[:MAX_CURVE_PANELS])
        frame = frame[keep]
        shown = (f" Showing the first {MAX_CURVE_PANELS} of {len(facets)} panels; the trial "
                 f"explorer below shows every trial.")
    caption = (f"{split.capitalize()} loss vs step (log scale) for up to 5 values of {line} "
               f"spread over the grid, first seed of each configuration; held fixed: {held}. "
               f"Diverged trials are dashed with an \"x\" at their divergence step (at the "
               f"top edge when the engine stopped them between evaluations, else at the first "
               f"evaluation of the final blow-up). Values above 10x the initial loss are drawn "
               f"at the top edge.{shown}")
    image = figures.plot_loss_curves(frame, line, ylabel=f"{split} loss")
    return _section(figures.figure_to_data_uri(image), caption)


def _single_trial_curves(run: RunData) -> dict[str, Any]:
    first = run.trials.sort_values([c for c in (SEED, "trial") if c in run.trials]).iloc[0]
    trial = int(first["trial"])
    frame = trial_curves(read_curves(run.run_dir, trials=[trial]), trial)
    if frame.empty:
        return _section(note=f"No curves recorded for trial {trial}.")
    others = len(run.trials) - 1
    caption = (f"Trial {trial} (status {first['status']}): minibatch loss per step, full "
               f"train and validation loss at evaluation steps, and gradient norm."
               + (f" {others} more seed(s) of this configuration are in the table below."
                  if others else ""))
    objective = first.get("training_objective")
    image = figures.plot_trial_curves(frame, objective if isinstance(objective, str) else "task")
    return _section(figures.figure_to_data_uri(image), caption)


def _section(image: str | None = None, caption: str = "", note: str = "") -> dict[str, Any]:
    """A figure section: a data-URI image with its caption, or a note saying why none."""
    return {"image": image, "caption": caption, "note": note}
