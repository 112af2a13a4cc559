"""Failure modes and mitigations: transforms of a trial's data, model and loop.

Referenced by `_target_` from conf/failure/ and conf/mitigation/ (one YAML per option, each
holding one or more named entries). A trial may carry several: `failure=[outliers,unscaled]`.
How they apply: `study.failures.base`; what each does: its class docstring; docs/failures.md.
"""

from study.failures.base import (
    FunctionTransform,
    apply_data_transforms,
    apply_transforms,
    transform_generator,
    trial_dataset,
)
from study.failures.data import (
    ClassImbalance,
    InputOutliers,
    LabelNoise,
    Leakage,
    MeanImputation,
    MixedUnits,
    NaNFeatures,
    NormalizationMismatch,
    PureNoiseTargets,
    SortedByTarget,
    StandardizeInputs,
    StandardizeTargets,
    TargetOutliers,
    TargetScale,
    UnscaledFeatures,
)
from study.failures.loop import (
    AbsurdLR,
    ClassWeightedLoss,
    CorrectLoss,
    CosineDecay,
    EarlyStopping,
    GradClip,
    HandwrittenBCE,
    HuberLoss,
    LayerWeightDecay,
    MissingZeroGrad,
    MSEForClassification,
    NoShuffling,
    OversizedBatch,
    ReduceOnPlateau,
    Shuffling,
    StepDecay,
    Warmup,
    WeightDecay,
)
from study.failures.model import Dropout, InitScale, SigmoidStack, ZeroInit

__all__ = [
    "AbsurdLR", "ClassImbalance", "ClassWeightedLoss", "CorrectLoss", "CosineDecay", "Dropout",
    "EarlyStopping", "FunctionTransform", "GradClip", "HandwrittenBCE", "HuberLoss", "InitScale",
    "InputOutliers", "LabelNoise", "LayerWeightDecay", "Leakage", "MSEForClassification",
    "MeanImputation",
    "MissingZeroGrad", "MixedUnits", "NaNFeatures", "NoShuffling", "NormalizationMismatch",
    "OversizedBatch", "PureNoiseTargets", "ReduceOnPlateau", "Shuffling", "SigmoidStack",
    "SortedByTarget", "StandardizeInputs", "StandardizeTargets", "StepDecay", "TargetOutliers",
    "TargetScale", "UnscaledFeatures", "Warmup", "WeightDecay", "ZeroInit",
    "apply_data_transforms", "apply_transforms", "transform_generator", "trial_dataset",
]
