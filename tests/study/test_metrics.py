"""Metrics on hand-built traces whose answers are known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from study.engine.base import Trace
from study.metrics import objective_value, summarize, summarize_many
from study.metrics.arrays import nan_median
from study.metrics.shape import oscillation, spikes, steps_to_fraction, window_median
from study.metrics.status import end_level, final_blowup_step


def _trace(train_loss, *, step_loss=None, val_loss=None, divergence_step=None, floor=0.0,
           grad=None, every=10, **extra) -> Trace:
    train = np.asarray(train_loss, dtype=float)
    n_steps = every * (len(train) - 1)
    steps = np.asarray(step_loss if step_loss is not None else np.linspace(1, 0.1, n_steps))
    return Trace(
        step_loss=steps,
        grad_norm=np.asarray(grad if grad is not None else np.full(len(steps), 2.0)),
        eval_step=np.arange(len(train)) * every,
        train_loss=train,
        val_loss=np.asarray(val_loss if val_loss is not None else train, dtype=float),
        divergence_step=divergence_step, planned_steps=n_steps, irreducible_loss=floor,
        **{"train_acc": None, "val_acc": None, **extra},
    )


def test_monotone_decay_converges_without_oscillation_or_spikes() -> None:
    step_loss = 2.0 * 0.97 ** np.arange(100)
    row = summarize(_trace(2.0 * 0.97 ** np.arange(0, 101, 10), step_loss=step_loss))
    assert row["status"] == "converged"
    assert row["osc_tv_ratio"] == pytest.approx(1.0)
    assert row["up_step_fraction"] == 0.0
    assert row["spike_count"] == 0
    assert math.isnan(row["divergence_step"])
    assert row["grad_norm_max"] == 2.0 and row["grad_norm_growth"] == 0.0


def test_period_two_oscillation_has_autocorrelation_minus_one() -> None:
    k = np.arange(200)
    step_loss = np.where(k % 2 == 0, 1.0, 0.5) * 0.999 ** k
    out = oscillation(step_loss[None, :])
    assert out["loss_diff_autocorr"][0] == pytest.approx(-1.0, abs=0.01)
    assert out["up_step_fraction"][0] == pytest.approx(0.5, abs=0.01)
    assert out["osc_tv_ratio"][0] > 100  # huge variation for a small net decrease


def test_a_single_spike_is_counted_once_with_its_ratio() -> None:
    step_loss = np.exp(-0.01 * np.arange(200))
    step_loss[120] *= 10.0
    out = spikes(step_loss[None, :])
    assert out["spike_count"][0] == 1
    # The rolling median lags the descent by ~10 steps: ratio 10 x exp(-0.01 * 10.5).
    assert out["spike_max_ratio"][0] == pytest.approx(10 * math.exp(-0.105), rel=0.01)
    smooth = spikes(np.exp(-0.01 * np.arange(200))[None, :])
    assert smooth["spike_count"][0] == 0


@pytest.mark.parametrize("width", [1, 2, 5, 20])
def test_window_median_is_np_median_bit_for_bit(width: int) -> None:
    """The spike detector's medians: NaN anywhere in a window gives NaN, infinities and ties
    order as np.median orders them, and an even window's middle pair is averaged alike."""
    rng = np.random.default_rng(width)
    values = rng.choice([-np.inf, np.inf, np.nan, 0.0, 1.5, -2.25, 3.0], size=(6, 40),
                        p=[0.03, 0.03, 0.02, 0.1, 0.1, 0.1, 0.62])
    values = np.where(values == 3.0, rng.normal(size=values.shape), values)
    windows = np.lib.stride_tricks.sliding_window_view(values, width, axis=1)
    with np.errstate(invalid="ignore"):
        expected = np.median(windows, axis=2)
    got = window_median(windows)
    assert np.isnan(expected).any() and np.isfinite(expected).any()
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("width", [0, 1, 2, 7, 40])
def test_nan_median_is_np_nanmedian_bit_for_bit(width: int) -> None:
    """The medians of NaN-padded rows: NaN skipped, an all-NaN row NaN, infinities and ties
    ordered as np.nanmedian orders them, an even count's middle pair averaged alike."""
    rng = np.random.default_rng(width)
    values = rng.choice([-np.inf, np.inf, np.nan, 0.0, 1.5, -2.25, 3.0], size=(60, width),
                        p=[0.03, 0.03, 0.3, 0.05, 0.1, 0.1, 0.39])
    values = np.where(values == 3.0, rng.normal(size=values.shape), values)
    values[0] = np.nan
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        expected = np.nanmedian(values, axis=1) if width else np.full(60, np.nan)
    got = nan_median(values)
    assert np.isnan(got[0])
    assert got.tobytes() == expected.tobytes()


