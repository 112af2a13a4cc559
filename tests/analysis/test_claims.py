"""Claims score to the known answer on a fixture results table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.claims import evaluate_claims
from study.claims import check_claims
from tests.study.test_claims import AXES, CLAIMS


def _fixture() -> pd.DataFrame:
    """20 seeds x mitigation {none, fix, noop} x lr {0.01, 0.1, 1}, with known structure:
    `fix` lowers loss by 1 (noise 0.1); `noop` changes nothing (pure noise); divergence
    is certain at lr 1 and absent below."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(20):
        for lr in (0.01, 0.1, 1.0):
            base = 2.0 + rng.normal(0, 0.5)
            for mitigation, shift in (("none", 0.0), ("fix", -1.0), ("noop", 0.0)):
                rows.append({"seed": seed, "optimizer.lr": lr, "mitigation": mitigation,
                             "val_loss_final": base + shift + rng.normal(0, 0.1),
                             "status": "diverged" if lr == 1.0 else "converged"})
    return pd.DataFrame(rows)


def test_known_answers_supported_contradicted_inconclusive() -> None:
    out = evaluate_claims(_fixture(), CLAIMS, AXES)
    assert list(out["verdict"]) == ["supported", "contradicted", "inconclusive", "supported"]
    assert out.loc[0, "effect"] == pytest.approx(-1.0, abs=0.05)
    assert out.loc[0, "ci_low"] < -0.9 and out.loc[0, "ci_high"] > -1.1
    assert out.loc[0, "ci_high"] < 0
    assert out.loc[2, "ci_low"] < 0 < out.loc[2, "ci_high"]
    assert list(out["n_trials"]) == [120, 120, 120, 60]  # 60 pairs; 20 groups x 3 levels
    # Divergence goes 0, 0, 1 over log10 lr -2, -1, 0: the pooled slope is 0.5 per decade.
    assert out.loc[3, "effect"] == pytest.approx(0.5)
    assert (out["q_value"] >= out["p_value"]).all()


def test_evaluation_is_deterministic_and_independent_of_row_order() -> None:
    trials = _fixture()
    a = evaluate_claims(trials, CLAIMS, AXES)
    b = evaluate_claims(trials.sample(frac=1.0, random_state=3), CLAIMS, AXES)
    pd.testing.assert_frame_equal(a[["effect", "n_trials", "verdict"]],
                                  b[["effect", "n_trials", "verdict"]])


def test_no_pairs_is_inconclusive_not_an_error() -> None:
    claim = {**CLAIMS[0], "where": {"optimizer.lr": 5.0}}
    out = evaluate_claims(_fixture(), [claim], AXES)
    assert out.loc[0, "verdict"] == "inconclusive" and out.loc[0, "n_trials"] == 0


def test_equivalence_claims_can_support_no_effect_and_contradict_a_real_one() -> None:
    same = [
        {"statement": "noop changes nothing", "metric": "val_loss_final", "expect": "same",
         "margin": 0.2, "compare": {"axis": "mitigation", "arm": "noop", "baseline": "none"}},
        {"statement": "fix changes nothing", "metric": "val_loss_final", "expect": "same",
         "margin": 0.2, "compare": {"axis": "mitigation", "arm": "fix", "baseline": "none"}},
        {"statement": "noop within a hair", "metric": "val_loss_final", "expect": "same",
         "margin": 0.001, "compare": {"axis": "mitigation", "arm": "noop", "baseline": "none"}},
    ]
    out = evaluate_claims(_fixture(), same, AXES)
    # noop: paired noise of sd 0.14 over 60 pairs, well inside +-0.2; fix: -1, far outside.
    assert list(out["verdict"]) == ["supported", "contradicted", "inconclusive"]
    assert list(out["margin"]) == [0.2, 0.2, 0.001]
    assert out.loc[0, "p_value"] <= 0.05 < out.loc[2, "p_value"]


def test_every_claim_states_the_unit_of_its_effect() -> None:
    out = evaluate_claims(_fixture(), CLAIMS, AXES)
    assert out.loc[0, "unit"] == "val_loss_final difference (arm - baseline)"
    assert out.loc[3, "unit"] == "change in share diverged per decade of optimizer.lr"
    logged = evaluate_claims(_fixture(), [{**CLAIMS[0], "log": True}], AXES)
    assert logged.loc[0, "unit"] == "log10 ratio of val_loss_final (arm / baseline)"


