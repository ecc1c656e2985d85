"""Model surgery: (model, neurons) -> wider model, and optimizer state carried over to it.

A producer (Linear, Conv1d, Conv2d) gains output neurons/channels at the end; the channel-wise
modules in between gain channels where they have per-channel state (BatchNorm); the consumer gains
input columns/channels in the positions its new inputs take: after the old channels for a conv or a
vector, after the old H*W-column blocks for a linear layer behind a flatten.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from tinydeploy.growth.candidates import Candidate


def _signed_root(gamma: float) -> float:
    return math.copysign(math.sqrt(abs(gamma)), gamma)


def widen_producer(module: nn.Module, alpha: torch.Tensor) -> nn.Module:
    """``module`` with K new output neurons/channels whose fan-in is ``alpha`` (K, D), bias last."""
    dtype, device = module.weight.dtype, module.weight.device
    alpha = alpha.to(dtype=dtype, device=device)
    k = alpha.shape[0]
    if isinstance(module, nn.Linear):
        grown: nn.Module = nn.Linear(module.in_features, module.out_features + k, device=device, dtype=dtype)
    else:
        grown = type(module)(module.in_channels, module.out_channels + k, module.kernel_size, stride=module.stride,
                             padding=module.padding, device=device, dtype=dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([module.weight, alpha[:, :-1].reshape(k, *module.weight.shape[1:])], dim=0))
        grown.bias.copy_(torch.cat([module.bias, alpha[:, -1]], dim=0))
    return grown


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _fresh_norm(module: nn.Module, channels: int) -> nn.Module:
    """A BatchNorm like ``module`` with ``channels`` channels at its initial state (weight 1, bias 0,
    running mean 0, running variance 1)."""
    return type(module)(channels, eps=module.eps, momentum=module.momentum, affine=module.affine,
                        track_running_stats=module.track_running_stats, device=module.running_mean.device,
                        dtype=module.running_mean.dtype)


def widen_between(module: nn.Module, k: int) -> nn.Module:
    """A channel-wise module in front of ``k`` more channels. A BatchNorm gains channels at their
    initial state, which in eval mode map a new channel x to x / sqrt(1 + eps): a new channel that is
    0 stays 0, so the function is unchanged at g = 0. Other modules (activations, pooling, flatten)
    are kept as they are."""
    if not isinstance(module, NORMS):
        return module
    grown, fresh = _fresh_norm(module, module.num_features + k), _fresh_norm(module, k)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            old, new = getattr(module, name), getattr(fresh, name)
            if old is not None:
                getattr(grown, name).copy_(torch.cat([old, new]))
        if module.num_batches_tracked is not None:
            grown.num_batches_tracked.copy_(module.num_batches_tracked)
    return grown.train(module.training)


def new_channel_modules(between: nn.Sequential, k: int) -> nn.Sequential:
    """What ``k`` new channels alone pass through between producer and consumer (eval mode)."""
    return nn.Sequential(*(_fresh_norm(m, k).eval() if isinstance(m, NORMS) else m for m in between))


def widen_consumer(module: nn.Module, omega: torch.Tensor, dW: torch.Tensor | None) -> nn.Module:
    """``module`` reading K more input channels with fan-out ``omega`` (o, K, *taps), the new inputs
    placed after the old ones (after a flatten: K blocks of H*W columns at the end), plus ``dW``
    (o, h+1, bias last) added to its existing weights."""
    dtype, device = module.weight.dtype, module.weight.device
    omega = omega.to(dtype=dtype, device=device)
    k = omega.shape[1]
    if isinstance(module, nn.Linear):
        grown: nn.Module = nn.Linear(module.in_features + omega[0].numel(), module.out_features, device=device,
                                     dtype=dtype)
        new_weight = omega.reshape(omega.shape[0], -1)
    else:
        grown = type(module)(module.in_channels + k, module.out_channels, module.kernel_size, stride=module.stride,
                             padding=module.padding, device=device, dtype=dtype)
        new_weight = omega
    with torch.no_grad():
        weight, bias = module.weight.clone(), module.bias.clone()
        if dW is not None:
            dW = dW.to(dtype=dtype, device=device)
            weight += dW[:, :-1].reshape(weight.shape)
            bias += dW[:, -1]
        grown.weight.copy_(torch.cat([weight, new_weight], dim=1))
        grown.bias.copy_(bias)
    return grown


def add_neurons(model: nn.Sequential, candidate: Candidate, gamma: float) -> nn.Sequential:
    """A copy of ``model`` with the candidate's neurons (channels) added at amplitude ``gamma``.

    Adds s sqrt|g| alpha_k as new output neurons/channels of module ``in_index`` (bias last in alpha),
    widens the channel-wise modules in between (``widen_between``), adds s sqrt|g| omega_k as new
    inputs of the consumer ``out_index`` in the positions its new inputs take, and g dW* to the
    consumer's existing weights. With gamma = 0 the function is unchanged (new fan-in and fan-out are 0).
    """
    grown = copy.deepcopy(model)
    scale = _signed_root(gamma)
    k = candidate.n_neurons
    grown[candidate.in_index] = widen_producer(grown[candidate.in_index], scale * candidate.alpha)
    for index in range(candidate.in_index + 1, candidate.out_index):
        grown[index] = widen_between(grown[index], k)
    dW = gamma * candidate.dW if candidate.dW is not None and gamma != 0.0 else None
    grown[candidate.out_index] = widen_consumer(grown[candidate.out_index], scale * candidate.omega, dW)
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


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s linear map (Linear or Conv, same stride and padding) with other weights."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x, weight, bias, stride=module.stride, padding=module.padding)


@torch.no_grad()
def grown_output(model: nn.Sequential, candidate: Candidate, X: torch.Tensor):
    """g -> outputs of ``add_neurons(model, candidate, g)`` on ``X``, without copying the model.

    The activities up to the grown layer are computed once; each call only redoes the new channels,
    what they pass through, the consumer's new inputs and what follows, so a line search over g
    costs little. The consumer is linear in its input channels, so its output is the old output plus
    the new channels' contribution plus g times the best update's.
    """
    producer, consumer = model[candidate.in_index], model[candidate.out_index]
    between = model[candidate.in_index + 1 : candidate.out_index]
    fresh = new_channel_modules(between, candidate.n_neurons)
    suffix = model[candidate.out_index + 1 :]
    dtype = producer.weight.dtype
    alpha, omega = candidate.alpha.to(dtype), candidate.omega.to(dtype)
    x = model[: candidate.in_index](X)
    h_old = between(producer(x))
    a_new = _apply(producer, x, alpha[:, :-1].reshape(alpha.shape[0], *producer.weight.shape[1:]), alpha[:, -1])
    base = consumer(h_old)
    new_weight = omega.reshape(omega.shape[0], -1) if isinstance(consumer, nn.Linear) else omega
    moved = None
    if candidate.dW is not None:
        dW = candidate.dW.to(dtype)
        moved = _apply(consumer, h_old, dW[:, :-1].reshape(consumer.weight.shape), dW[:, -1])

    @torch.no_grad()
    def output(gamma: float) -> torch.Tensor:
        scale = _signed_root(gamma)
        pre = base + _apply(consumer, fresh(scale * a_new), scale * new_weight, None)
        if moved is not None:
            pre = pre + gamma * moved
        return suffix(pre)

    return output
