"""Every failure mode and mitigation trains to the same numbers in both engines.

float64, max relative difference <= 1e-6 (the equivalence contract), trial by trial, with
several trials of different numbers in one population; per-trial state (clipping
thresholds, schedules, plateaus, early stopping, dropout masks) never leaks across rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import study.failures as f
from study.engine import BatchedEngine, ReferenceEngine
from study.failures import apply_transforms
from study.models import ModelSpec
from study.optimizers import SGD, Adagrad, Adam, AdamW, OptimizerSpec, RMSprop
from study.tasks import Blobs, TeacherMLP
from tests.study.engine.test_population import TOL, assert_equivalent

CPU = torch.device("cpu")
REGRESSION = TeacherMLP(n_train=64, n_val=48, width=8)
CLASSIFICATION = Blobs(n_train=64, n_val=48)


def _trial(task, failures=(), mitigations=(), optimizer=None, seed=0, model=None,
           batch_size=16, epochs=3):
    from study.trial import TrainSpec, TrialSpec

    base = TrialSpec(task, model or ModelSpec(depth=2, width=8), optimizer or SGD(lr=0.05),
                     TrainSpec(batch_size=batch_size, epochs=epochs, dtype="float64"), seed)
    return apply_transforms(base, [(type(t).__name__, t) for t in failures],
                            [(type(t).__name__, t) for t in mitigations])


def _check(trials, first=None):
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, CPU)
    for trial, g, w in zip(trials, got, want, strict=True):
        assert_equivalent(g, w, TOL[trial.train.dtype], first)
    return got, want


REGRESSION_CASES = {
    "outliers": ([f.TargetOutliers()], []),
    "outliers+standardize_targets": ([f.TargetOutliers()], [f.StandardizeTargets()]),
    "outliers+huber": ([f.TargetOutliers()], [f.HuberLoss(delta=0.5)]),
    "unscaled+standardize_inputs": ([f.UnscaledFeatures()], [f.StandardizeInputs()]),
    "label_noise": ([f.LabelNoise()], []),
    "input_outliers": ([f.InputOutliers(fraction=0.05, magnitude=10.0)], []),
    "mixed_units+standardize_inputs": ([f.MixedUnits(factor=10.0)], [f.StandardizeInputs()]),
    "target_scale+standardize_targets": ([f.TargetScale(factor=30.0, offset=100.0)],
                                         [f.StandardizeTargets()]),
    "pure_noise": ([f.PureNoiseTargets()], []),
    "unscaled_explicit": ([f.UnscaledFeatures(scales=[0.5] * 5 + [2.0] * 5)], []),
    "nan_features": ([f.NaNFeatures(fraction=0.02)], []),
    "nan_features+mean_impute": ([f.NaNFeatures(fraction=0.02)], [f.MeanImputation()]),
    "sorted": ([f.SortedByTarget()], []),
    "sorted+shuffle": ([f.SortedByTarget()], [f.Shuffling()]),
    "no_shuffle": ([f.NoShuffling()], []),
    "no_shuffle+shuffle": ([f.NoShuffling()], [f.Shuffling()]),
    "norm_mismatch": ([f.NormalizationMismatch()], []),
    "leakage": ([f.Leakage()], []),
    "zero_init": ([f.ZeroInit()], []),
    "large_init+clip": ([f.InitScale(10.0)], [f.GradClip(max_norm=0.5)]),
    "sigmoid_stack": ([f.SigmoidStack(depth=4)], []),
    "no_zero_grad": ([f.MissingZeroGrad()], []),
    "no_zero_grad+clip": ([f.MissingZeroGrad()], [f.GradClip(max_norm=1.0)]),
    "oversized_batch": ([f.OversizedBatch()], []),
    "warmup+cosine": ([], [f.Warmup(fraction=0.3), f.CosineDecay(min_factor=0.1)]),
    "step_lr+weight_decay": ([], [f.StepDecay(epochs=1, gamma=0.5), f.WeightDecay(1e-2)]),
    "plateau": ([], [f.ReduceOnPlateau(factor=0.5, patience=0, threshold=0.5)]),
    "first_layer_decay": ([f.LayerWeightDecay(0.05, (0,))], []),
    "last_layers_decay+step_lr": ([f.LayerWeightDecay(0.05, (1, 2))],
                                  [f.StepDecay(epochs=1, gamma=0.5)]),
    "early_stopping": ([], [f.EarlyStopping(patience=1)]),
    "dropout": ([], [f.Dropout(p=0.2)]),
    "dropout_at_eval": ([f.Dropout(p=0.5, at_eval=True)], []),
}


def _regression_trials(case: str) -> list:
    """Three trials of different learning rates and seeds with `case` applied."""
    failures, mitigations = REGRESSION_CASES[case]
    return [_trial(REGRESSION, failures, mitigations, SGD(lr=lr, momentum=0.5), seed=s)
            for s, lr in enumerate([0.05, 0.02, 0.1])]


@pytest.mark.parametrize("case", sorted(REGRESSION_CASES))
def test_regression_failures_and_mitigations_match_the_reference(case: str) -> None:
    _check(_regression_trials(case))


CLASSIFICATION_CASES = {
    "class_imbalance+class_weights": ([f.ClassImbalance(ratio=8.0)], [f.ClassWeightedLoss()]),
    "label_noise": ([f.LabelNoise(fraction=0.3)], []),
    "pure_noise": ([f.PureNoiseTargets()], []),
    "mse_classification": ([f.MSEForClassification()], []),
    "bce_by_hand": ([f.HandwrittenBCE()], []),
    "bce_by_hand+correct_loss": ([f.HandwrittenBCE()], [f.CorrectLoss()]),
    "absurd_lr": ([f.AbsurdLR()], []),
}


def _classification_trials(case: str) -> list:
    """Two Adam trials of different learning rates and seeds with `case` applied."""
    failures, mitigations = CLASSIFICATION_CASES[case]
    return [_trial(CLASSIFICATION, failures, mitigations, Adam(lr=lr), seed=s)
            for s, lr in enumerate([1e-2, 3e-3])]


@pytest.mark.parametrize("case", sorted(CLASSIFICATION_CASES))
def test_classification_failures_and_mitigations_match_the_reference(case: str) -> None:
    _check(_classification_trials(case), first=50 if case == "absurd_lr" else None)


@pytest.mark.parametrize("optimizer", [SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2),
                                       AdamW(lr=1e-2, weight_decay=0.1), RMSprop(lr=1e-3),
                                       Adagrad(lr=0.05, lr_decay=0.01)],
                         ids=lambda o: type(o).__name__)
def test_schedules_and_plateau_match_for_every_optimizer_family(optimizer) -> None:
    mitigations = [f.Warmup(fraction=0.2), f.StepDecay(epochs=1, gamma=0.5),
                   f.ReduceOnPlateau(factor=0.5, patience=0, threshold=0.5)]
    import dataclasses

    trials = [_trial(REGRESSION, [], mitigations, dataclasses.replace(optimizer, lr=lr), seed=s)
              for s, lr in enumerate([optimizer.lr, optimizer.lr / 2])]
    _check(trials)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(
    [("regression", c) for c in REGRESSION_CASES]
    + [("classification", c) for c in CLASSIFICATION_CASES]), ids="/".join)
def test_cuda_failures_and_mitigations_match_the_cpu_reference(case) -> None:
    """Every failure mode and mitigation on the GPU (dropout masks drawn on the host and
    copied once per layer, scheduled learning rates, clipping, plateaus, early stopping)
    against the reference engine on the CPU."""
    kind, name = case
    trials = (_regression_trials if kind == "regression" else _classification_trials)(name)
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, torch.device("cuda"))
    for trial, g, w in zip(trials, got, want, strict=True):
        assert_equivalent(g, w, TOL[trial.train.dtype], 50 if name == "absurd_lr" else None)


@pytest.mark.parametrize("optimizer", [SGD(lr=0.05, momentum=0.9, nesterov=True), Adam(lr=1e-2),
                                       AdamW(lr=1e-2), RMSprop(lr=1e-3, momentum=0.5),
                                       Adagrad(lr=0.05)],
                         ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_per_layer_weight_decay_matches_torch_param_groups(optimizer, dtype) -> None:
    """L2 on some layers only (torch param groups in the reference) for every family, with
    a warm-up so AdamW's decoupled factor follows a scheduled learning rate."""
    import dataclasses

    trials = [dataclasses.replace(
        _trial(REGRESSION, [f.LayerWeightDecay(0.1, layers)], [f.Warmup(fraction=0.3)],
               dataclasses.replace(optimizer, lr=lr), seed=s),
        train=dataclasses.replace(_trial(REGRESSION).train, dtype=dtype))
        for s, (lr, layers) in enumerate([(optimizer.lr, (0,)), (optimizer.lr / 2, (0,))])]
    _check(trials)


