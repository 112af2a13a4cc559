"""Loss-curve galleries: a few representative trials per status, their loss and gradient-norm
curves (compute: `pick_representatives`, `gallery_curves`; draw: `plot_gallery`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import FINAL, INITIAL, order_statuses
from analysis.axes import SEED, SweepAxes, format_key, value_key
from analysis.curves import spread
from analysis.figures import log_y, plt, set_panel_title, short_label

PER_STATUS = 3
TASK_OBJECTIVE = "task"  # `training_objective` of a trial whose minibatch loss is the task's
SHORT_NAMES = {"optimizer.lr": "lr", "train.batch_size": "bs", "model.depth": "depth",
               "model.width": "width", "model.activation": "act", SEED: "seed"}


def pick_representatives(trials: pd.DataFrame, axes: SweepAxes,
                         per_status: int = PER_STATUS) -> pd.DataFrame:
    """Up to `per_status` trials per status, spread over that status's outcomes.

    Within a status, trials are ranked by final / initial validation loss (ties by trial
    number) and the picks are evenly spaced over that ranking, ends included: the best and
    the worst of the status and some between. Columns: `status`, `trial`, `pos` (0..k-1),
    `n_status` (trials with the status), `divergence_step`, `title` (the trial's
    varying-axis values and seed), `objective` (its `training_objective`, `task` when the
    minibatch loss is the task's loss). Statuses in order_statuses order.
    """
    ratio = (pd.to_numeric(trials.get(FINAL), errors="coerce")
             / pd.to_numeric(trials.get(INITIAL), errors="coerce")
             if FINAL in trials and INITIAL in trials else pd.Series(0.0, index=trials.index))
    work = trials.assign(_ratio=ratio.fillna(np.inf))
    parts = []
    for status in order_statuses(trials["status"].astype(str)):
        members = work[work["status"].astype(str) == status].sort_values(
            ["_ratio", "trial"], kind="stable")
        picked = members.iloc[spread(len(members), per_status)]
        parts.append(pd.DataFrame({
            "status": status, "trial": picked["trial"].to_numpy(),
            "pos": np.arange(len(picked)), "n_status": len(members),
            "divergence_step": pd.to_numeric(picked.get("divergence_step"),
                                             errors="coerce").to_numpy()
            if "divergence_step" in picked else np.nan,
            "title": [trial_title(row, axes) for _, row in picked.iterrows()],
            "objective": (picked["training_objective"].fillna(TASK_OBJECTIVE).astype(str)
                          .to_numpy() if "training_objective" in picked else TASK_OBJECTIVE),
        }))
    columns = ["status", "trial", "pos", "n_status", "divergence_step", "title", "objective"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(
        columns=columns)


def trial_title(row: pd.Series, axes: SweepAxes) -> str:
    """`trial 12: blobs, sgd, lr=0.1, bs=32, seed=0` (group labels bare, numbers named)."""
    parts = []
    for name in [*axes.names, SEED]:
        if name not in row.index:
            continue
        label = format_key(value_key(row[name]))
        if "." in name or name == SEED:
            parts.append(f"{SHORT_NAMES.get(name, name.split('.')[-1])}={short_label(label)}")
        else:
            parts.append(label)
    return f"trial {int(row['trial'])}: " + ", ".join(parts)


def gallery_curves(picks: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Finite curve rows of the picked trials that the gallery draws.

    Rows: `status`, `pos`, `trial`, `panel` ("loss" or "grad_norm"), `split`, `step`,
    `value`. Loss: minibatch loss plus train/val evaluations; gradient norm: minibatch.
    """
    wanted = curves[((curves["metric"] == "loss") & curves["split"].isin(["batch", "train",
                                                                             "val"]))
                    | ((curves["metric"] == "grad_norm") & (curves["split"] == "batch"))]
    wanted = wanted[np.isfinite(wanted["value"])]
    merged = picks[["status", "pos", "trial"]].merge(wanted, on="trial", how="inner")
    merged["panel"] = np.where(merged["metric"] == "grad_norm", "grad_norm", "loss")
    return merged[["status", "pos", "trial", "panel", "split", "step", "value"]].sort_values(
        ["pos", "panel", "split", "step"], kind="stable", ignore_index=True)


def plot_gallery(picks: pd.DataFrame, frame: pd.DataFrame) -> Figure:
    """One status: a column per picked trial, loss on top and gradient norm below (log y).

    `picks`: that status's rows of pick_representatives; `frame`: its gallery_curves rows.
    A diverged trial's divergence step is a dotted vertical line.
    """
    n = max(len(picks), 1)
    # A fixed grid needs no layout engine (constrained layout doubles the drawing time).
    width = 3.4 * n + 0.6
    fig, grid = plt.subplots(2, n, squeeze=False, figsize=(width, 4.8))
    # Room on the right of every panel for a right-hand objective axis's tick labels.
    twin = bool((picks["objective"] != TASK_OBJECTIVE).any())
    fig.subplots_adjust(left=0.8 / width, right=1 - (0.55 if twin else 0.15) / width,
                        top=0.87, bottom=0.2, wspace=0.5 if twin else 0.32, hspace=0.12)
    styles = {"batch": dict(color="0.55", linewidth=0.7, label="minibatch"),
              "train": dict(color="#1f4e9c", marker="o", ms=3, linewidth=1.2, label="train"),
              "val": dict(color="#c2571a", marker="s", ms=3, linewidth=1.2, linestyle="--",
                          label="val")}
    for j, pick in enumerate(picks.itertuples()):
        rows = frame[frame["pos"] == pick.pos]
        for i, panel in enumerate(("loss", "grad_norm")):
            ax = grid[i, j]
            part = rows[rows["panel"] == panel]
            own_axis = panel == "loss" and pick.objective != TASK_OBJECTIVE
            for split, style in styles.items():
                line = part[part["split"] == split]
                if line.empty or (own_axis and split == "batch"):
                    continue
                ax.plot(line["step"], line["value"], **style)
            if own_axis:
                # Another loss than the evaluations': its own axis, never the same scale.
                draw_objective_axis(ax, part[part["split"] == "batch"], pick.objective)
                part = part[part["split"] != "batch"]
            log_y(ax, part["value"])
            if np.isfinite(pick.divergence_step):
                ax.axvline(pick.divergence_step, color="black", linestyle=":", linewidth=1)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(("loss" if panel == "loss" else "grad norm") if j == 0 else "")
            if i == 0:
                set_panel_title(ax, _wrap(pick.title), 9)
            else:
                ax.set_xlabel("step")
            if i == 0:
                ax.tick_params(labelbottom=False)
    handles = [plt.Line2D([], [], **style) for style in styles.values()]
    handles.append(plt.Line2D([], [], color="black", linestyle=":", label="divergence step"))
    fig.legend(handles=handles, loc="lower center", frameon=False, ncols=4, fontsize=9)
    return fig


def draw_objective_axis(ax, line: pd.DataFrame, objective: str) -> None:
    """The minibatch training objective on a right-hand axis of its own, labelled with what
    it is (it is not the task's loss the evaluations report)."""
    if line.empty:
        return
    twin = ax.twinx()
    twin.plot(line["step"], line["value"], color="0.55", linewidth=0.7)
    log_y(twin, line["value"])
    twin.set_ylabel(f"minibatch {objective}", fontsize=8, color="0.4")
    twin.tick_params(labelsize=8, colors="0.4")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)


def _wrap(title: str, width: int = 42) -> str:
    """Break a long title at commas so it fits above a narrow panel."""
    lines, current = [], ""
    for part in title.split(", "):
        candidate = f"{current}, {part}" if current else part
        if len(candidate) > width and current:
            lines.append(current + ",")
            current = part
        else:
            current = candidate
    return "\n".join([*lines, current])

