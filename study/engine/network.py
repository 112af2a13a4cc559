"""The batched MLP of the population engine: flat parameter rows, forward and backward.

A population's parameters are one [T, P] tensor: row t is trial t, each layer stored as its
weight, then its bias. A layer is one `baddbmm` over the trial axis. A weight is stored
[fan_in, fan_out] (torch's weight transposed) unless its layer narrows (fan_out < fan_in, as
an output layer of one or a few units does), which is stored [fan_out, fan_in] as torch
stores it: MKL's batched products over a narrow layer in the other layout take 4-10x longer
(measured for the forward, weight-gradient and input-gradient products of a 64 -> 1 layer at
batch 8, 256 and 512; docs/performance.md).

The backward pass is written out by hand with the aten backward kernels autograd itself calls
for these modules and losses, so a row's gradient is the gradient torch computes for that
trial alone (to the rounding of the matrix products).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
aten = torch.ops.aten

# activation -> (forward, backward(grad, pre_activation, post_activation)); the backward
# kernels are the ones autograd calls for the nn modules (torch defaults: leaky slope 0.01,
# ELU alpha 1, exact GELU).
ACTIVATIONS = {
    "relu": (torch.relu, lambda g, z, a: aten.threshold_backward(g, a, 0)),
    "leaky_relu": (F.leaky_relu, lambda g, z, a: aten.leaky_relu_backward(g, z, 0.01, False)),
    "elu": (F.elu, lambda g, z, a: aten.elu_backward(g, 1.0, 1, 1, False, z)),
    "silu": (F.silu, lambda g, z, a: aten.silu_backward(g, z)),
    "gelu": (F.gelu, lambda g, z, a: aten.gelu_backward(g, z)),
    "tanh": (torch.tanh, lambda g, z, a: aten.tanh_backward(g, a)),
    "sigmoid": (torch.sigmoid, lambda g, z, a: aten.sigmoid_backward(g, a)),
    "identity": (None, None),
}


# The same activations applied in place (evaluation keeps no pre-activation).
IN_PLACE = {
    "relu": torch.relu_,
    "leaky_relu": lambda z: F.leaky_relu(z, inplace=True),
    "elu": lambda z: F.elu(z, inplace=True),
    "silu": lambda z: F.silu(z, inplace=True),
    "gelu": lambda z: z.copy_(F.gelu(z)),
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
    "identity": lambda z: z,
}


# Activations whose backward reads only the activation: the forward applies them in place
# (the pre-activation is not kept), which saves a pass over [T, B, width] per layer.
FROM_OUTPUT = frozenset({"relu", "tanh", "sigmoid"})


@dataclass(frozen=True)
class Network:
    """Layer layout of the flat [T, P] parameter rows, with batched forward and backward."""

    sizes: tuple[tuple[int, int], ...]  # (fan_in, fan_out) per layer
    activation: str

    @property
    def n_params(self) -> int:
        return sum(fi * fo + fo for fi, fo in self.sizes)

    @cached_property  # read per layer per step; the instance is frozen
    def narrowing(self) -> tuple[bool, ...]:
        """Per layer: is its weight stored [fan_out, fan_in] (torch's layout)?"""
        return tuple(fo < fi for fi, fo in self.sizes)

    def layers(self, flat: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Views (weight [T, fan_in, fan_out], bias [T, 1, fan_out]) into `flat` [T, P].

        A narrowing layer's weight view is the transpose of its [T, fan_out, fan_in] storage.
        """
        out, offset = [], 0
        for (fi, fo), narrow in zip(self.sizes, self.narrowing, strict=True):
            block = flat[:, offset:offset + fi * fo]
            w = block.view(-1, fo, fi).mT if narrow else block.view(-1, fi, fo)
            offset += fi * fo
            out.append((w, flat[:, None, offset:offset + fo]))
            offset += fo
        return out

    def part_views(self, blocks: Tensor, rows: int) -> list[Tensor]:
        """Contiguous [rows, n] views, one per weight and bias in storage order, laid one
        after another in the flat buffer `blocks` (rows x n_params elements)."""
        views, start = [], 0
        for fi, fo in self.sizes:
            for n in (fi * fo, fo):
                views.append(blocks[start:start + rows * n].view(rows, n))
                start += rows * n
        return views

    def flatten(self, parameters: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One trial's `init_parameters` (weight [fan_out, fan_in], bias) as a flat row."""
        return torch.cat([t for (w, b), narrow in zip(parameters, self.narrowing, strict=True)
                          for t in (w.reshape(-1) if narrow else w.T.reshape(-1), b)])

    def forward(self, flat: Tensor, x: Tensor, layers: list | None = None,
                masks: list[Tensor] | None = None, inspect=None) -> tuple[Tensor, list]:
        """Outputs [T, B, out] for inputs [T, B, in], and what the backward pass needs:
        per layer (input, pre-activation, activation); the pre-activation is the activation
        itself where the backward does not read it (`FROM_OUTPUT`).

        `layers`: `self.layers(flat)`, when the caller keeps them. `masks`: dropout, one
        scaled mask [T, B, width] per hidden layer, multiplied into its activation.
        `inspect(z)` sees each hidden layer's pre-activation first.
        """
        act = ACTIVATIONS[self.activation][0]
        if self.activation in FROM_OUTPUT:
            act = IN_PLACE[self.activation]
        saved, h = [], x
        layers = self.layers(flat) if layers is None else layers
        for i, (w, b) in enumerate(layers):
            z = torch.baddbmm(b, h, w)
            if inspect is not None and i < len(layers) - 1:
                inspect(z)
            a = z if act is None or i == len(layers) - 1 else act(z)
            saved.append((h, z, a))
            h = a if masks is None or i == len(layers) - 1 else a * masks[i]
        return h, saved

    def evaluate(self, flat: Tensor, x: Tensor, buffers: list[Tensor], inspect=None,
                 layers: list | None = None, masks: list[Tensor] | None = None) -> Tensor:
        """Outputs [T, N, out] of a forward pass that keeps nothing for a backward pass.

        Layer i writes into `buffers[i]` ([T, N, fan_out], reused from call to call: large
        fresh tensors cost page faults on the CPU) and applies its activation in place;
        `inspect(z)` sees each hidden layer's pre-activation first.
        """
        act = IN_PLACE[self.activation]
        h = x
        layers = self.layers(flat) if layers is None else layers
        for i, (w, b) in enumerate(layers):
            z = torch.baddbmm(b, h, w, out=buffers[i])
            if i < len(layers) - 1:
                if inspect is not None:
                    inspect(z)
                z = act(z)
                if masks is not None:
                    z = z.mul_(masks[i])
            h = z
        return h

    def backward(self, flat: Tensor, saved: list, grad_out: Tensor,
                 out: Tensor | None = None, layers: list | None = None,
                 masks: list[Tensor] | None = None) -> Tensor:
        """Gradient rows [T, P] (into `out` when given) from the outputs' gradient [T, B, out].

        `masks`: the dropout masks of the forward pass."""
        parts = self.backward_parts(flat, saved, grad_out, layers, masks)
        return torch.cat(parts, dim=1, out=out)

    def backward_parts(self, flat: Tensor, saved: list, grad_out: Tensor,
                       layers: list | None = None, masks: list[Tensor] | None = None,
                       out: list[Tensor] | None = None) -> list[Tensor]:
        """The gradient rows as contiguous [T, n] blocks, one per weight and bias in storage
        order (`backward` concatenates them; the fused update reads them as they are).

        `out`: contiguous [T, n] buffers to write the blocks into (see `part_views`)."""
        act_backward = ACTIVATIONS[self.activation][1]
        layers = self.layers(flat) if layers is None else layers
        parts: list[Tensor] = []
        g = grad_out
        for i in range(len(layers) - 1, -1, -1):
            h, _, _ = saved[i]
            narrow = self.narrowing[i]
            w_out = b_out = None
            if out is not None:
                b_out = out[2 * i + 1]
                fi, fo = self.sizes[i]
                w_out = out[2 * i].view(-1, fo, fi) if narrow else out[2 * i].view(-1, fi, fo)
            parts.append(torch.sum(g, 1, out=b_out))
            # The weight gradient in the weight's storage layout: g^T h or h^T g.
            weight = (torch.bmm(g.mT, h, out=w_out) if narrow
                      else torch.bmm(h.mT, g, out=w_out))
            parts.append(weight.flatten(1))
            if i > 0:
                w_t = layers[i][0].mT  # [T, fan_out, fan_in]; contiguous when narrowing
                # One output unit: the product has a single term, an exact multiply.
                g = g * w_t if w_t.shape[1] == 1 else torch.bmm(g, w_t)
                if masks is not None:
                    g = g * masks[i - 1]
                if act_backward is not None:
                    _, z, a = saved[i - 1]
                    g = act_backward(g, z, a)
        return parts[::-1]


def loss_and_grad(out: Tensor, y: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Per-trial mean loss [T] over the batch and its gradient wrt `out` [T, B, C].

    Mirrors `F.cross_entropy` (log_softmax + nll) and `F.mse_loss` with mean reduction, and
    the backward kernels autograd uses for them, trial by trial.
    """
    batch = out.shape[1]
    if loss == "mse":
        diff = out - y
        return diff.square().mean(dim=(1, 2)), diff * (2.0 / diff[0].numel())
    # Classes along dim 1 ([T, C, B]): torch's kernels reduce over a last dim of a few classes
    # one row at a time, 5-10x slower than across the batch; the values are bit-identical.
    logp = torch.log_softmax(out.mT.contiguous(), dim=1)
    target = y[:, None, :]
    value = -logp.gather(1, target).sum(dim=(1, 2)) / batch
    grad_logp = torch.zeros_like(logp).scatter_(1, target, -1.0 / batch)
    return value, aten._log_softmax_backward_data(grad_logp, logp, 1, logp.dtype).mT


def train_loss_and_grad(out: Tensor, y: Tensor, loss: str, objective: str = "task",
                        huber_delta: float = 1.0, class_weights: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """The training objective of `LoopSpec.loss` [T] and its gradient wrt `out` [T, B, C].

    Mirrors, trial by trial, what autograd computes for the reference engine's expression of
    each objective (study/engine/reference.py `training_loss`).
    """
    if objective == "task":
        return loss_and_grad(out, y, loss)
    n = out[0].numel()
    if objective == "huber":
        value = F.huber_loss(out, y, reduction="none", delta=huber_delta).mean(dim=(1, 2))
        scale = torch.full_like(out, 1.0 / n)
        return value, aten.huber_loss_backward(scale, out, y, 0, huber_delta)
    if objective == "weighted_cross_entropy":
        logp = torch.log_softmax(out, dim=-1)
        target = y[..., None]
        w = class_weights.gather(1, y)  # [T, B]
        total = w.sum(dim=1, keepdim=True)
        value = -(logp.gather(-1, target).squeeze(-1) * w).sum(dim=1) / total.squeeze(1)
        grad_logp = torch.zeros_like(logp).scatter_(-1, target, (-w / total)[..., None])
        return value, aten._log_softmax_backward_data(grad_logp, logp, -1, logp.dtype)
    onehot = F.one_hot(y, out.shape[-1]).to(out.dtype)
    if objective == "mse_onehot":
        diff = out - onehot
        return diff.square().mean(dim=(1, 2)), diff * (2.0 / n)
    if objective == "bce_raw":
        value = -(onehot * torch.log(out) + (1 - onehot) * torch.log(1 - out)).mean(dim=(1, 2))
        grad = -(onehot / out - (1 - onehot) / (1 - out)) / n
        return value, grad
    raise ValueError(f"unknown training objective {objective!r}")


def eval_losses(out: Tensor, y: Tensor, loss: str, n_train: int,
                target_scale: Tensor | None = None) -> tuple[Tensor, ...]:
    """(train loss, val loss, train acc, val acc) [T] for outputs over train + val rows.

    `target_scale` [T, 1, C]: regression losses in the original target units."""
    if loss == "mse":
        err = (out - y) if target_scale is None else (out - y) * target_scale
        err = err.square()
        return err[:, :n_train].mean(dim=(1, 2)), err[:, n_train:].mean(dim=(1, 2)), None, None
    logits = out.mT.contiguous()  # [T, C, N]: see loss_and_grad
    nll = -torch.log_softmax(logits, dim=1).gather(1, y[:, None, :]).squeeze(1)
    hit = (out.argmax(dim=-1) == y).to(torch.float64)  # (argmax over dim 1 is the slow one)
    return (nll[:, :n_train].mean(1), nll[:, n_train:].mean(1),
            hit[:, :n_train].mean(1), hit[:, n_train:].mean(1))
