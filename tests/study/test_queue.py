"""`study.queue.tell` records what `Study.tell` records (it only skips the returned copy)."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from study import queue


@pytest.mark.parametrize(("value", "state", "expected"), [
    (0.25, None, TrialState.COMPLETE),
    (None, TrialState.PRUNED, TrialState.PRUNED),
    (math.nan, None, TrialState.FAIL),  # Study.tell's rule: a NaN objective fails the trial
])
def test_tell_records_what_study_tell_records(value, state, expected) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    mine, theirs = optuna.create_study(), optuna.create_study()
    warned = {}
    for study in (mine, theirs):
        trial = study.ask()
        trial.set_user_attr("status", "converged")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if study is mine:
                queue.tell(study, trial, value, state=state)
            else:
                study.tell(trial, value, state=state)
        warned[study is mine] = [str(w.message) for w in caught]
    assert warned[True] == warned[False]  # the same warnings (a NaN value: one)
    told, reference = mine.trials[0], theirs.trials[0]
    assert told.state == reference.state == expected
    assert told.values == reference.values
    assert told.user_attrs == reference.user_attrs
    with pytest.raises(ValueError, match="Cannot tell"):  # as Study.tell: told once
        queue.tell(mine, mine.trials[0].number, 0.5)
