"""Model surgery: (model, neurons) -> wider model, and optimizer state carried over to it.

A producer (Linear, Conv1d, Conv2d) gains output neurons/channels at the end; the channel-wise
modules in between gain channels where they have per-channel state (BatchNorm, see ``widen_between``
for how its new channels are set); the consumer gains input columns/channels in the positions its new
inputs take: after the old channels for a conv or a vector, after the old H*W-column blocks for a
linear layer behind a flatten. Modules are replaced by path (``pairs.Pair``), so a residual block's
conv1 / bn1 / conv2 grow in place inside the block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tinydeploy.growth.candidates import Candidate
from tinydeploy.growth.pairs import HOMOGENEOUS_TYPES, Pair, pair_at
from tinydeploy.growth.pairs import evaluating as _evaluating


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
    """A BatchNorm like ``module`` with ``channels`` channels."""
    return type(module)(channels, eps=module.eps, momentum=module.momentum, affine=module.affine,
                        track_running_stats=module.track_running_stats, device=module.running_mean.device,
                        dtype=module.running_mean.dtype)


def widen_between(module: nn.Module, k: int, mean: torch.Tensor | None = None,
                  var: torch.Tensor | None = None) -> nn.Module:
    """A channel-wise module in front of ``k`` more channels; activations, pooling and flatten are kept.

    BatchNorm under growth (the design decision, App. E.3 leaves it open). In training mode a
    BatchNorm standardises each channel with the batch's statistics, which would undo the amplitude
    sqrt(g) of a new channel (and blow a small one up to unit variance); in eval mode it applies its
    running statistics. The new channels therefore get running mean m_k, running variance v_k, weight
    sqrt(v_k + eps) and bias m_k, where (m_k, v_k) are the new channel's own mean and (biased) variance
    at the BatchNorm's input over a batch of data (``mean``, ``var``; over samples and positions):

    * eval mode: (x - m_k) / sqrt(v_k + eps) * sqrt(v_k + eps) + m_k = x exactly, whatever (m_k, v_k):
      a new channel passes unchanged, so the statistics linearise BatchNorm as the identity
      (``pairs.linearised_between``), the line search sees exactly the grown model, and at g = 0 the new
      channel is 0 and the function is unchanged;
    * train mode: the batch's mean and variance of the new channel are close to (m_k, v_k), so the
      channel still passes nearly unchanged and training starts from the function the amplitude search
      chose, instead of a re-normalised one.

    Without ``mean``/``var`` (no data at hand) the new channels get m_k = 0, v_k = 1 (weight
    sqrt(1 + eps), bias 0): the identity in eval mode too, but train mode re-normalises them. Growth
    statistics and the line search run in eval mode (``pairs.evaluating``), and the job
    re-estimates the running statistics before each growth step (``growth.batchnorm.recalibrate``) so
    that eval mode matches what training sees.
    """
    if not isinstance(module, NORMS):
        return module
    if not module.track_running_stats:
        raise ValueError(f"{module}: growth through a BatchNorm needs running statistics (track_running_stats)")
    grown = _fresh_norm(module, module.num_features + k)
    options = {"dtype": module.running_mean.dtype, "device": module.running_mean.device}
    mean = torch.zeros(k, **options) if mean is None else mean.to(**options)
    var = torch.ones(k, **options) if var is None else var.to(**options)
    with torch.no_grad():
        grown.running_mean.copy_(torch.cat([module.running_mean, mean]))
        grown.running_var.copy_(torch.cat([module.running_var, var]))
        if module.affine:
            grown.weight.copy_(torch.cat([module.weight, torch.sqrt(var + module.eps).to(module.weight.dtype)]))
            grown.bias.copy_(torch.cat([module.bias, mean.to(module.bias.dtype)]))
        else:  # no affine map: only (x - 0) / sqrt(1 - eps + eps) is the identity
            grown.running_mean[module.num_features:] = 0.0
            grown.running_var[module.num_features:] = 1.0 - module.eps
        if module.num_batches_tracked is not None:
            grown.num_batches_tracked.copy_(module.num_batches_tracked)
    return grown.train(module.training)


def new_channel_modules(between: nn.Sequential, k: int) -> nn.Sequential:
    """What ``k`` new channels alone pass through between producer and consumer (eval mode): a
    BatchNorm is the identity on them (``widen_between``)."""
    return nn.Sequential(*(nn.Identity() if isinstance(m, NORMS) else m for m in between))


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


def _scaled(candidate: Candidate, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(s sqrt|g| alpha, s sqrt|g| omega, g dW*) of ``candidate`` at amplitude ``gamma``."""
    scale = _signed_root(gamma)
    dW = gamma * candidate.dW if candidate.dW is not None and gamma != 0.0 else None
    return scale * candidate.alpha, scale * candidate.omega, dW