def test_per_layer_weight_decay_decays_only_the_chosen_weights() -> None:
    """The reference's param groups hold exactly the chosen layers' weights with the decay,
    and the engines' numbers differ from both no decay and decay on every parameter."""
    from study.engine.network import Network
    from study.engine.population import decay_mask
    from study.engine.reference import build_optimizer
    from study.models import build_module, init_parameters

    trial = _trial(REGRESSION, [f.LayerWeightDecay(0.5, (0, 2))], [], SGD(lr=0.05))
    params = init_parameters(trial.model, REGRESSION.input_dim, REGRESSION.output_dim,
                             torch.Generator().manual_seed(0))
    model = build_module(trial.model, params, torch.float64, CPU, torch.Generator())
    groups = build_optimizer(trial, model).param_groups
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [id(p) for p in groups[0]["params"]] == [id(linears[0].weight), id(linears[2].weight)]
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 4  # the middle weight and the three biases

    net = Network(tuple(trial.model.layer_sizes(REGRESSION.input_dim, REGRESSION.output_dim)),
                  "relu")
    mask = decay_mask(net, (0, 2))
    sizes = net.sizes
    assert int(mask.sum()) == sizes[0][0] * sizes[0][1] + sizes[2][0] * sizes[2][1]
    assert bool(mask[:sizes[0][0] * sizes[0][1]].all())

    plain = _trial(REGRESSION, [], [], SGD(lr=0.05))
    everywhere = _trial(REGRESSION, [], [f.WeightDecay(0.5)], SGD(lr=0.05))
    got = BatchedEngine().run([trial, plain, everywhere], CPU)
    assert not np.array_equal(got[0].val_loss, got[1].val_loss)
    assert not np.array_equal(got[0].val_loss, got[2].val_loss)


