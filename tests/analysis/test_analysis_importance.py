"""The variance decomposition on grids whose answer is known by construction."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.importance import (
    INTERACTIONS,
    SEED_NOISE,
    axis_importance,
    ranked_axes,
    variance_shares,
)

A_EFFECT = {"a0": -1.0, "a1": 0.0, "a2": 1.0}  # variance 2/3 over its levels
B_EFFECT = {"b0": -0.5, "b1": 0.5}  # variance 1/4


def grid(seeds: int = 4) -> pd.DataFrame:
    rows = [{"A": a, "B": b, "C": c, "seed": s}
            for a, b, c, s in itertools.product(A_EFFECT, B_EFFECT, ["c0", "c1"],
                                                range(seeds))]
    return pd.DataFrame(rows)


def test_additive_effects_split_in_proportion_to_their_variances():
    frame = grid()
    y = (frame["A"].map(A_EFFECT) + frame["B"].map(B_EFFECT)).to_numpy()
    levels = {a: pd.factorize(frame[a])[0] for a in "ABC"}
    cell = pd.factorize(frame[["A", "B", "C"]].agg("".join, axis=1))[0]
    shares = variance_shares(y, levels, cell, np.zeros(len(y), int), np.ones((1, 1)))
    total = 2 / 3 + 1 / 4
    assert shares["A"][0] == pytest.approx((2 / 3) / total)
    assert shares["B"][0] == pytest.approx((1 / 4) / total)
    assert shares["C"][0] == pytest.approx(0.0, abs=1e-12)
    assert shares[INTERACTIONS][0] == pytest.approx(0.0, abs=1e-12)
    assert shares[SEED_NOISE][0] == pytest.approx(0.0, abs=1e-12)


def test_a_pure_interaction_is_not_credited_to_either_axis():
    frame = grid()
    y = np.where((frame["A"] == "a2") & (frame["B"] == "b1"), 1.0, 0.0)
    y = np.where(frame["A"] == "a1", 0.5, y)  # plus a main effect of A
    levels = {a: pd.factorize(frame[a])[0] for a in "ABC"}
    cell = pd.factorize(frame[["A", "B", "C"]].agg("".join, axis=1))[0]
    shares = variance_shares(y, levels, cell, np.zeros(len(y), int), np.ones((1, 1)))
    parts = sum(shares[k][0] for k in shares)
    assert parts == pytest.approx(1.0)
    assert shares["A × B"][0] > 0.1 and shares["C"][0] == pytest.approx(0, abs=1e-12)
    assert shares["A × C"][0] == pytest.approx(0, abs=1e-12)
    assert shares[INTERACTIONS][0] == pytest.approx(0, abs=1e-12)  # no three-way term


def trials_where(status: pd.Series, frame: pd.DataFrame, loss: pd.Series) -> pd.DataFrame:
    return frame.assign(status=status, val_loss_initial=1.0, val_loss_final=loss,
                        task="t")


def test_divergence_explained_by_the_axis_that_causes_it_with_intervals_over_seeds():
    frame = grid(seeds=5)
    rng = np.random.default_rng(0)
    status = np.where(frame["A"] == "a2", "diverged", "converged")
    # Instability: B decides it, seeds add noise (a coin flip in 20% of trials).
    erratic = (frame["B"] == "b1") ^ (rng.random(len(frame)) < 0.2)
    status = np.where((status == "converged") & erratic, "unstable", status)
    loss = 10.0 ** (-frame["A"].map({"a0": 2.0, "a1": 1.0, "a2": 0.0}))
    trials = trials_where(status, frame, loss)
    out = axis_importance(trials, ["A", "B", "C"], n_resamples=300)
    share = out.set_index(["outcome", "source"])
    assert share.loc[("diverged", "A"), "share"] == pytest.approx(1.0)
    assert share.loc[("diverged", "C"), "share"] == pytest.approx(0.0, abs=1e-12)
    assert share.loc[("log_loss", "A"), "share"] == pytest.approx(1.0)
    erratic_b = share.loc[("erratic", "B")]
    assert 0.1 < erratic_b["share"] < 0.8  # A shares it: diverged trials are not erratic
    assert erratic_b["ci_low"] <= erratic_b["share"] <= erratic_b["ci_high"]
    assert erratic_b["ci_high"] - erratic_b["ci_low"] > 0.01  # seeds do vary
    erratic_c = share.loc[("erratic", "C")]
    assert erratic_c["share"] < 0.1 and erratic_c["ci_low"] < 0.05
    assert ranked_axes(out, ["C", "B", "A"]) == ["A", "B", "C"]


def test_an_outcome_that_never_varies_has_no_share():
    frame = grid(seeds=2)
    trials = trials_where("converged", frame, pd.Series(0.1, index=frame.index))
    out = axis_importance(trials, ["A", "B", "C"], n_resamples=50)
    assert out[out["outcome"] == "diverged"]["share"].isna().all()


def test_one_seed_gives_point_shares_without_intervals():
    frame = grid(seeds=1)
    status = np.where(frame["A"] == "a2", "diverged", "converged")
    out = axis_importance(trials_where(status, frame, pd.Series(0.1, index=frame.index)),
                          ["A", "B", "C"], n_resamples=50)
    row = out[(out["outcome"] == "diverged") & (out["source"] == "A")].iloc[0]
    assert row["share"] == pytest.approx(1.0) and np.isnan(row["ci_low"])


def test_report_opens_with_findings_and_ends_with_environment(sweep_report):
    html = sweep_report.read_text()
    order = [html.index(f'id="{i}"') for i in
             ("findings", "sweep", "stability-map", "metric-tables", "run")]
    assert order == sorted(order)
    findings = html[html.index('id="findings"'):html.index('id="sweep"')]
    assert "Suspects, ranked" in findings and "optimizer.lr" in findings
    assert "48 trials: " in findings


def test_stable_lr_per_optimizer_on_the_fixture(sweep_run):
    from analysis.axes import sweep_axes
    from analysis.findings import stable_lr_lines
    from analysis.load import load_run
    from analysis.sections import labeled

    run = load_run(sweep_run)
    axes = sweep_axes(run.trials, run.meta)
    lines = stable_lr_lines(labeled(run.trials, axes), axes)
    # sgd diverges at 0.1 in every (task, batch size) group; adam makes no progress at 0.001
    # and never diverges (conftest.status_of).
    assert lines == [
        "sgd: stable in all 4 groups (task x train.batch_size) from lr 0.001 to 0.01.",
        "adam: stable in all 4 groups (task x train.batch_size) from lr 0.01 to ≥ 0.1.",
    ]


def test_claims_one_line_each():
    from analysis.findings import claim_lines

    claims = pd.DataFrame({"statement": ["s1", "s2"], "effect": [0.4, -0.1],
                           "ci_low": [0.2, -0.3], "ci_high": [0.6, 0.1],
                           "verdict": ["supported", "inconclusive"], "unit": ["share", ""],
                           "q_value": [0.01, 0.4]})
    lines = claim_lines(claims)
    assert [line["verdict"] for line in lines] == ["supported", "inconclusive"]
    assert lines[0]["detail"] == "effect 0.4 [0.2, 0.6] share, q = 0.01"


def test_stable_lr_when_no_lr_is_stable_in_every_group(sweep_run):
    from analysis.axes import sweep_axes
    from analysis.findings import stable_lr_lines
    from analysis.load import load_run
    from analysis.sections import labeled

    run = load_run(sweep_run)
    trials = run.trials.copy()
    # sgd also makes no progress at 0.001 and 0.01 on blobs with full batches.
    stuck = ((trials["optimizer"] == "sgd") & (trials["task"] == "blobs")
             & (trials["train.batch_size"] == "full") & (trials["optimizer.lr"] < 0.1))
    trials.loc[stuck, "status"] = "no_progress"
    axes = sweep_axes(trials, run.meta)
    sgd = stable_lr_lines(labeled(trials, axes), axes)[0]
    assert sgd.startswith("sgd: no learning rate is stable in all 4 groups")
    assert "stable in the most groups: lr 0.001 (3 of 4), lr 0.01 (3 of 4)" in sgd


def test_a_stable_range_says_where_inside_it_seeds_made_no_progress(sweep_run):
    """The range's upper end is where divergence starts: an lr below it can still have
    stalled, and a reader picking the top of the range must be told."""
    from analysis.axes import sweep_axes
    from analysis.findings import stable_lr_lines
    from analysis.load import load_run
    from analysis.sections import labeled

    run = load_run(sweep_run)
    trials = run.trials.copy()
    stuck = ((trials["optimizer"] == "sgd") & (trials["task"] == "blobs")
             & (trials["train.batch_size"] == "full") & (trials["optimizer.lr"] == 0.01)
             & (trials["seed"] == 0))
    trials.loc[stuck, "status"] = "no_progress"
    axes = sweep_axes(trials, run.meta)
    assert stable_lr_lines(labeled(trials, axes), axes)[0] == (
        "sgd: stable in all 4 groups (task x train.batch_size) from lr 0.001 to 0.01; inside "
        "it some seeds made no progress at lr 0.01 (1 of 4 groups).")


def _search(seeds: int = 3, proposals: int = 40) -> pd.DataFrame:
    """A search: each proposal draws its own log-uniform lr and a batch size (no effect);
    every seed runs every proposal; a proposal diverges on every seed iff its lr > 1."""
    rng = np.random.default_rng(1)
    lr = 10.0 ** rng.uniform(-4, 1, proposals)
    batch = rng.choice(["8", "32"], proposals)
    frame = pd.DataFrame([{"optimizer.lr": lr[p], "train.batch_size": batch[p], "seed": s}
                          for p in range(proposals) for s in range(seeds)])
    status = np.where(frame["optimizer.lr"] > 1, "diverged", "converged")
    return trials_where(status, frame, pd.Series(0.1, index=frame.index))


def test_a_searched_key_is_credited_with_its_effect_not_the_seeds() -> None:
    """Left out, the lr's effect would be "seed" noise: every proposal is its own value."""
    out = axis_importance(_search(), ["train.batch_size"], n_resamples=50,
                          searched=["optimizer.lr"])
    share = out[out["outcome"] == "diverged"].set_index("source")["share"]
    assert share["optimizer.lr"] > 0.5
    assert share[SEED_NOISE] == pytest.approx(0.0, abs=1e-12)  # seeds agree on each proposal
    assert share["train.batch_size"] < 0.1
    assert ranked_axes(out, ["train.batch_size", "optimizer.lr"])[0] == "optimizer.lr"


def test_quarters_rank_a_searched_keys_values() -> None:
    from analysis.importance import quarters
    values = pd.Series([1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 10.0, np.nan])
    assert quarters(values).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert quarters(pd.Series([3.0, 1.0, 1.0])).tolist() == [1, 0, 0]


def test_a_pruned_trial_has_no_outcome() -> None:
    from analysis.importance import outcomes

    trials = pd.DataFrame({"status": ["diverged", "pruned", "converged"],
                           "val_loss_initial": [1.0, 1.0, 1.0],
                           "val_loss_final": [np.inf, 0.5, 0.1], "task": "t"})
    out = outcomes(trials)
    assert out.loc[1].isna().all()
    assert out.loc[0, "diverged"] == 1 and out.loc[2, "log_loss"] == pytest.approx(-1)
