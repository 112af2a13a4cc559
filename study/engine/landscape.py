"""The loss landscape of each trial, batched over a population: sharpness (plain, and
preconditioned by an adaptive optimizer's diagonal P) and gradient noise scale (the opt-in
diagnostics of `DiagnosticsSpec`).

Both work on parameter rows in the population engine's layout (`network.Network`: one
[T, P] row per trial, each layer's weight as [fan_in, fan_out] then its bias) and on each
trial's own full training split, in float64 whatever the training dtype (they measure the
landscape; rounding should not blur them). Rows never interact: the Hessian of the summed
per-trial losses is block-diagonal, so one batched Hessian-vector product gives every
trial's own product.
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from study.engine.network import Network

Tensor = torch.Tensor


def trial_losses(net: Network, flat: Tensor, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """Mean loss [T] of each row of `flat` [T, P] on its own data `x` [T, N, d], `y`."""
    out, _ = net.forward(flat, x)
    if loss == "mse":
        return (out - y).square().mean(dim=(1, 2))
    logp = torch.log_softmax(out, dim=-1)
    return -logp.gather(-1, y[..., None]).squeeze(-1).mean(dim=1)


def _hvp(net: Network, flat: Tensor, x: Tensor, y: Tensor, loss: str):
    """A function v [T, P] -> H v [T, P] (each trial's own Hessian) at `flat`."""
    flat = flat.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(trial_losses(net, flat, x, y, loss).sum(), flat,
                               create_graph=True)

    def product(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True)
        return hv.detach()

    return product


def sharpness(net: Network, flat: Tensor, x: Tensor, y: Tensor, loss: str,
              iterations: int = 20, seeds: list[int] | None = None,
              preconditioner: Tensor | None = None) -> Tensor:
    """Top eigenvalue [T] of the Hessian of the full-batch training loss, per trial.

    Lanczos with full reorthogonalization, `iterations` Hessian-vector products from a
    random start drawn per trial from `seeds[t]` (default 0 for every row: a trial's value
    never depends on the other rows); the largest Ritz value. Exact once `iterations` reaches the
    number of parameters; on small MLPs 20 iterations land within 1e-4 relative of the
    dense eigenvalue (tests/study/engine/test_landscape.py), where 5 cold-start power
    iterations can read 30% low.

    `preconditioner` [T, P] (a diagonal P > 0 per row, `batched_optimizers.preconditioner`): the
    top eigenvalue of P^-1/2 H P^-1/2 instead, which is similar to P^-1 H (same eigenvalues,
    symmetric, so Lanczos applies): the preconditioned sharpness of Cohen et al. (2022).
    NaN for a row whose P is not finite and positive everywhere (no preconditioner: SGD,
    or before the first update).
    """
    flat = flat.detach().to(torch.float64)
    x = x.to(torch.float64)
    y = y if loss == "cross_entropy" else y.to(torch.float64)
    t, p = flat.shape
    k = min(iterations, p)
    hvp = _hvp(net, flat, x, y, loss)
    undefined = None
    if preconditioner is not None:
        preconditioner = preconditioner.to(device=flat.device, dtype=torch.float64)
        undefined = ~(torch.isfinite(preconditioner) & (preconditioner > 0)).all(dim=1)
        # P^-1/2 per row; an undefined row runs on the plain Hessian and reads NaN
        scale = torch.where(undefined[:, None], 1.0, preconditioner).rsqrt()
        plain = hvp

        def hvp(v: Tensor) -> Tensor:
            return scale * plain(scale * v)
    q = torch.stack([
        torch.randn(p, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in (seeds if seeds is not None else [0] * t)
    ]).to(flat.device)
    q = q / q.norm(dim=1, keepdim=True)
    basis = torch.zeros(t, k, p, dtype=torch.float64, device=flat.device)
    alpha = torch.zeros(t, k, dtype=torch.float64, device=flat.device)
    beta = torch.zeros(t, k, dtype=torch.float64, device=flat.device)
    for j in range(k):
        basis[:, j] = q
        w = hvp(q)
        alpha[:, j] = (w * q).sum(dim=1)
        # Full reorthogonalization against every basis vector so far (twice is enough).
        for _ in range(2):
            w = w - torch.einsum("tk,tkp->tp", torch.einsum("tkp,tp->tk", basis[:, :j + 1], w),
                                 basis[:, :j + 1])
        beta[:, j] = w.norm(dim=1)
        # A trial whose Krylov space is exhausted keeps q = 0 (adds a decoupled 0 Ritz value).
        q = torch.where(beta[:, j:j + 1] > 1e-12, w / beta[:, j:j + 1].clamp_min(1e-300),
                        torch.zeros_like(w))
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(
        beta[:, :-1], -1)
    top = torch.linalg.eigvalsh(tri)[:, -1]
    return top if undefined is None else top.masked_fill(undefined, float("nan"))


def gradient_noise_scale(net: Network, flat: Tensor, x: Tensor, y: Tensor, loss: str,
                         chunk_bytes: int = 256 * 2**20) -> Tensor:
    """B_simple = tr(Sigma) / |G|^2 [T] (McCandlish et al. 2018) from per-example gradients.

    G is the mean gradient over the given examples and tr(Sigma) = mean_i |g_i - G|^2 the
    trace of their covariance (1/N, the examples being the whole distribution here). Per-
    example gradients come from torch.func (vmap over examples and trials), computed in
    chunks of trials that fit `chunk_bytes`.
    """
    flat = flat.detach().to(torch.float64)
    x = x.to(torch.float64)
    y = y if loss == "cross_entropy" else y.to(torch.float64)
    t, n = x.shape[0], x.shape[1]

    def one(row: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return trial_losses(net, row[None], xi[None, None], yi[None, None], loss)[0]

    per_example = vmap(vmap(grad(one), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
    step = max(1, chunk_bytes // max(1, n * flat.shape[1] * 8))
    out = []
    for start in range(0, t, step):
        g = per_example(flat[start:start + step], x[start:start + step],
                        y[start:start + step])  # [t, N, P]
        mean = g.mean(dim=1)
        trace_sigma = (g - mean[:, None]).square().sum(dim=2).mean(dim=1)
        out.append(trace_sigma / mean.square().sum(dim=1))
    return torch.cat(out)
