"""Diagnostics against exact answers: dense Hessians and explicit per-example gradients."""

from __future__ import annotations

import torch

from study.engine.landscape import gradient_noise_scale, sharpness, trial_losses
from study.engine.population import Network
from study.models import ModelSpec, init_parameters
from study.tasks import Blobs, LinearRegression, TeacherMLP

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


def test_preconditioned_sharpness_of_a_tiny_mlp_matches_dense_p_inverse_h() -> None:
    """lambda_max(P^-1 H) from the dense Hessian (eigenvalues of the non-symmetric P^-1 H)
    against Lanczos on P^-1/2 H P^-1/2; P spanning four decades, as Adam's does. A row whose
    P is undefined (NaN, or not positive) reads NaN and leaves the others alone."""
    task = TeacherMLP(dim=3, n_train=40, width=4)
    data = task.generate(0)
    spec = ModelSpec(depth=2, width=5, activation="tanh")
    net, flat = _rows(spec, 3, 1, [3, 4, 5, 6])
    x = data.x_train.expand(4, -1, -1)
    y = data.y_train.expand(4, -1, -1)
    n = flat.shape[1]
    g = torch.Generator().manual_seed(7)
    p = 10 ** (4 * torch.rand(4, n, generator=g, dtype=D) - 2)
    p[2, 5] = float("nan")
    p[3, 0] = 0.0
    got = sharpness(net, flat, x, y, "mse", iterations=n, preconditioner=p)
    plain = sharpness(net, flat, x, y, "mse", iterations=n)
    for i in range(2):
        def loss(row: torch.Tensor, i: int = i) -> torch.Tensor:
            return trial_losses(net, row[None], x[i:i + 1], y[i:i + 1], "mse")[0]

        hessian = torch.autograd.functional.hessian(loss, flat[i], vectorize=True)
        exact = torch.linalg.eigvals(hessian / p[i][:, None]).real.max()
        assert abs(got[i] - exact) / abs(exact) < 1e-8, (got[i], exact)
        assert abs(got[i] - plain[i]) / plain[i] > 0.1  # P matters
    assert torch.isnan(got[2:]).all()
    alone = sharpness(net, flat[:2], x[:2], y[:2], "mse", iterations=n, preconditioner=p[:2])
    torch.testing.assert_close(alone, got[:2], rtol=1e-12, atol=0)
