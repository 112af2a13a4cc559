"""Each failure mode changes data, model or loop exactly as documented; each mitigation
undoes or limits its failure; a failure mode added as YAML only runs in a sweep."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import study.failures as f
from study import preflight
from study.engine import BatchedEngine
from study.failures import apply_transforms, transform_generator
from study.grid import CONF_DIR
from study.models import ModelSpec
from study.optimizers import SGD, Adam
from study.plan import plan_from_overrides
from study.schema import ConfigError
from study.tasks import Blobs, LinearRegression, TeacherMLP
from study.trial import LoopSpec, TrainSpec, TrialSpec

REG = TeacherMLP(n_train=200, n_val=100)
CLS = Blobs(n_train=300, n_val=100, n_classes=3)


def _data(task, transform, seed=0):
    return transform.apply_data(task.generate(seed), transform_generator(seed, transform))


def _trial(task, failures=(), mitigations=(), optimizer=None):
    base = TrialSpec(task, ModelSpec(depth=2, width=8), optimizer or SGD(lr=0.05),
                     TrainSpec(batch_size=32, epochs=2, dtype="float64"), 0)
    return apply_transforms(base, [(type(t).__name__, t) for t in failures],
                            [(type(t).__name__, t) for t in mitigations])


# ------------------------------------------------------------------------- data failures
def test_target_outliers_move_exactly_the_fraction_by_the_magnitude() -> None:
    clean = REG.generate(0)
    dirty = _data(REG, f.TargetOutliers(fraction=0.1, magnitude=20.0))
    moved = (dirty.y_train - clean.y_train).abs().squeeze(1)
    assert int((moved > 0).sum()) == 20
    assert torch.allclose(moved[moved > 0], 20 * clean.y_train.std(dim=0).expand(20))
    assert torch.equal(dirty.y_val, clean.y_val) and torch.equal(dirty.x_train, clean.x_train)
    again = _data(REG, f.TargetOutliers(fraction=0.1, magnitude=20.0))
    assert torch.equal(again.y_train, dirty.y_train)  # deterministic from the data seed


def test_unscaled_features_span_the_declared_orders_of_magnitude() -> None:
    clean, dirty = REG.generate(0), _data(REG, f.UnscaledFeatures(1e-2, 1e2))
    ratio = dirty.x_train / clean.x_train
    assert torch.allclose(ratio[0], torch.logspace(-2, 2, 10, dtype=torch.float64))
    assert torch.allclose(dirty.x_val / clean.x_val, ratio[:1].expand_as(clean.x_val))


def test_unscaled_on_one_feature_makes_it_larger_and_takes_explicit_scales() -> None:
    one = LinearRegression(dim=1, n_train=50, n_val=50)
    clean, dirty = one.generate(0), _data(one, f.UnscaledFeatures(1e-2, 1e2))
    assert torch.allclose(dirty.x_train, 100 * clean.x_train)
    explicit = f.UnscaledFeatures(scales=[0.1, 1, 1000] + [1] * 7)
    ratio = _data(REG, explicit).x_val / REG.generate(0).x_val
    assert torch.allclose(ratio[0, :3], torch.tensor([0.1, 1, 1000], dtype=torch.float64))
    assert hash(explicit) and "scales" not in f.UnscaledFeatures().params()
    with pytest.raises(ValueError, match="has 2 entries, the task has 10 features"):
        _trial(REG, [f.UnscaledFeatures(scales=[1, 2])])
    with pytest.raises(ValueError, match="finite number > 0"):
        f.UnscaledFeatures(scales=[1, -2])


def test_input_outliers_scale_one_feature_of_a_few_training_rows() -> None:
    clean = REG.generate(0)
    dirty = _data(REG, f.InputOutliers(fraction=0.02, magnitude=100.0, feature=3))
    changed = (dirty.x_train != clean.x_train).nonzero()
    assert len(changed) == 4 and (changed[:, 1] == 3).all()  # 2% of 200 rows, feature 3
    rows = changed[:, 0]
    assert torch.equal(dirty.x_train[rows, 3], 100 * clean.x_train[rows, 3])
    assert torch.equal(dirty.x_val, clean.x_val) and torch.equal(dirty.y_train, clean.y_train)
    assert dirty.irreducible_loss == clean.irreducible_loss
    assert len((_data(REG, f.InputOutliers(fraction=0.001)).x_train
                != clean.x_train).nonzero()) == 1  # at least one row
    with pytest.raises(ValueError, match=r"feature must be in \[0, 9\]"):
        _trial(REG, [f.InputOutliers(feature=10)])


def test_mixed_units_rescale_one_column_in_a_fraction_of_the_rows() -> None:
    clean = REG.generate(0)
    dirty = _data(REG, f.MixedUnits(fraction=0.5, factor=1000.0, feature=1))
    column, before = dirty.x_train[:, 1], clean.x_train[:, 1]
    assert int((column == 1000 * before).sum()) == 100 and int((column == before).sum()) == 100
    assert torch.equal(dirty.x_train[:, [0, *range(2, 10)]], clean.x_train[:, [0, *range(2, 10)]])
    assert torch.equal(dirty.x_val, clean.x_val)


def test_target_scale_moves_the_floor_with_the_targets() -> None:
    clean = REG.generate(0)
    dirty = _data(REG, f.TargetScale(factor=1000.0, offset=5.0))
    assert torch.allclose(dirty.y_val, 5 + 1000 * clean.y_val)
    assert dirty.irreducible_loss == pytest.approx(1e6 * clean.irreducible_loss)
    with pytest.raises(ValueError, match="regression tasks only"):
        _trial(CLS, [f.TargetScale()])


def test_target_scale_with_standardized_targets_is_the_clean_run_in_other_units() -> None:
    """Standardizing undoes the scale exactly, and losses and floor are both reported in
    the scaled units, so every loss is factor^2 the clean run's and the status is the same:
    the floor moved with the targets."""
    from study.metrics import summarize

    clean = _trial(REG, [], [f.StandardizeTargets()])
    scaled = _trial(REG, [f.TargetScale(factor=30.0)], [f.StandardizeTargets()])
    a, b = BatchedEngine().run([clean, scaled], torch.device("cpu"))
    np.testing.assert_allclose(b.val_loss, 900 * a.val_loss, rtol=1e-9)
    assert b.irreducible_loss == pytest.approx(900 * a.irreducible_loss)
    assert summarize(a)["status"] == summarize(b)["status"]


def test_pure_noise_targets_leave_nothing_to_learn_and_set_the_floor() -> None:
    """Both splits redrawn independently of x; the floor is the best x-free predictor's loss,
    and a trained model cannot beat it on validation (it only fits training noise)."""
    clean = REG.generate(0)
    noise = _data(REG, f.PureNoiseTargets())
    assert noise.irreducible_loss == pytest.approx(float(noise.y_val.square().mean()))
    assert abs(float(noise.y_train.std()) / float(clean.y_train.std()) - 1) < 0.2
    assert torch.equal(_data(REG, f.PureNoiseTargets()).y_val, noise.y_val)  # seeded
    classes = _data(CLS, f.PureNoiseTargets())
    assert classes.irreducible_loss == pytest.approx(np.log(3))
    assert set(classes.y_val.tolist()) == {0, 1, 2}
    (trace,) = BatchedEngine().run([_trial(REG, [f.PureNoiseTargets()])], torch.device("cpu"))
    assert trace.val_loss.min() > 0.9 * trace.irreducible_loss


def test_label_noise_redraws_the_fraction_of_labels() -> None:
    clean, noisy = CLS.generate(0), _data(CLS, f.LabelNoise(fraction=0.3))
    changed = int((clean.y_train != noisy.y_train).sum())
    assert 0.3 * 300 * (2 / 3) * 0.6 < changed <= 90  # redraws may land on the same class
    reg_clean, reg_noisy = REG.generate(0), _data(REG, f.LabelNoise(std=0.5))
    extra = (reg_noisy.y_train - reg_clean.y_train).std()
    assert abs(float(extra) / float(reg_clean.y_train.std()) - 0.5) < 0.1


def test_nan_features_and_mean_imputation() -> None:
    holes = _data(REG, f.NaNFeatures(fraction=0.05))
    share = float(holes.x_train.isnan().double().mean())
    assert 0.03 < share < 0.07 and holes.x_val.isnan().any()
    fixed = f.MeanImputation().apply_data(holes, torch.Generator())
    assert not fixed.x_train.isnan().any() and not fixed.x_val.isnan().any()
    col = torch.nanmean(holes.x_train, dim=0)
    rows, cols = holes.x_train.isnan().nonzero(as_tuple=True)
    assert torch.equal(fixed.x_train[rows, cols], col[cols])


def test_class_imbalance_follows_the_ratio_and_keeps_validation_balanced() -> None:
    data = _data(CLS, f.ClassImbalance(ratio=9.0))
    counts = torch.bincount(data.y_train, minlength=3).double()
    assert counts.sum() == 300
    assert 5 < counts[0] / counts[2] < 16  # expected 9
    assert torch.equal(data.y_val, CLS.generate(0).y_val)
    with pytest.raises(ValueError, match="classification tasks only"):
        f.ClassImbalance().check(REG)


def test_sorted_sorts_training_targets_and_switches_shuffling_off() -> None:
    data = _data(REG, f.SortedByTarget())
    assert (data.y_train[1:, 0] >= data.y_train[:-1, 0]).all()
    assert _trial(REG, [f.SortedByTarget()]).loop.shuffle is False
    assert _trial(REG, [f.SortedByTarget()], [f.Shuffling()]).loop.shuffle is True


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_no_shuffle_repeats_the_stored_minibatches_every_epoch(engine: str) -> None:
    """At lr 1e-30 (0 is refused) the float64 parameters never move (the updates are far
    below an ulp of any weight), so a minibatch loss depends on its rows only:
    without reshuffling epoch 2 repeats epoch 1's losses step by step; with it, it does not.
    The data are untouched (unlike `sorted`)."""
    from study.engine import ReferenceEngine

    assert torch.equal(f.trial_dataset(_trial(REG, [f.NoShuffling()]), 0).y_train,
                       REG.generate(0).y_train)
    run = (ReferenceEngine() if engine == "reference" else BatchedEngine()).run
    frozen = SGD(lr=1e-30)
    fixed, shuffled = run([_trial(REG, [f.NoShuffling()], optimizer=frozen),
                           _trial(REG, [], optimizer=frozen)], torch.device("cpu"))
    assert _trial(REG, [f.NoShuffling()]).loop.shuffle is False
    assert _trial(REG, [f.NoShuffling()], [f.Shuffling()]).loop.shuffle is True
    per_epoch = len(fixed.step_loss) // 2  # 200 rows, batch 32: 7 steps, 2 epochs
    assert per_epoch == 7
    np.testing.assert_array_equal(fixed.step_loss[:per_epoch], fixed.step_loss[per_epoch:])
    assert not np.array_equal(shuffled.step_loss[:per_epoch], shuffled.step_loss[per_epoch:])


def test_normalization_mismatch_standardizes_train_only() -> None:
    data = _data(REG, f.NormalizationMismatch(offset=2.0, scale=5.0))
    assert torch.allclose(data.x_train.mean(0), torch.zeros(10, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(data.x_val, 2 + 5 * REG.generate(0).x_val)


def test_leakage_copies_validation_rows_into_training() -> None:
    data = _data(REG, f.Leakage(fraction=0.5))
    assert torch.equal(data.x_train[:50], data.x_val[:50])
    assert torch.equal(data.y_train[:50], data.y_val[:50])
    assert torch.equal(data.x_train[50:], REG.generate(0).x_train[50:])


# -------------------------------------------------------------------- data mitigations
def test_input_standardization_makes_train_features_unit_variance() -> None:
    raw = _data(REG, f.UnscaledFeatures())
    fixed = f.StandardizeInputs().apply_data(raw, torch.Generator())
    assert torch.allclose(fixed.x_train.mean(0), torch.zeros(10, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(fixed.x_train.std(0, correction=0),
                          torch.ones(10, dtype=torch.float64))
    # fitted on train only: validation uses the training statistics
    mean, std = raw.x_train.mean(0), raw.x_train.std(0, correction=0)
    assert torch.allclose(fixed.x_val, (raw.x_val - mean) / std)


def test_target_standardization_reports_losses_in_original_units() -> None:
    from study.seeds import seed_streams

    task = LinearRegression(n_train=64, n_val=64)
    raw = _trial(task, [f.ZeroInit()])  # predicts 0 at step 0
    std = _trial(task, [f.ZeroInit()], [f.StandardizeTargets()])  # predicts the train mean
    data = f.trial_dataset(std, seed_streams(0).data)
    assert torch.allclose(data.y_train.std(0, correction=0), torch.ones(1, dtype=torch.float64))
    clean = task.generate(seed_streams(0).data)
    a, b = BatchedEngine().run([raw, std], torch.device("cpu"))
    assert a.val_loss[0] == pytest.approx(float(clean.y_val.square().mean()), rel=1e-12)
    mean = clean.y_train.mean()
    assert b.val_loss[0] == pytest.approx(float((clean.y_val - mean).square().mean()),
                                          rel=1e-12)


# --------------------------------------------------------------- model and loop changes
def test_model_failures_fold_into_the_spec() -> None:
    assert _trial(REG, [f.ZeroInit()]).model.init == "zero"
    assert _trial(REG, [f.InitScale(10.0)]).model.init_scale == 10.0
    stack = _trial(REG, [f.SigmoidStack(depth=8)]).model
    assert (stack.depth, stack.activation) == (8, "sigmoid")
    drop = _trial(REG, [f.Dropout(p=0.5, at_eval=True)]).model
    assert (drop.dropout, drop.dropout_at_eval) == (0.5, True)


def test_loop_failures_and_their_fixes() -> None:
    assert _trial(REG, [f.MissingZeroGrad()]).loop.zero_grad is False
    assert _trial(CLS, [f.HandwrittenBCE()]).loop.loss == "bce_raw"
    assert _trial(CLS, [f.HandwrittenBCE()], [f.CorrectLoss()]).loop.loss == "task"
    assert _trial(CLS, [f.MSEForClassification()]).loop.loss == "mse_onehot"
    assert _trial(REG, [f.AbsurdLR()]).optimizer.lr == 1e6
    big = _trial(REG, [f.OversizedBatch(factor=4)])
    assert big.train.batch_size == 800 and big.train.steps_per_epoch(200) == 1
    assert _trial(REG, [], [f.WeightDecay(1e-3)]).optimizer.weight_decay == 1e-3
    with pytest.raises(ValueError, match="regression tasks only"):
        _trial(CLS, [], [f.HuberLoss()])


def test_clipping_bounds_every_update_per_trial() -> None:
    """Plain SGD with clip c: |update| <= lr * c per trial, whatever the other rows do."""
    trials = [_trial(REG, [f.InitScale(10.0)], [f.GradClip(max_norm=c)], SGD(lr=0.1))
              for c in (0.01, 0.1, 1e9)]
    traces = BatchedEngine().run(trials, torch.device("cpu"))
    for trace, c in zip(traces, (0.01, 0.1), strict=False):
        assert trace.update_norm.max() <= 0.1 * c * (1 + 1e-9)
    assert traces[2].update_norm.max() > 0.1 * 0.1  # unclipped row moves further


def test_missing_zero_grad_accumulates_gradients() -> None:
    trial = _trial(REG, [f.MissingZeroGrad()], [], SGD(lr=1e-9))
    (trace,) = BatchedEngine().run([trial], torch.device("cpu"))
    (plain,) = BatchedEngine().run([_trial(REG, [], [], SGD(lr=1e-9))], torch.device("cpu"))
    # with a negligible lr, the k-th accumulated norm grows like k x the per-step norm
    assert trace.grad_norm[10] > 4 * plain.grad_norm[10]


def test_lr_factors_equal_torch_schedulers() -> None:
    spe, total = 7, 70
    cases = [
        (LoopSpec(warmup_fraction=0.2, warmup_start_factor=0.1),
         lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=14)),
        (LoopSpec(step_epochs=2, step_gamma=0.5),
         lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=14, gamma=0.5)),
        (LoopSpec(cosine=True, cosine_min_factor=0.1),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=70, eta_min=0.03)),
    ]
    for loop, make in cases:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        sched = make(opt)
        for step in range(total):
            assert abs(opt.param_groups[0]["lr"] - 0.3 * loop.lr_factor(step, spe, total)) \
                < 1e-12
            opt.step()
            sched.step()


def test_plateau_matches_torch_reduce_lr_on_plateau() -> None:
    from study.failures.loop import Plateau

    values = [1.0, 0.9, 0.9, 0.95, 0.91, 0.5, 0.5, 0.5, 0.5, 0.49999, 0.4]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    ours = Plateau(0.5, 1, 1e-4)
    for v in values:
        torch_plateau.step(v)
        ours.update(v, 0.2 * ours.multiplier)
        assert abs(opt.param_groups[0]["lr"] - 0.2 * ours.multiplier) < 1e-12


# ------------------------------------------------------------------------ configuration
def test_failures_combine_and_sweep_as_an_axis() -> None:
    (point,) = plan_from_overrides(["failure=[outliers,unscaled]",
                                    "mitigation=[standardize_inputs,huber]",
                                    "failure.outliers.fraction=0.2"]).points
    trial = point.trial
    assert trial.labels["failure"] == "outliers+unscaled"
    assert [name for name, _ in trial.failures] == ["outliers", "unscaled"]
    assert trial.failures[0][1].fraction == 0.2
    assert trial.loop.loss == "huber"
    flat = trial.flat()
    assert flat["failure.outliers.fraction"] == 0.2 and flat["mitigation"] != ""
    with pytest.raises(ConfigError, match="regression tasks only"):
        plan_from_overrides(["task=blobs", "failure=outliers"])


def test_a_yaml_only_failure_mode_runs_in_a_sweep(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "failure" / "wild_targets.yaml").write_text(
        "# New failure mode, YAML only: existing transforms with new parameters.\n"
        "wild_outliers:\n  _target_: study.failures.TargetOutliers\n"
        "  fraction: 0.25\n  magnitude: 100.0\n"
        "wild_noise:\n  _target_: study.failures.LabelNoise\n  std: 2.0\n"
    )
    (conf / "sweep" / "tiny.yaml").write_text(
        "# @package _global_\nsweep:\n  name: tiny\n  seeds: [0, 1]\n  axes:\n"
        "    failure: [none, wild_targets, [wild_targets, unscaled]]\n"
        "  claims:\n    - {statement: wild targets hurt, metric: val_loss_final,\n"
        "       compare: {axis: failure, arm: wild_targets, baseline: none}, expect: higher}\n"
        "train:\n  epochs: 2\ntask:\n  n_train: 64\n  n_val: 32\n"
    )
    plan = plan_from_overrides(["+sweep=tiny"], conf_dir=conf)
    assert plan.axes["failure"] == ["none", "wild_targets", "wild_targets+unscaled"]
    assert len(plan.points) == 6
    traces = BatchedEngine().run([p.trial for p in plan.points], torch.device("cpu"))
    clean, wild = traces[0], traces[2]
    assert wild.train_loss[0] > 10 * clean.train_loss[0]
    assert np.isfinite(wild.val_loss).all()


def test_a_python_function_failure_mode(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "myfailures.py"
    package.write_text(
        "import dataclasses\n\n"
        "def flip_targets(data, generator, factor):\n"
        "    return dataclasses.replace(data, y_train=-factor * data.y_train)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "failure" / "flipped.yaml").write_text(
        "flipped:\n  _target_: myfailures.flip_targets\n  factor: 2.0\n")
    (point,) = plan_from_overrides(["failure=flipped"], conf_dir=conf).points
    data = f.trial_dataset(point.trial, 0)
    assert torch.equal(data.y_train, -2.0 * point.trial.task.generate(0).y_train)
    assert point.trial.flat()["failure.flipped.factor"] == 2.0


def test_adam_trials_with_a_plateau_keep_their_own_state() -> None:
    trials = [_trial(REG, [], [f.ReduceOnPlateau(factor=0.5, patience=0, threshold=0.9)],
                     Adam(lr=lr)) for lr in (1e-2, 1e-3)]
    together = BatchedEngine().run(trials, torch.device("cpu"))
    alone = [BatchedEngine().run([t], torch.device("cpu"))[0] for t in trials]
    for a, b in zip(together, alone, strict=True):
        assert a.equal(b)


@pytest.mark.parametrize("shift", [10, -1])
def test_a_failure_mode_that_puts_labels_out_of_range_is_refused_before_training(
        tmp_path: Path, monkeypatch, shift: int) -> None:
    # The batched CPU kernel indexed past the logits silently (a loss and an accuracy of
    # invalid labels); the reference engine raised IndexError mid-run.
    (tmp_path / "labelshift.py").write_text(
        "import dataclasses\n\n"
        "def shift(data, generator, by):\n"
        "    return dataclasses.replace(data, y_train=data.y_train + by)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "failure" / "shifted.yaml").write_text(
        f"shifted:\n  _target_: labelshift.shift\n  by: {shift}\n")
    plan = plan_from_overrides(["task=blobs", "task.n_classes=4", "failure=shifted"],
                               conf_dir=conf)
    low, high = (10, 13) if shift > 0 else (-1, 2)
    with pytest.raises(ConfigError) as err:
        preflight.check_data(plan)
    assert str(err.value).startswith(
        f"shifted+none: labelshift.shift returned invalid data: y_train holds class labels "
        f"{low}..{high}; the task has 4 classes, labelled 0..3 (applied to the data of task "
        f"blobs, seed ")
    # Every draw is checked, not only the one preflight draws: nothing trains on it.
    with pytest.raises(ValueError, match="y_train holds class labels"):
        f.trial_dataset(plan.points[0].trial, 12345)
