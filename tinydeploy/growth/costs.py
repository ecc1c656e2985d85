"""What a network and one added neuron (channel) cost: parameters and multiply-accumulates per sample.

MACs count weights only (a linear layer: in x out; a convolution: its weight's size x output
positions), as ``tinydeploy.model.spec.ArchSpec.macs`` does. Output positions come from one forward
pass of a single sample through the model (``output_shapes``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinydeploy.growth.pairs import CONV_TYPES, WEIGHT_TYPES, pair_at
from tinydeploy.model.build import module_width


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def output_shapes(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every weight module (by path, nested ones too), from a forward pass
    of ``sample[:1]``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [module.register_forward_hook(lambda _m, _a, out, p=path: shapes.__setitem__(p, tuple(out.shape[1:])))
               for path, module in model.named_modules() if isinstance(module, WEIGHT_TYPES)]
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


def count_macs(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates per sample of every weight module (weights only)."""
    modules = dict(model.named_modules())
    return sum(modules[p].weight.numel() * _positions(modules[p], shape) for p, shape in shapes.items())


def neuron_cost(model: nn.Sequential, in_index: int, out_index: int | None = None,
                shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[int, int | None]:
    """(parameters, MACs per sample) that one more neuron/channel of the growable module ``in_index``
    adds: its fan-in and bias, per-channel parameters of the modules in between (BatchNorm), and its
    fan-out in the consumer (``pairs.pair_at``; ``out_index`` is checked against it when given). MACs
    are None without ``shapes``."""
    pair = pair_at(model, in_index)
    if out_index is not None and out_index != pair.out_index:
        raise ValueError(f"module {in_index}'s consumer is in module {pair.out_index}, not {out_index}")
    producer, consumer = pair.producer(model), pair.consumer(model)
    width = module_width(producer)
    fan_in = producer.weight[0].numel()
    between = sum(p.numel() for p in pair.between(model).parameters()) // width
    fan_out = consumer.weight.numel() // width
    params = fan_in + 1 + between + fan_out
    if shapes is None:
        return params, None
    macs = (fan_in * _positions(producer, shapes[pair.producer_path])
            + fan_out * _positions(consumer, shapes[pair.consumer_path]))
    return params, macs