def test_a_blown_up_loss_counts_as_its_initial_loss_in_a_claim() -> None:
    trials = _fixture().assign(val_loss_initial=3.0)
    blown = (trials["mitigation"] == "none") & (trials["seed"] < 5)
    trials.loc[blown, "val_loss_final"] = np.inf
    out = evaluate_claims(trials, CLAIMS[:1], AXES)
    assert np.isfinite(out.loc[0, "effect"]) and out.loc[0, "verdict"] == "supported"
    assert out.loc[0, "n_units"] == 60
    assert out.loc[0, "unit"] == ("val_loss_final difference (arm - baseline); each loss "
                                  "capped at its initial")
    # The cap is the claim's: min(final, initial) per trial, as the unit says.
    capped = trials.assign(val_loss_final=np.minimum(trials["val_loss_final"], 3.0))
    again = evaluate_claims(capped, CLAIMS[:1], AXES)
    assert again.loc[0, "effect"] == out.loc[0, "effect"]
    # Without an initial loss to cap at, non-finite pairs are left out and counted.
    bare = evaluate_claims(trials.drop(columns="val_loss_initial"), CLAIMS[:1], AXES)
    assert bare.loc[0, "n_units"] == 45  # 5 seeds x 3 lrs of 60 pairs dropped


def test_arms_that_differ_on_two_axes_pair_by_seed_and_the_remaining_axes() -> None:
    """fix at lr 0.01 vs none at lr 0.1: one pair per seed (no other axis left); the effect
    is the mean of exactly those differences."""
    trials = _fixture()
    claim = {"statement": "fix at a small lr beats none at a larger one",
             "metric": "val_loss_final", "expect": "lower",
             "compare": {"arm": {"mitigation": "fix", "optimizer.lr": 0.01},
                         "baseline": {"mitigation": "none", "optimizer.lr": 0.1}}}
    check_claims([claim], list(AXES), ["val_loss_final"])
    out = evaluate_claims(trials, [claim], AXES)
    arm = trials[(trials["mitigation"] == "fix") & (trials["optimizer.lr"] == 0.01)]
    base = trials[(trials["mitigation"] == "none") & (trials["optimizer.lr"] == 0.1)]
    want = (arm.set_index("seed")["val_loss_final"]
            - base.set_index("seed")["val_loss_final"]).mean()
    assert out.loc[0, "effect"] == pytest.approx(want)
    assert out.loc[0, "n_units"] == 20 and out.loc[0, "verdict"] == "supported"
    assert out.loc[0, "comparison"] == ("mitigation=fix, optimizer.lr=0.01 vs "
                                        "mitigation=none, optimizer.lr=0.1, paired by seed")


def test_a_claims_interval_and_p_do_not_depend_on_the_other_claims() -> None:
    """Each claim draws from its own generator (its statement): scoring it alone, with
    others, or in another order gives the same bits; only q depends on the family."""
    trials = _fixture()
    together = evaluate_claims(trials, CLAIMS, AXES)
    assert together.equals(evaluate_claims(trials, CLAIMS, AXES))
    alone = evaluate_claims(trials, CLAIMS[2:3], AXES)
    reordered = evaluate_claims(trials, CLAIMS[::-1], AXES)
    drawn = ["effect", "ci_low", "ci_high", "p_value"]
    assert together.loc[2, drawn].equals(alone.loc[0, drawn])
    assert together.loc[2, drawn].equals(reordered.loc[1, drawn])
    first = evaluate_claims(trials, CLAIMS[:1], AXES)
    assert first.loc[0, "q_value"] == first.loc[0, "p_value"] < together.loc[0, "q_value"]