@torch.no_grad()
def _norm_moments(model: nn.Sequential, pair: Pair, alpha: torch.Tensor, X: torch.Tensor) -> dict[str, tuple]:
    """(mean, biased variance) over samples and positions of the new channels (fan-in ``alpha``) at the
    input of every BatchNorm between producer and consumer, on inputs ``X`` (eval mode); none without one."""
    if not any(isinstance(m, NORMS) for m in pair.between(model)):
        return {}
    producer = pair.producer(model)
    dtype = producer.weight.dtype
    with _evaluating(model):
        x = pair.producer_input(model, X)
        alpha = alpha.to(dtype=dtype, device=x.device)
        h = _apply(producer, x, alpha[:, :-1].reshape(alpha.shape[0], *producer.weight.shape[1:]), alpha[:, -1])
        moments = {}
        for path, module in zip(pair.between_paths, pair.between(model)):
            if isinstance(module, NORMS):
                dims = [d for d in range(h.dim()) if d != 1]
                moments[path] = (h.double().mean(dim=dims), h.double().var(dim=dims, unbiased=False))
            else:
                h = module(h)
    return moments


def add_neurons(model: nn.Sequential, candidate: Candidate, gamma: float, X: torch.Tensor | None = None) -> nn.Sequential:
    """A copy of ``model`` with the candidate's neurons (channels) added at amplitude ``gamma``.

    Adds s sqrt|g| alpha_k as new output neurons/channels of the producer of growable module
    ``in_index`` (bias last in alpha), widens the channel-wise modules in between (``widen_between``;
    a BatchNorm's new channels take their statistics from inputs ``X`` when given), adds s sqrt|g|
    omega_k as new inputs of the consumer in the positions its new inputs take, and g dW* to the
    consumer's existing weights. With gamma = 0 the function is unchanged (new fan-in and fan-out are 0).
    A residual block grows its middle channels: conv1 -> bn1 -> activation -> conv2.
    """
    pair = pair_at(model, candidate.in_index)
    alpha, omega, dW = _scaled(candidate, gamma)
    moments = _norm_moments(model, pair, alpha, X) if X is not None else {}
    grown = copy.deepcopy(model)
    k = candidate.n_neurons
    grown.set_submodule(pair.producer_path, widen_producer(pair.producer(grown), alpha))
    for path in pair.between_paths:
        grown.set_submodule(path, widen_between(grown.get_submodule(path), k, *moments.get(path, (None, None))))
    grown.set_submodule(pair.consumer_path, widen_consumer(pair.consumer(grown), omega, dW))
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


#: Largest number of values (amplitudes x samples x consumer outputs) one batched evaluation holds.
STACK_VALUES = 1 << 22


