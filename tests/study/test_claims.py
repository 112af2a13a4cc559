"""Claim specs are validated before any training, naming the bad key."""

from __future__ import annotations

import pytest

from study.claims import ClaimError, check_claims

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


@pytest.mark.parametrize(("claim", "message"), [
    ({**CLAIMS[0], "metrc": "x"}, "metrc: unknown claim key"),
    ({**CLAIMS[0], "metric": "val_los"}, "unknown metric"),
    ({**CLAIMS[0], "expect": "increasing"}, "expect: must be one of"),
    ({**CLAIMS[3], "trend": "train.batch_size"}, "not an axis"),
])
def test_bad_claims_are_rejected_naming_the_key(claim, message) -> None:
    with pytest.raises(ClaimError, match=message):
        check_claims([claim], list(AXES), ["val_loss_final", "diverged"])


@pytest.mark.parametrize("claim, message", [
    ({"expect": "same"}, "margin > 0"),
    ({"expect": "same", "margin": -1}, "margin > 0"),
    ({"expect": "lower", "margin": 0.1}, "only an equivalence claim"),
])
def test_equivalence_margins_are_checked(claim, message) -> None:
    base = {"statement": "s", "metric": "val_loss_final",
            "compare": {"axis": "mitigation", "arm": "fix", "baseline": "none"}}
    with pytest.raises(ClaimError, match=message):
        check_claims([{**base, **claim}], list(AXES), ["val_loss_final"])


@pytest.mark.parametrize(("compare", "message"), [
    ({"arm": {"mitigation": "fix", "optimizer.lr": 0.01}, "baseline": {"mitigation": "none"}},
     "must both map the same axes"),
    ({"arm": {"mitigation": "fix"}, "baseline": "none"}, "must both map the same axes"),
    ({"axis": "mitigation", "arm": {"mitigation": "fix"}, "baseline": {"mitigation": "none"}},
     "compare.axis: arms given as axis -> value mappings"),
    ({"arm": {"train.batch_size": 8}, "baseline": {"train.batch_size": 32}}, "not an axis"),
    ({"arm": "fix", "baseline": "none"}, "compare.axis: missing"),
])
def test_two_axis_arms_are_checked(compare, message) -> None:
    claim = {"statement": "s", "metric": "val_loss_final", "expect": "lower",
             "compare": compare}
    with pytest.raises(ClaimError, match=message):
        check_claims([claim], list(AXES), ["val_loss_final"])


@pytest.mark.parametrize(("claim", "message"), [
    ({**CLAIMS[0], "compare": {"axis": "mitigation", "arm": "fixx", "baseline": "none"}},
     "sweep.claims[0].compare.arm: no trial has mitigation='fixx' (its values: ['none', "
     "'fix', 'noop']); the claim would compare nothing"),
    ({**CLAIMS[0], "compare": {"arm": {"mitigation": "fix", "optimizer.lr": 0.01},
                               "baseline": {"mitigation": "none", "optimizer.lr": 3}}},
     "sweep.claims[0].compare.baseline: no trial has optimizer.lr=3 (its values: [0.01, "
     "0.1, 1.0]); the claim would compare nothing"),
    ({**CLAIMS[3], "where": {"mitigation": ["none", "nope"]}},
     "sweep.claims[0].where.mitigation: no trial has mitigation='nope' (its values: "
     "['none', 'fix', 'noop']); the claim would select nothing"),
    ({**CLAIMS[3], "where": {"optimizer": "adam"}},
     "sweep.claims[0].where.optimizer: no trial has optimizer='adam' (its values: ['sgd']); "
     "the claim would select nothing"),
    ({**CLAIMS[0], "compare": {"axis": "optimizer.lr", "arm": 0.1, "baseline": 1e-1}},
     "sweep.claims[0].compare: the arm and the baseline are the same trials "
     "({'optimizer.lr': 0.1})"),
])
def test_a_claim_that_selects_no_trial_is_refused_where_the_values_are_known(
        claim, message) -> None:
    # Scored, it read `inconclusive` with n_trials 0, as if its evidence had been weighed.
    values = {**AXES, "optimizer": ["sgd"]}
    with pytest.raises(ClaimError) as err:
        check_claims([claim], list(AXES), ["val_loss_final", "diverged"], values=values)
    assert str(err.value) == message
    if "same trials" not in message:  # without values nothing is known to be missing
        check_claims([claim], list(AXES), ["val_loss_final", "diverged"])


def test_values_match_as_the_trials_columns_do() -> None:
    # 1e-1 and 0.1 are one learning rate; an axis of strings matches a number as text.
    claim = {**CLAIMS[0], "compare": {"axis": "optimizer.lr", "arm": 1e-1, "baseline": 0.01},
             "where": {"mitigation": ["fix", "none"]}}
    check_claims([claim], list(AXES), ["val_loss_final"],
                 values={**AXES, "optimizer.lr": [0.010000000000000002, 0.1]})
    batch = {**CLAIMS[0], "compare": {"axis": "train.batch_size", "arm": 8,
                                      "baseline": "full"}}
    check_claims([batch], ["train.batch_size"], ["val_loss_final"],
                 values={"train.batch_size": ["8", "full"]})


@pytest.mark.parametrize(("claim", "message"), [
    ({**CLAIMS[0], "where": {"mitigation": "none"}},
     "sweep.claims[0].where.mitigation: keeps ['none'], without the arm's 'fix'; the claim "
     "would compare nothing"),
    ({**CLAIMS[3], "where": {"optimizer.lr": 0.1}},
     "sweep.claims[0].where.optimizer.lr: a trend over optimizer.lr needs at least two of "
     "its values, the claim keeps [0.1]"),
])
def test_a_where_that_removes_what_the_claim_compares_is_refused(claim, message) -> None:
    with pytest.raises(ClaimError) as err:
        check_claims([claim], list(AXES), ["val_loss_final", "diverged"])
    assert str(err.value) == message
    check_claims([{**claim, "where": {**claim["where"], **(
        {"mitigation": ["none", "fix"]} if "compare" in claim else
        {"optimizer.lr": [0.1, 1.0]})}}], list(AXES), ["val_loss_final", "diverged"])
