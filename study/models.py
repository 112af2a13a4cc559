"""Model specs and their deterministic initialization.

`ModelSpec` is what conf/model/*.yaml instantiates. `init_parameters` draws a trial's
initial weights from its init generator; both engines start from exactly these tensors (the
reference engine copies them into `nn.Linear` layers, the population engine stacks them
along a trial axis), so the engines differ only in how they train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

INITS = ("default", "xavier", "he", "zero", "normal")


@dataclass(frozen=True)
class ModelSpec:
    """A fully connected network: `depth` hidden layers of `width` units, then a linear head.

    `depth=0` is a linear model. `init` picks the weight scheme:

    - `default`: torch's `nn.Linear` default (kaiming-uniform a=sqrt(5), uniform bias);
    - `xavier`: Glorot normal, gain of `activation`, zero bias;
    - `he`: Kaiming normal fan-in, gain of `activation` (relu gain for relu-like), zero bias;
    - `zero`: every weight and bias 0 (a failure mode: symmetric units never separate);
    - `normal`: N(0, init_scale^2) weights, zero bias.

    For every scheme but `normal`, the drawn weights are multiplied by `init_scale`, so
    `init_scale` sweeps "too small" and "too large" init around any scheme.

    `dropout`: probability of zeroing each hidden activation during training (inverted
    dropout, masks drawn from the trial's dropout stream); `dropout_at_eval` keeps it on
    during evaluation too (the `model.train()` left on failure).
    """

    depth: int = 2
    width: int = 64
    activation: str = "relu"
    init: str = "default"
    init_scale: float = 1.0
    dropout: float = 0.0
    dropout_at_eval: bool = False

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise ValueError(f"model.depth must be >= 0, got {self.depth}")
        if self.depth > 0 and self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.init not in INITS:
            raise ValueError(f"model.init must be one of {list(INITS)}, got {self.init!r}")
        if not self.init_scale >= 0:
            raise ValueError(f"model.init_scale must be >= 0, got {self.init_scale}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def layer_sizes(self, input_dim: int, output_dim: int) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each linear layer, input to output."""
        sizes = [input_dim] + [self.width] * self.depth + [output_dim]
        return list(zip(sizes[:-1], sizes[1:], strict=True))


def _gain(activation: str) -> float:
    name = {"identity": "linear", "gelu": "relu", "silu": "relu", "elu": "relu"}.get(
        activation, activation
    )
    return nn.init.calculate_gain(name)


def init_parameters(
    spec: ModelSpec, input_dim: int, output_dim: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Draw (weight [fan_out, fan_in], bias [fan_out]) per layer, float64 on the CPU.

    Draws happen in layer order, weight before bias, from `generator` only (no global RNG),
    so the same init seed gives bit-identical parameters on every device and dtype.
    """
    layers = []
    for fan_in, fan_out in spec.layer_sizes(input_dim, output_dim):
        w = torch.empty(fan_out, fan_in, dtype=torch.float64)
        b = torch.zeros(fan_out, dtype=torch.float64)
        if spec.init == "default":
            # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)), then the bias, with
            # torch's own float arithmetic for the bounds (its wrappers cost ~0.1 ms a call,
            # a tenth of a population's set-up).
            gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
            w.uniform_(-math.sqrt(3.0) * (gain / math.sqrt(fan_in)),
                       math.sqrt(3.0) * (gain / math.sqrt(fan_in)), generator=generator)
            bound = 1 / math.sqrt(fan_in)
            b.uniform_(-bound, bound, generator=generator)
        elif spec.init == "xavier":
            nn.init.xavier_normal_(w, gain=_gain(spec.activation), generator=generator)
        elif spec.init == "he":
            std = _gain(spec.activation) / math.sqrt(fan_in)
            nn.init.normal_(w, 0.0, std, generator=generator)
        elif spec.init == "zero":
            w.zero_()
        else:  # normal
            nn.init.normal_(w, 0.0, spec.init_scale, generator=generator)
        if spec.init != "normal":
            w.mul_(spec.init_scale)
        layers.append((w, b))
    return layers


def dropout_seed(seed: int) -> int:
    """The dropout stream of trial seed `seed` (independent of its data, init and order)."""
    state = np.random.SeedSequence(seed, spawn_key=(3,)).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def dropout_mask(shape: tuple[int, ...], p: float, generator: torch.Generator,
                 dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An inverted-dropout mask: 1 / (1 - p) where kept, 0 where dropped.

    Drawn as `torch.rand(shape) >= p` in float64 on the CPU from `generator`, so both
    engines draw the very same masks in the same order."""
    keep = torch.rand(shape, generator=generator, dtype=torch.float64) >= p
    return keep.to(device=device, dtype=dtype) * (1.0 / (1.0 - p))


class SeededDropout(nn.Module):
    """`nn.Dropout` whose masks come from a given generator (no global RNG)."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * dropout_mask(tuple(x.shape), self.p, self.generator, x.dtype, x.device)


def build_module(
    spec: ModelSpec, parameters: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype, device: torch.device | str,
    dropout: torch.Generator | None = None,
) -> nn.Sequential:
    """The plain `nn.Sequential` a user would write, holding copies of `parameters`.

    With `spec.dropout > 0`, a `SeededDropout` drawing from `dropout` follows every hidden
    activation."""
    modules: list[nn.Module] = []
    for i, (w, b) in enumerate(parameters):
        # skip_init: no draw from the global RNG; the weights come from `parameters`.
        linear = skip_init(nn.Linear, w.shape[1], w.shape[0], dtype=dtype, device=device)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        modules.append(linear)
        if i < len(parameters) - 1:
            modules.append(ACTIVATIONS[spec.activation]())
            if spec.dropout > 0:
                if dropout is None:
                    raise ValueError("a model with dropout needs a dropout generator")
                modules.append(SeededDropout(spec.dropout, dropout))
    return nn.Sequential(*modules)


RELU_FAMILY = ("relu", "leaky_relu")
# |z| beyond which sigmoid is within 0.01 of 0 or 1, and tanh within 0.01 of -1 or 1.
SATURATION_Z = {"sigmoid": 4.59512, "tanh": 2.64665}
PROBE_SIZE = 256


def activation_stats(pre_activations: list[torch.Tensor], activation: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead fraction, saturation fraction) of hidden units on a probe batch.

    `pre_activations` holds each hidden layer's pre-activation z, shaped [..., B, width]
    (B = probe examples; leading dims, e.g. a trial axis, are kept). Dead: the share of
    hidden units with z <= 0 on every probe example (relu family only). Saturated: the share
    of (example, unit) entries with |z| beyond `SATURATION_Z` (sigmoid, tanh only). NaN
    where undefined (other activations, or no hidden layer).
    """
    if not pre_activations:
        return torch.tensor(float("nan")), torch.tensor(float("nan"))
    z = torch.cat(pre_activations, dim=-1)  # [..., B, units]
    nan = torch.full(z.shape[:-2], float("nan"), dtype=torch.float64, device=z.device)
    dead = ((z <= 0).all(dim=-2).to(torch.float64).mean(dim=-1)
            if activation in RELU_FAMILY else nan)
    saturated = ((z.abs() > SATURATION_Z[activation]).to(torch.float64).mean(dim=(-2, -1))
                 if activation in SATURATION_Z else nan)
    return dead, saturated
