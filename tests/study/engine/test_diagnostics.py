"""Diagnostics against exact answers: dense Hessians and explicit per-example gradients."""

from __future__ import annotations

import torch

from study.engine.diagnostics import gradient_noise_scale, sharpness, trial_losses
from study.engine.population import Network
from study.models import ModelSpec, init_parameters
from study.tasks import Blobs, LinearRegression

D = torch.float64


def _rows(spec: ModelSpec, d_in: int, d_out: int, seeds: list[int]) -> tuple[Network, torch.Tensor]:
    net = Network(tuple(spec.layer_sizes(d_in, d_out)), spec.activation)
    flat = torch.stack([net.flatten(init_parameters(spec, d_in, d_out,
                                                    torch.Generator().manual_seed(s)))
                        for s in seeds])
    return net, flat


def test_sharpness_of_linear_regression_is_the_top_eigenvalue_of_2_over_n_xtx() -> None:
    task = LinearRegression(dim=6, feature_scale=[1, 2, 0.5, 3, 1, 1], n_train=64)
    data = [task.generate(s) for s in (1, 2)]
    x = torch.stack([d.x_train for d in data])
    y = torch.stack([d.y_train for d in data])
    net, flat = _rows(ModelSpec(depth=0, activation="identity"), 6, 1, [0, 1])
    got = sharpness(net, flat, x, y, "mse", iterations=20)
    for i in range(2):
        xa = torch.cat([x[i], torch.ones(64, 1, dtype=D)], dim=1)  # bias column
        exact = torch.linalg.eigvalsh(2 / 64 * xa.T @ xa)[-1]
        assert abs(got[i] - exact) / exact < 1e-4


def test_sharpness_of_a_tiny_mlp_matches_the_dense_hessian() -> None:
    task = Blobs(dim=3, n_classes=3, n_train=40)
    data = task.generate(0)
    spec = ModelSpec(depth=2, width=5, activation="tanh", init="xavier")
    net, flat = _rows(spec, 3, 3, [3, 4, 5])
    x = data.x_train.expand(3, -1, -1)
    y = data.y_train.expand(3, -1)
    got = sharpness(net, flat, x, y, "cross_entropy", iterations=30)
    for i in range(3):
        def loss(row: torch.Tensor, i: int = i) -> torch.Tensor:
            return trial_losses(net, row[None], x[i:i + 1], y[i:i + 1], "cross_entropy")[0]

        hessian = torch.autograd.functional.hessian(loss, flat[i], vectorize=True)
        exact = torch.linalg.eigvalsh(hessian)[-1]
        assert abs(got[i] - exact) / abs(exact) < 1e-4, (got[i], exact)


def test_noise_scale_of_linear_regression_matches_explicit_per_example_gradients() -> None:
    data = LinearRegression(dim=4, n_train=50, noise=0.5).generate(3)
    net, flat = _rows(ModelSpec(depth=0, activation="identity"), 4, 1, [0, 1])
    x = data.x_train.expand(2, -1, -1)
    y = data.y_train.expand(2, -1, -1)
    got = gradient_noise_scale(net, flat, x, y, "mse")
    for i in range(2):
        w, b = flat[i, :4], flat[i, 4]
        residual = x[i] @ w + b - y[i, :, 0]  # [N]
        g = 2 * residual[:, None] * torch.cat([x[i], torch.ones(50, 1, dtype=D)], dim=1)
        mean = g.mean(0)
        exact = (g - mean).square().sum(1).mean() / mean.square().sum()
        assert abs(got[i] - exact) / exact < 1e-9
