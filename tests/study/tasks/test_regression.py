"""LinearRegression's feature options: what they add to the draw, and what they leave alone."""

from __future__ import annotations

import pytest
import torch

from study.tasks import LinearRegression


def test_feature_mean_shifts_the_features_and_leaves_targets_and_zero_mean_bit_identical(
) -> None:
    scales = [0.1, 1.0, 10.0, 3.0]
    base = LinearRegression(dim=4, feature_scale=scales, n_train=64, n_val=32).generate(5)
    zero = LinearRegression(dim=4, feature_scale=scales, feature_mean=0.0, n_train=64,
                            n_val=32).generate(5)
    means = [1.0, -2.0, 0.0, 5.0]
    shifted = LinearRegression(dim=4, feature_scale=scales, feature_mean=means, n_train=64,
                               n_val=32).generate(5)
    for name in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(zero, name), getattr(base, name)), name
    assert torch.equal(shifted.y_train, base.y_train) and torch.equal(shifted.y_val, base.y_val)
    torch.testing.assert_close(shifted.x_train - base.x_train,
                               torch.tensor(means, dtype=torch.float64).expand(64, -1),
                               rtol=0, atol=1e-12)
    one = LinearRegression(dim=4, feature_mean=1.0, n_train=64).generate(5)
    torch.testing.assert_close(one.x_train.mean(0), torch.ones(4, dtype=torch.float64),
                               rtol=0, atol=0.4)


@pytest.mark.parametrize("bad", [[1.0, 2.0], [0.0, float("nan"), 0.0]])
def test_feature_mean_of_the_wrong_length_or_not_finite_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="feature_mean"):
        LinearRegression(dim=3, feature_mean=bad)


def test_function_fit_trains_on_a_grid_of_the_fixed_function() -> None:
    from study.tasks import FunctionFit

    cheb = FunctionFit(function="chebyshev", order=4, n_train=9, n_val=50)
    data = cheb.generate(0)
    x = data.x_train[:, 0]
    assert torch.equal(x, torch.linspace(-1, 1, 9, dtype=torch.float64))
    assert torch.allclose(data.y_train[:, 0], 8 * x**4 - 8 * x**2 + 1, atol=1e-12)
    assert data.irreducible_loss == 0.0 and data.input_dim == 1
    other = cheb.generate(1)  # the seed draws the validation inputs, not the function
    assert torch.equal(other.x_train, data.x_train) and torch.equal(other.y_train, data.y_train)
    assert not torch.equal(other.x_val, data.x_val)
    assert data.x_val.abs().max() <= 1
    sine = FunctionFit(function="sine", order=2, noise=0.1, n_train=5).generate(0)
    clean = torch.sin(2 * torch.pi * sine.x_train)
    assert sine.irreducible_loss == pytest.approx(0.01)
    assert 0 < (sine.y_train - clean).abs().max() < 0.5  # the noise is added


@pytest.mark.parametrize("bad", [{"function": "cosine"}, {"order": -1}, {"n_train": 0}])
def test_a_bad_function_fit_is_refused(bad) -> None:
    from study.tasks import FunctionFit

    with pytest.raises(ValueError, match="task."):
        FunctionFit(**bad)
