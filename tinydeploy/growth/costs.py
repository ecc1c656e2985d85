"""What a network and one added neuron (channel) cost: parameters and multiply-accumulates per sample.

MACs count weights only (a linear layer: in x out; a convolution: its weight's size x output
positions), as ``tinydeploy.model.spec.ArchSpec.macs`` does. Output positions come from one forward
pass of a single sample through the model (``output_shapes``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinydeploy.growth.pairs import CONV_TYPES, WEIGHT_TYPES
from tinydeploy.model.build import module_width


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def output_shapes(model: nn.Sequential, sample: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Per-sample output shape of every weight module, from a forward pass of ``sample[:1]``."""
    shapes: dict[int, tuple[int, ...]] = {}
    handles = [module.register_forward_hook(lambda _m, _a, out, i=i: shapes.__setitem__(i, tuple(out.shape[1:])))
               for i, module in enumerate(model) if isinstance(module, WEIGHT_TYPES)]
    was_training = model.training
    try:
        model.eval()(sample[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def _positions(module: nn.Module, shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if isinstance(module, CONV_TYPES) else 1


def count_macs(model: nn.Sequential, shapes: dict[int, tuple[int, ...]]) -> int:
    """Multiply-accumulates per sample of every weight module (weights only)."""
    return sum(model[i].weight.numel() * _positions(model[i], shape) for i, shape in shapes.items())


def neuron_cost(model: nn.Sequential, in_index: int, out_index: int,
                shapes: dict[int, tuple[int, ...]] | None = None) -> tuple[int, int | None]:
    """(parameters, MACs per sample) that one more neuron/channel of module ``in_index`` adds: its fan-in
    and bias, per-channel parameters of the modules in between (BatchNorm), and its fan-out in the
    consumer ``out_index``. MACs are None without ``shapes``."""
    producer, consumer = model[in_index], model[out_index]
    width = module_width(producer)
    fan_in = producer.weight[0].numel()
    between = sum(p.numel() for p in model[in_index + 1 : out_index].parameters()) // width
    fan_out = consumer.weight.numel() // width
    params = fan_in + 1 + between + fan_out
    if shapes is None:
        return params, None
    macs = fan_in * _positions(producer, shapes[in_index]) + fan_out * _positions(consumer, shapes[out_index])
    return params, macs
