"""Small real networks and explicit activity matrices for the growth tests (float64 throughout)."""

from __future__ import annotations

import torch
from torch import nn

from tinydeploy.growth.statistics import gather_moments, with_ones
from tinydeploy.model.losses import per_sample_loss
from tinydeploy.model.build import build_model
from tinydeploy.model.spec import ArchSpec


def small_problem(activation: str = "relu", widths=(3, 4), n: int = 400, d: int = 6, classes: int = 5, seed: int = 0):
    """A float64 MLP on a random classification problem whose labels depend non-linearly on x."""
    torch.manual_seed(seed)
    spec = ArchSpec.mlp(task="classification", input_shape=(d,), hidden_widths=list(widths), n_outputs=classes,
                        activation=activation)
    model = build_model(spec).double()
    X = torch.randn(n, d, dtype=torch.float64)
    y = (X[:, :2].pow(2).sum(1) * 2 + X[:, 2]).long().clamp(0, classes - 1)
    return spec, model, X, y, per_sample_loss("classification")


def explicit_activities(model: nn.Sequential, X, y, loss_fn, i_in: int, i_out: int):
    """Paper-orientation matrices (one column per sample): B_prev (d+1, n), B_h (h+1, n), V_goal (o, n)."""
    b_prev, b_h, V = recorded_activities(model, X, y, loss_fn, i_in, i_out)
    return with_ones(b_prev).T, with_ones(b_h).T, V.T


def recorded_activities(model: nn.Sequential, X, y, loss_fn, i_in: int, i_out: int):
    """Inputs of modules ``i_in`` and ``i_out`` and V_goal = -d(sum of losses)/d(output of ``i_out``),
    as the model computes them (one sample per row, any shape), from one explicit autograd pass."""
    h, b_prev, b_h, a_out = X, None, None, None
    for index, module in enumerate(model):
        if index == i_in:
            b_prev = h.detach()
        if index == i_out:
            b_h = h.detach()
        h = module(h)
        if index == i_out:
            h.retain_grad()
            a_out = h
    model.zero_grad()
    loss_fn(h, y).sum().backward()
    return b_prev, b_h, -a_out.grad.detach()


def moments_for(model, X, y, loss_fn, layer: int = 0, chunk_size: int = 1024, seed: int = 0):
    """The gathered moments of the growable layer at module index ``layer``."""
    generator = torch.Generator().manual_seed(seed)
    growable = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)][:-1]
    moments = gather_moments(model, growable, X, y, loss_fn, chunk_size=chunk_size, generator=generator)
    return next(m for m in moments if m.in_index == layer)
