"""Linear regions of a ReLU network on 2-D inputs: the number of distinct activation patterns on a grid.

A ReLU network is affine on each set of inputs that share one activation pattern (which units are on);
counting the patterns met on a fine grid over the data's bounding box measures how many linear
pieces the network actually uses where the data lives (the folding talk's "utilization of
approximatability"). ``count_patterns`` counts the same patterns among given inputs, e.g. the training
samples: only the regions that hold data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: Grid points per axis.
RESOLUTION = 200


def regions_apply(model: nn.Sequential, input_shape: tuple[int, ...]) -> bool:
    """Whether ``count_linear_regions`` applies: 2-D inputs to an MLP whose activations are all ReLU."""
    return tuple(input_shape) == (2,) and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)


@torch.no_grad()
def activation_patterns(model: nn.Sequential, X: torch.Tensor) -> torch.Tensor:
    """(n, units) booleans: for each sample, which hidden ReLU units have a positive pre-activation."""
    patterns, h = [], X
    for module in model:
        if isinstance(module, nn.ReLU):
            patterns.append(h > 0)
        h = module(h)
    return torch.cat(patterns, dim=1) if patterns else torch.zeros(X.shape[0], 0, dtype=torch.bool)


@torch.no_grad()
def count_linear_regions(model: nn.Sequential, low: tuple[float, float], high: tuple[float, float],
                         resolution: int = RESOLUTION) -> int:
    """The number of distinct activation patterns on a ``resolution`` x ``resolution`` grid spanning the box
    [low, high] of the model's (2-D) input space."""
    weight = next(p for p in model.parameters())
    axes = [torch.linspace(lo, hi, resolution, dtype=weight.dtype, device=weight.device) for lo, hi in zip(low, high)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    return count_patterns(model, grid)


@torch.no_grad()
def count_patterns(model: nn.Sequential, X: torch.Tensor) -> int:
    """The number of distinct activation patterns among the inputs X (n, d): on a grid, the regions met
    there; on the training inputs, the regions that hold data (a count over the data's support rather
    than its bounding box, bounded by the number of samples)."""
    was_training = model.training
    try:
        patterns = activation_patterns(model.eval(), X)
    finally:
        model.train(was_training)
    packed = np.packbits(patterns.cpu().numpy(), axis=1)  # one row of bytes per point: unique rows, fast
    return int(np.unique(np.ascontiguousarray(packed).view(np.dtype((np.void, max(packed.shape[1], 1))))).shape[0])