class GrownOutput:
    """g -> outputs of ``add_neurons(model, candidate, g)`` on ``X`` (eval mode), without copying the model.

    The activities up to the grown layer are computed once; each evaluation only redoes the new
    channels, what they pass through, the consumer's new inputs and what follows, so a line search over
    g costs little. The consumer is linear in its input channels, so its output is the old output plus
    the new channels' contribution plus g times the best update's. Where everything between producer
    and consumer is positively homogeneous (ReLU, pooling, flatten; a BatchNorm is the identity on new
    channels), the new channels' contribution is linear in g too (``_direction``), and an amplitude
    costs one multiply-add over the consumer's output before what follows. ``stacked`` evaluates
    several g at once (one pass over G copies of the batch, in groups of at most ``STACK_VALUES`` values).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Sequential, candidate: Candidate, X: torch.Tensor):
        self.model, self.pair = model, pair_at(model, candidate.in_index)
        producer, self.consumer = self.pair.producer(model), self.pair.consumer(model)
        self.fresh = new_channel_modules(self.pair.between(model), candidate.n_neurons)
        dtype = producer.weight.dtype
        alpha, omega = candidate.alpha.to(dtype), candidate.omega.to(dtype)
        with _evaluating(model):
            self.x = self.pair.producer_input(model, X)
            h_old = self.pair.between(model)(producer(self.x))
            self.a_new = _apply(producer, self.x, alpha[:, :-1].reshape(alpha.shape[0], *producer.weight.shape[1:]),
                                alpha[:, -1])
            self.base = self.consumer(h_old)
            self.new_weight = omega.reshape(omega.shape[0], -1) if isinstance(self.consumer, nn.Linear) else omega
            self.moved = None
            if candidate.dW is not None:
                dW = candidate.dW.to(dtype)
                self.moved = _apply(self.consumer, h_old, dW[:, :-1].reshape(self.consumer.weight.shape), dW[:, -1])
        self.linear = all(isinstance(m, HOMOGENEOUS_TYPES) for m in self.fresh)
        self._directions: dict[float, torch.Tensor] = {}
        self._suffixes: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, gamma: float) -> torch.Tensor:
        return self.stacked([gamma])[0]

    @torch.no_grad()
    def stacked(self, gammas: list[float]) -> torch.Tensor:
        """The outputs for each g in ``gammas``, stacked: (G, n, ...)."""
        group = max(1, STACK_VALUES // max(1, self.base.numel(), self.a_new.numel()))
        return torch.cat([self._group(gammas[i : i + group]) for i in range(0, len(gammas), group)])

    def _direction(self, sign: float) -> torch.Tensor:
        """C_s = d pre / d g for amplitudes g of sign s, when the new channels' path f is positively
        homogeneous: s sqrt|g| omega f(s sqrt|g| alpha x) = g omega f(s alpha x), so the consumer's output
        is pre(g) = base + g C_s with C_s = omega f(s alpha x) + dW* x."""
        if sign not in self._directions:
            C = _apply(self.consumer, self.fresh(sign * self.a_new), self.new_weight, None)
            self._directions[sign] = C if self.moved is None else C.add_(self.moved)
        return self._directions[sign]

    def _pre(self, gammas: list[float]) -> torch.Tensor:
        """The consumer's output for each g: (G, n, ...)."""
        G, n = len(gammas), self.base.shape[0]
        options = {"dtype": self.base.dtype, "device": self.base.device}
        gamma = torch.tensor(gammas, **options).reshape((G,) + (1,) * self.base.dim())
        if self.linear:  # base + g C_s: one multiply-add over the G copies per sign of g
            pre = None
            for sign in sorted({math.copysign(1.0, g) for g in gammas if g != 0.0}):
                part, C = gamma.clamp(min=0.0) if sign > 0 else gamma.clamp(max=0.0), self._direction(sign)
                pre = torch.addcmul(self.base, part, C) if pre is None else pre.addcmul_(part, C)
            return self.base.expand(G, *self.base.shape) if pre is None else pre
        scale = torch.tensor([_signed_root(g) for g in gammas], **options).reshape((G,) + (1,) * self.a_new.dim())
        grown = self.fresh((scale * self.a_new).flatten(0, 1)).unflatten(0, (G, n))  # through what lies between
        # scale * (consumer of the new channels), with the factor on the K new channels rather than on the
        # consumer's outputs, then the old output and g dW's added in place: three passes over the G copies
        new = (scale.reshape((G,) + (1,) * (grown.dim() - 1)) * grown).flatten(0, 1)
        pre = _apply(self.consumer, new, self.new_weight, None).unflatten(0, (G, n)).add_(self.base)
        if self.moved is not None:
            pre.addcmul_(gamma, self.moved)
        return pre

    def _group(self, gammas: list[float]) -> torch.Tensor:
        G, n = len(gammas), self.base.shape[0]
        pre = self._pre(gammas)
        with _evaluating(self.model):
            if G not in self._suffixes:
                self._suffixes[G] = self.pair.continuation(self.model, self.x, repeats=G)
            out = self._suffixes[G](pre.flatten(0, 1))
        return out.unflatten(0, (G, n))


def grown_output(model: nn.Sequential, candidate: Candidate, X: torch.Tensor) -> GrownOutput:
    """``GrownOutput`` of ``candidate`` applied to ``model``, on ``X``."""
    return GrownOutput(model, candidate, X)