def test_plateau_then_drop_gives_known_step_counts() -> None:
    loss = np.array([[1.0, 1.0, 1.0, 1.0, 0.5, 0.2, 0.1]])
    steps = np.arange(7)[None, :] * 10
    assert steps_to_fraction(steps, loss, 0.5)[0] == 40  # 1 - 0.5 * 0.9 = 0.55 -> 0.5 at 40
    assert steps_to_fraction(steps, loss, 0.9)[0] == 60  # target 0.19 -> 0.1 at 60
    row = summarize(_trace(loss[0]))
    assert row["plateau_steps"] == 40 and row["steps_to_50pct"] == 40


def test_nan_at_step_17_is_diverged_at_17_and_final_loss_is_not_finite() -> None:
    step_loss = np.linspace(1.0, 0.5, 18)
    step_loss[17] = np.nan
    row = summarize(_trace([1.0, 0.8], step_loss=step_loss, divergence_step=17))
    assert row["status"] == "diverged" and row["divergence_step"] == 17
    # Measured: the loss did not stay finite to the end; never capped in a metric column.
    assert row["train_loss_final"] == math.inf == row["val_loss_final"]
    assert row["train_loss_best"] == 0.8
    assert row["steps"] == 17
    # Capping belongs to the objective alone.
    assert objective_value(row, "val_loss_final") == 1.0
    assert objective_value(row, "gen_gap") == math.inf  # undefined for a diverged trial


def test_run_that_ends_blown_up_is_diverged_at_the_first_eval_of_its_final_streak() -> None:
    loss = [1.0, 0.5, 20.0, 1e3, 1e6, 1e10]
    assert final_blowup_step(np.arange(6)[None, :] * 10, np.array([loss]))[0] == 20
    row = summarize(_trace(loss))
    assert (row["status"], row["divergence_step"]) == ("diverged", 20)
    assert row["val_loss_final"] == 1e10 and row["loss_blowup_max"] == 1e10
    assert objective_value(row, "val_loss_final") == 1.0
    # A blow-up in the middle that the run came back from is not the final streak.
    middle = [1.0, 20.0, 30.0, 40.0, 0.5, 15.0, 12.0, 11.0]
    assert final_blowup_step(np.arange(8)[None, :], np.array([middle]))[0] == 5


def test_catapult_that_comes_back_is_recovered_with_its_measured_final_loss() -> None:
    # Trial 341 of lr_batch (blobs, adam, lr 0.562): up 72x, then down below the start.
    loss = [1.42, 102.8, 62.4, 21.2, 5.5, 2.0, 1.1, 0.9, 0.8, 0.79, 0.78]
    row = summarize(_trace(loss))
    assert row["status"] == "recovered"
    assert math.isnan(row["divergence_step"])
    assert row["val_loss_final"] == 0.78 and row["train_loss_final"] == 0.78
    assert row["loss_blowup_max"] == pytest.approx(102.8 / 1.42)
    assert objective_value(row, "val_loss_final") == 0.78


def test_transient_spike_that_recovers_is_not_diverged() -> None:
    row = summarize(_trace([1.0, 0.5, 4.0, 30.0, 0.3, 0.1, 0.05, 0.04]))
    assert row["status"] == "recovered" and math.isnan(row["divergence_step"])
    # Rises below the blow-up factor: two of them make the run unstable.
    row = summarize(_trace([1.0, 0.5, 0.8, 0.4, 0.6, 0.1, 0.05, 0.04]))
    assert row["status"] == "unstable" and row["loss_blowup_max"] == 1.0