def test_claims_files_in_three_shapes_and_merging_by_statement(tmp_path) -> None:
    import yaml

    from analysis.claims import merge_claims, read_claims_file, saved_claims
    from study.claims import ClaimError

    edited = {**CLAIMS[0], "expect": "higher"}
    shapes = {"sweep.yaml": {"sweep": {"name": "x", "claims": [edited, CLAIMS[3]]}},
              "mapping.yaml": {"claims": [edited, CLAIMS[3]]},
              "list.yaml": [edited, CLAIMS[3]]}
    for name, content in shapes.items():
        (tmp_path / name).write_text(yaml.safe_dump(content))
        assert read_claims_file(tmp_path / name) == [edited, CLAIMS[3]], name
    # Saved claims keep their order; one with an edited statement's twin is replaced, the
    # new one is added at the end.
    merged = merge_claims(CLAIMS[:3], read_claims_file(tmp_path / "list.yaml"))
    assert merged == [edited, CLAIMS[1], CLAIMS[2], CLAIMS[3]]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/config.yaml").write_text(yaml.safe_dump(
        {"seed": 0, "sweep": {"name": "x", "claims": CLAIMS[:2]}}))
    assert saved_claims(tmp_path) == CLAIMS[:2]
    assert saved_claims(tmp_path / "elsewhere") == []
    (tmp_path / "bad.yaml").write_text("claims: {statement: not a list}")
    with pytest.raises(ClaimError, match="expected a list of claims"):
        read_claims_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize("value", [8, 8.0, "8"])
def test_a_value_selects_the_trials_the_plan_said_it_would(value) -> None:
    """The plan's check (`takes`) and the scoring select by one rule: a batch-size axis of
    numbers and "full" (a column of text) is selected by 8, 8.0 and "8" alike."""
    trials = _fixture()
    trials["train.batch_size"] = [8 if seed % 2 == 0 else "full" for seed in trials["seed"]]
    claim = {**CLAIMS[0], "where": {"train.batch_size": value}}
    check_claims([claim], [*AXES, "train.batch_size"], ["val_loss_final", "diverged"],
                 values={"train.batch_size": [8, "full"]})  # raises if the plan says no
    out = evaluate_claims(trials, [claim], AXES)
    assert out.loc[0, "n_trials"] == 60 and out.loc[0, "verdict"] == "supported"


def test_a_compare_claim_on_a_searchs_run_is_refused(tmp_path) -> None:
    """A search's proposals each draw their own numeric keys: no arm has a pair."""
    from analysis.claims import score_claims
    from study import records
    from study.claims import ClaimError

    trials = _fixture().assign(trial=lambda t: range(len(t)), status="converged")
    records.write_trials(tmp_path, trials, {"sweep": "s", "axes": {"mitigation": []},
                                            "searched": ["optimizer.lr"], "seeds": [0]})
    (tmp_path / "claims.yaml").write_text(
        "- {statement: s, metric: val_loss_final, expect: lower,\n"
        "   compare: {axis: mitigation, arm: fix, baseline: none}}\n")
    with pytest.raises(ClaimError, match=r"claims\[0\]\.compare: a search's trials have no "
                                         r"pairs \(each proposal draws its own optimizer\.lr\)"):
        score_claims(tmp_path, claims=[], claims_file=tmp_path / "claims.yaml")
    trend = {**CLAIMS[3], "where": {}}  # a trend over the searched key is scored
    assert score_claims(tmp_path, claims=[trend]) is not None


def test_a_pruned_trial_counts_in_no_claim_but_one_about_pruning() -> None:
    """A cut run's divergence and final loss are unknown: counted as not diverged, a
    pruner that stops the high-lr runs early would hide the trend."""
    trials = _fixture()
    cut = (trials["optimizer.lr"] == 1.0) & (trials["seed"] < 10)
    trials.loc[cut, "status"] = "pruned"
    out = evaluate_claims(trials, [CLAIMS[3]], AXES)
    # The cut seeds keep lr 0.01 and 0.1 (no divergence: slope 0, Sxx 0.5 each); the
    # others 0, 0, 1 (Sxy 1, Sxx 2): pooled 10 / 25. Counted as not diverged: 10 / 40.
    assert out.loc[0, "effect"] == pytest.approx(0.4)
    assert out.loc[0, "n_trials"] == 60 - 10
    share = {**CLAIMS[3], "metric": "pruned"}
    assert evaluate_claims(trials, [share], AXES).loc[0, "n_trials"] == 60
