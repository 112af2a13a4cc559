"""Claims evaluate to the known answer on a fixture results table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study.claims import ClaimError, benjamini_hochberg, check_claims, evaluate_claims


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


AXES = {"mitigation": ["none", "fix", "noop"], "optimizer.lr": [0.01, 0.1, 1.0]}
CLAIMS = [
    {"statement": "fix lowers loss", "metric": "val_loss_final", "expect": "lower",
     "compare": {"axis": "mitigation", "arm": "fix", "baseline": "none"}},
    {"statement": "fix raises loss", "metric": "val_loss_final", "expect": "higher",
     "compare": {"axis": "mitigation", "arm": "fix", "baseline": "none"}},
    {"statement": "noop lowers loss", "metric": "val_loss_final", "expect": "lower",
     "compare": {"axis": "mitigation", "arm": "noop", "baseline": "none"}},
    {"statement": "divergence rises with lr", "metric": "diverged", "expect": "increasing",
     "trend": "optimizer.lr", "where": {"mitigation": "none"}},
]


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


def test_benjamini_hochberg_matches_the_textbook_example() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])


@pytest.mark.parametrize(("claim", "message"), [
    ({**CLAIMS[0], "metrc": "x"}, "metrc: unknown claim key"),
    ({**CLAIMS[0], "metric": "val_los"}, "unknown metric"),
    ({**CLAIMS[0], "expect": "increasing"}, "expect: must be one of"),
    ({**CLAIMS[3], "trend": "train.batch_size"}, "not an axis"),
])
def test_bad_claims_are_rejected_naming_the_key(claim, message) -> None:
    with pytest.raises(ClaimError, match=message):
        check_claims([claim], list(AXES), ["val_loss_final", "diverged"])
