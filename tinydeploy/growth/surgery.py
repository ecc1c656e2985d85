"""Model surgery: (model, neurons) -> wider model, and optimizer state carried over to it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from tinydeploy.growth.candidates import Candidate


def add_neurons(model: nn.Sequential, candidate: Candidate, gamma: float) -> nn.Sequential:
    """A copy of ``model`` with the candidate's neurons added at amplitude ``gamma``.

    Adds (s sqrt|g| alpha_k) as new rows of linear ``in_index`` (bias last in alpha), (s sqrt|g| omega_k)
    as new columns of linear ``out_index``, and g dW* to the existing weights of ``out_index``.
    With gamma = 0 the function is unchanged (new fan-in and fan-out are 0).
    """
    grown = copy.deepcopy(model)
    layer_in: nn.Linear = grown[candidate.in_index]
    layer_out: nn.Linear = grown[candidate.out_index]
    scale = math.copysign(math.sqrt(abs(gamma)), gamma)
    dtype, device = layer_in.weight.dtype, layer_in.weight.device
    alpha = (scale * candidate.alpha).to(dtype=dtype, device=device)
    omega = (scale * candidate.omega).to(dtype=dtype, device=device)
    new_in = nn.Linear(layer_in.in_features, layer_in.out_features + alpha.shape[0], device=device, dtype=dtype)
    new_out = nn.Linear(layer_out.in_features + omega.shape[1], layer_out.out_features, device=device, dtype=dtype)
    with torch.no_grad():
        new_in.weight.copy_(torch.cat([layer_in.weight, alpha[:, :-1]], dim=0))
        new_in.bias.copy_(torch.cat([layer_in.bias, alpha[:, -1]], dim=0))
        weight_out, bias_out = layer_out.weight.clone(), layer_out.bias.clone()
        if candidate.dW is not None and gamma != 0.0:
            dW = (gamma * candidate.dW).to(dtype=dtype, device=device)
            weight_out += dW[:, :-1]
            bias_out += dW[:, -1]
        new_out.weight.copy_(torch.cat([weight_out, omega], dim=1))
        new_out.bias.copy_(bias_out)
    grown[candidate.in_index] = new_in
    grown[candidate.out_index] = new_out
    return grown


def _pad_like(old: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero tensor of ``shape`` with ``old`` in its leading corner."""
    padded = torch.zeros(shape, dtype=old.dtype, device=old.device)
    padded[tuple(slice(0, s) for s in old.shape)] = old
    return padded


def carry_optimizer_state(
    optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module
) -> torch.optim.Optimizer:
    """A new optimizer of the same kind over ``new_model`` whose state for the old parameters is kept.

    Per-parameter state tensors shaped like the parameter (e.g. Adam's exp_avg, exp_avg_sq) are
    zero-padded for the new rows/columns; scalars (e.g. ``step``) are copied. Hyper-parameters of the
    first param group (including a scheduled learning rate) are carried over.
    """
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    new_optimizer = type(optimizer)(new_model.parameters(), **group)
    old_params = dict(old_model.named_parameters())
    for name, new_param in new_model.named_parameters():
        old_state = optimizer.state.get(old_params.get(name))
        if not old_state:
            continue
        new_optimizer.state[new_param] = {
            key: _pad_like(value, new_param.shape) if torch.is_tensor(value) and value.shape == old_params[name].shape else value
            for key, value in old_state.items()
        }
    return new_optimizer


@torch.no_grad()
def grown_output(model: nn.Sequential, candidate: Candidate, X: torch.Tensor):
    """g -> outputs of ``add_neurons(model, candidate, g)`` on ``X``, without copying the model.

    The activities up to the grown layer are computed once; each call only redoes the new neurons,
    the next linear layer and what follows, so a line search over g costs little.
    """
    layer_in, layer_out = model[candidate.in_index], model[candidate.out_index]
    activation = model[candidate.in_index + 1 : candidate.out_index]
    suffix = model[candidate.out_index + 1 :]
    dtype = layer_in.weight.dtype
    alpha, omega = candidate.alpha.to(dtype), candidate.omega.to(dtype)
    x = model[: candidate.in_index](X)
    h_old = activation(layer_in(x))
    a_new = x @ alpha[:, :-1].T + alpha[:, -1]
    base = layer_out(h_old)
    moved = h_old @ candidate.dW[:, :-1].to(dtype).T + candidate.dW[:, -1].to(dtype) if candidate.dW is not None else None

    @torch.no_grad()
    def output(gamma: float) -> torch.Tensor:
        scale = math.copysign(math.sqrt(abs(gamma)), gamma)
        pre = base + activation(scale * a_new) @ (scale * omega).T
        if moved is not None:
            pre = pre + gamma * moved
        return suffix(pre)

    return output