def test_per_layer_weight_decay_refuses_a_layer_the_model_lacks() -> None:
    with pytest.raises(ValueError, match="linear layer"):
        _trial(REGRESSION, [f.LayerWeightDecay(0.1, (3,))])
    with pytest.raises(ValueError, match="layer indices"):
        f.LayerWeightDecay(0.1, ())


def test_clipping_thresholds_and_early_stopping_are_per_trial() -> None:
    """Rows with different clipping thresholds and patience in one population train exactly
    as they do alone."""
    trials = [_trial(REGRESSION, [], [f.GradClip(max_norm=m), f.EarlyStopping(patience=p)],
                     SGD(lr=0.5), seed=s, epochs=10)
              for s, (m, p) in enumerate([(0.1, 1), (10.0, 2), (0.5, 5)])]
    got, want = _check(trials)
    alone = [BatchedEngine().run([t], CPU)[0] for t in trials]
    for g, a in zip(got, alone, strict=True):
        assert g.equal(a)
    assert any(len(w.step_loss) < w.planned_steps and w.divergence_step is None for w in want)


def test_a_module_edit_falls_back_to_the_reference_engine(caplog) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class LayerNormInput:
        def edit_module(self, module):
            return torch.nn.Sequential(torch.nn.LayerNorm(module[0].in_features,
                                                          dtype=module[0].weight.dtype),
                                       *module)

    trials = [_trial(REGRESSION, [LayerNormInput()], [], seed=0), _trial(REGRESSION, seed=1)]
    with caplog.at_level("WARNING"):
        got = BatchedEngine().run(trials, CPU)
    want = ReferenceEngine().run(trials, CPU)
    assert "fall back to the reference engine" in caplog.text
    assert got[0].equal(want[0])
    assert_equivalent(got[1], want[1], TOL["float64"])
    assert not np.allclose(got[0].step_loss, got[1].step_loss)


@dataclass(frozen=True)
class Adamax(OptimizerSpec):
    """A user's optimizer class: torch's Adamax, which the batched engine has no update for."""

    family: ClassVar[str] = "adamax"
    torch_class: ClassVar[type] = torch.optim.Adamax
    lr: float = 2e-3
    weight_decay: float = 0.0


@dataclass(frozen=True)
class MySGD(SGD):
    """A user's subclass of study's SGD (whose changes the batched update would not make)."""


def test_an_optimizer_with_no_batched_update_falls_back_to_the_reference_engine(
        caplog) -> None:
    """A user's optimizer class crashed the batched engine with "no batched optimizer"."""
    trials = [_trial(REGRESSION, optimizer=Adamax(lr=0.01), seed=0),
              _trial(REGRESSION, optimizer=MySGD(lr=0.05), seed=1),
              _trial(REGRESSION, optimizer=SGD(lr=0.05), seed=2)]
    with caplog.at_level("WARNING"):
        got = BatchedEngine().run(trials, CPU)
    want = ReferenceEngine().run(trials, CPU)
    assert "Adamax has no batched update" in caplog.text
    assert "MySGD has no batched update" in caplog.text
    assert got[0].equal(want[0]) and got[1].equal(want[1])
    assert_equivalent(got[2], want[2], TOL["float64"])