def test_run_that_ends_above_its_start_but_below_the_divergence_factor_made_no_progress(
        ) -> None:
    row = summarize(_trace([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert row["status"] == "no_progress" and math.isnan(row["divergence_step"])
    assert row["val_loss_final"] == 5.0


def test_status_is_judged_on_the_validation_loss_not_the_corrupted_training_loss() -> None:
    # Outliers in the training targets: the training loss falls (it fits them), the
    # validation loss rises: no progress on what the user cares about.
    row = summarize(_trace([10.0, 6.0, 4.0, 3.0], val_loss=[1.0, 1.8, 2.3, 2.51]))
    assert row["status"] == "no_progress"
    # The training loss stays flat near the corrupted optimum, the validation loss fell 10x.
    row = summarize(_trace([1e3, 1e3, 1e3, 1e3, 1e3], val_loss=[0.4, 0.1, 0.05, 0.04, 0.04]))
    assert row["status"] == "converged"
    assert row["excess_loss_final"] == pytest.approx(0.04)  # val_loss_final - floor


def test_one_spike_at_the_last_eval_does_not_decide_the_status() -> None:
    # Edge of stability: 0.513 -> about 0.045 for 1,500 evals, then one spike to 0.972.
    rng = np.random.default_rng(0)
    loss = np.concatenate([np.geomspace(0.513, 0.05, 100),
                           0.046 + 0.004 * rng.standard_normal(1400), [0.972]])
    assert end_level(loss[None, :])[0] == pytest.approx(0.046, abs=0.002)
    row = summarize(_trace(loss, every=1))
    assert row["status"] != "no_progress"
    assert row["val_loss_final"] == 0.972 and row["val_loss_end"] < 0.05


def test_noisy_regression_that_reaches_its_floor_after_a_one_percent_drop_converged() -> None:
    # Noise floor 0.99: the raw loss falls 1% (1.0 -> 0.9901) but the excess falls 99%.
    row = summarize(_trace([1.0, 0.995, 0.992, 0.9905, 0.9901], floor=0.99))
    assert row["status"] == "converged"
    assert row["excess_loss_final"] == pytest.approx(1e-4)
    # Without the floor the same curve made no progress.
    assert summarize(_trace([1.0, 0.995, 0.992, 0.9905, 0.9901]))["status"] == "no_progress"


def test_still_descending_far_from_floor_is_slow() -> None:
    assert summarize(_trace([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]))["status"] == "slow"
    # A tiny learning rate: 10% down in a straight line, still going: slow, not converged.
    assert summarize(_trace(np.linspace(1.0, 0.9, 21)))["status"] == "slow"
    # Flattened out far from the floor: settled, so converged (not slow).
    assert summarize(_trace([1.0, 0.6, 0.5, 0.5, 0.5, 0.5]))["status"] == "converged"


def test_update_and_layer_metrics_from_records() -> None:
    n = 30
    trace = _trace([1.0, 0.5, 0.3, 0.2], every=10,
                   grad_norm_first=np.full(n, 1e-3), grad_norm_last=np.full(n, 1.0),
                   update_norm=np.full(n, 0.01), param_norm=np.full(n, 10.0),
                   update_cosine=np.where(np.arange(n) == 0, np.nan, -0.9),
                   dead_fraction=np.array([0.0, 0.1, 0.2, 0.25]),
                   saturation_fraction=np.full(4, np.nan))
    row = summarize(trace)
    assert row["layer_grad_ratio_log10"] == pytest.approx(-3.0)
    assert row["update_param_ratio"] == pytest.approx(1e-3)
    assert row["update_cosine_mean"] == pytest.approx(-0.9)
    assert row["dead_relu_fraction"] == 0.25
    assert math.isnan(row["saturation_fraction"])


def test_batched_metrics_equal_per_trial_metrics() -> None:
    rng = np.random.default_rng(0)
    traces = []
    for i in range(6):
        n_evals = 4 + i
        evals = np.cumprod(rng.uniform(0.6, 1.3, n_evals))
        steps = np.cumprod(rng.uniform(0.8, 1.2, 10 * (n_evals - 1)))
        div = 7 if i == 2 else None
        traces.append(_trace(evals, step_loss=steps, divergence_step=div,
                             grad=rng.uniform(0.5, 3, len(steps))))
    together = summarize_many(traces)
    for trace, row in zip(traces, together, strict=True):
        alone = summarize(trace)
        assert alone.keys() == row.keys()
        for key, value in alone.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[key]), key
            else:
                assert row[key] == pytest.approx(value), key


def test_ten_percent_wiggles_near_the_floor_are_not_rises_but_real_rises_are() -> None:
    # Edge of stability near the floor: 0.050 <-> 0.056 after falling from 1.1 (floor 0.01).
    hover = [1.1, 0.3, 0.1, 0.05, 0.056, 0.05, 0.056, 0.05, 0.05]
    row = summarize(_trace(hover, floor=0.01))
    assert row["eval_rise_count"] == 0 and row["status"] == "converged"
    # The same relative rises from a higher level undo progress: they count.
    bumpy = [1.1, 0.3, 0.4, 0.2, 0.3, 0.15, 0.15, 0.15, 0.15]
    row = summarize(_trace(bumpy, floor=0.01))
    assert row["eval_rise_count"] == 2 and row["status"] == "unstable"


def test_tv_ratio_is_undefined_when_the_loss_barely_moved() -> None:
    # A run that does not learn (net decrease 1%) with small wiggles: the ratio over a
    # near-zero denominator would be ~100 and rank it as the most oscillatory.
    k = np.arange(200)
    flat = (1.0 + 0.005 * (k % 2)) * np.linspace(1.0, 0.99, 200)
    learning = np.geomspace(1.0, 0.5, 200)
    out = oscillation(np.stack([flat, learning]))
    assert math.isnan(out["osc_tv_ratio"][0])
    assert out["osc_tv_ratio"][1] == pytest.approx(1.0)


def test_oscillation_of_a_trial_with_no_finite_step_warns_nothing() -> None:
    import warnings

    rows = np.array([[np.nan, np.nan, np.nan], [1.0, 0.5, 0.25]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = oscillation(rows)
    assert math.isnan(out["loss_diff_autocorr"][0]) and math.isnan(out["osc_tv_ratio"][0])


@pytest.mark.parametrize("initial", [math.nan, 1.0])
def test_a_population_where_no_trial_took_a_step_is_summarized(initial: float) -> None:
    """Every trial stopped at its first evaluation (NaN in the data from the start: a loss
    that is not finite freezes it before its first step), so the step records have width
    0: each is summarized without a warning, with no steps and no oscillation."""
    def stopped() -> Trace:
        return Trace(step_loss=np.array([]), grad_norm=np.array([]), eval_step=np.array([0]),
                     train_loss=np.array([initial]), val_loss=np.array([initial]),
                     train_acc=None, val_acc=None,
                     divergence_step=None if math.isfinite(initial) else 0,
                     planned_steps=160, irreducible_loss=0.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = summarize_many([stopped(), stopped()])
    for row in rows:
        assert row["steps"] == 0 and math.isnan(row["osc_tv_ratio"])
        assert row["status"] == ("diverged" if math.isnan(initial) else "no_progress")
        assert row["divergence_step"] == 0 if math.isnan(initial) else math.isnan(
            row["divergence_step"])


def test_tv_ratio_reads_net_progress_between_robust_ends_not_noisy_endpoints() -> None:
    rng = np.random.default_rng(0)
    noise = rng.lognormal(0.0, 0.3, (2, 640))  # batch-8-like minibatch noise
    stuck = 1.0 * noise[0]
    stuck[0], stuck[-1] = 2.0, 0.4  # endpoints that alone suggest a 5x decrease
    learning = np.geomspace(1.0, 0.1, 640) * noise[1]
    out = oscillation(np.stack([stuck, learning]))
    assert math.isnan(out["osc_tv_ratio"][0])
    assert 10 < out["osc_tv_ratio"][1] < 200  # noise over a real 10x decrease


def test_a_loss_that_reaches_exactly_zero_warns_nothing() -> None:
    import warnings

    from study.metrics.shape import spikes

    rows = np.geomspace(1.0, 1e-3, 60)[None, :].repeat(2, axis=0)
    rows[0, 40:] = 0.0  # float32 cross-entropy underflows to 0 on separable data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        osc = oscillation(rows)
        spk = spikes(rows)
    assert spk["spike_count"][1] == 0 and spk["spike_count"][0] == 0
    assert np.isfinite(osc["up_step_fraction"]).all()


def test_ending_no_better_than_ignoring_the_inputs_is_no_progress() -> None:
    # Raw inputs in the thousands: the first logits are huge (initial CE 8.1); the network
    # settles on the class frequencies (B = 0.66 for a 63/37 split) and learns nothing else.
    settles = [8.1, 2.0, 0.9, 0.7, 0.67, 0.665, 0.662, 0.661, 0.66, 0.66, 0.66]
    row = summarize(_trace(settles, input_free_loss=0.66))
    assert row["status"] == "no_progress" and row["input_free_loss"] == 0.66
    # Without B only the initial loss counts: the same curve reads as converged.
    assert summarize(_trace(settles))["status"] == "converged"
    # Learning from x: well below B.
    learns = [8.1, 2.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.1, 0.1, 0.1]
    assert summarize(_trace(learns, input_free_loss=0.66))["status"] == "converged"
    # Pure-noise classes: the floor is log 4 exactly, B (the training split's class
    # frequencies on the validation split) fell below it by chance; the run ends above
    # both, at chance accuracy. Judged against L0 alone it read converged (the floor lies
    # just under its start); it learned nothing.
    noise = [1.3925, 1.3900, 1.3890, 1.3880, 1.3877]
    assert summarize(_trace(noise, floor=math.log(4), input_free_loss=1.3805)
                     )["status"] == "no_progress"


def test_a_floor_above_the_start_judges_the_run_against_its_start() -> None:
    """Pure-noise targets: the floor (the input-free loss of the validation split, an
    estimate) may lie above a start that happens to be lower. A run that dips and climbs back
    above its start learned nothing; one that ends clearly below its start did move."""
    floor, free = 1.0325, 1.0351
    dips = [1.01312, 1.01294, 1.01250, 1.01251, 1.01269, 1.01287, 1.01305, 1.01322, 1.01331]
    row = summarize(_trace(dips, floor=floor, input_free_loss=free))
    assert row["status"] == "no_progress"
    falls = [1.01312, 0.99, 0.97, 0.96, 0.955, 0.952, 0.951, 0.95, 0.95]
    assert summarize(_trace(falls, floor=floor, input_free_loss=free))["status"] == "converged"


def test_the_input_free_loss_is_the_targets_mean_or_class_frequencies() -> None:
    import torch

    from study.tasks.base import Dataset

    x = torch.zeros(4, 1, dtype=torch.float64)
    reg = Dataset(x, torch.tensor([[1.0], [3.0], [1.0], [3.0]]), x,
                  torch.tensor([[0.0], [2.0], [4.0], [2.0]]), "mse", 0.0)
    assert reg.input_free_loss() == pytest.approx((4 + 0 + 4 + 0) / 4)
    scaled = Dataset(x, reg.y_train, x, reg.y_val, "mse", 0.0,
                     target_scale=torch.tensor([10.0], dtype=torch.float64))
    assert scaled.input_free_loss() == pytest.approx(100 * 2.0)  # in original units
    cls = Dataset(x, torch.tensor([0, 0, 0, 1]), x, torch.tensor([0, 1, 1, 0]),
                  "cross_entropy", 0.0)
    assert cls.input_free_loss() == pytest.approx(-(2 * math.log(0.75) + 2 * math.log(0.25)) / 4)
    unseen = Dataset(x, torch.tensor([0, 0, 1, 1]), x, torch.tensor([0, 2, 1, 0]),
                     "cross_entropy", 0.0)
    assert unseen.input_free_loss() == math.inf


def test_a_pruned_trial_reads_pruned_unless_it_had_blown_up() -> None:
    """A cut curve does not say how the run would have ended: no_progress, slow or
    converged would each describe a run the pruner did not let finish."""
    flat = _trace([1.0, 1.0, 1.0])  # alone: no_progress
    falling = _trace([1.0, 0.5, 0.3])
    blown = _trace([1.0, 20.0, 30.0, 40.0])  # ended blown up before the pruner stopped it
    rows = summarize_many([flat, falling, blown, flat], pruned=[True, True, True, False])
    assert [r["status"] for r in rows] == ["pruned", "pruned", "diverged", "no_progress"]
    assert rows[0]["val_loss_final"] == 1.0 and math.isnan(rows[0]["divergence_step"])
    assert rows[2]["divergence_step"] == 10


def test_final_accuracy_is_read_at_the_last_eval_whose_loss_is_finite() -> None:
    """NaN logits still have an argmax: the accuracy of an eval with a non-finite loss is
    no measurement."""
    stopped = _trace([1.0, 0.8, np.nan], val_loss=[1.0, 0.7, np.nan], divergence_step=20,
                     train_acc=np.array([0.3, 0.5, 0.9]), val_acc=np.array([0.3, 0.6, 0.1]))
    never = _trace([np.inf, np.nan], divergence_step=0,
                   train_acc=np.array([0.3, 0.2]), val_acc=np.array([0.35, 0.2]))
    rows = summarize_many([stopped, never])
    assert rows[0]["val_acc_final"] == 0.6 and rows[0]["train_acc_final"] == 0.5
    assert math.isnan(rows[1]["val_acc_final"]) and math.isnan(rows[1]["train_acc_final"])


def test_a_step_whose_update_is_zero_has_no_update_angle() -> None:
    """cos(delta_k, delta_k-1) is 0/0 when either update is zero: the engines record 0
    there, which would read as orthogonal updates."""
    n = 5
    moving = _trace([1.0, 0.5], every=n, update_norm=np.array([1.0, 1.0, 0.0, 1.0, 1.0]),
                    update_cosine=np.array([np.nan, 0.5, 0.0, 0.0, 0.7]))
    frozen = _trace([1.0, 1.0], every=n, update_norm=np.zeros(n),
                    update_cosine=np.array([np.nan, 0.0, 0.0, 0.0, 0.0]))
    rows = summarize_many([moving, frozen])
    assert rows[0]["update_cosine_mean"] == pytest.approx(0.6)
    assert math.isnan(rows[1]["update_cosine_mean"])
