"""BatchNorm running statistics for growth: re-estimated on data before a growth step.

Growth statistics, the amplitude line search and the new channels' identity BatchNorm
(``surgery.widen_between``) all use eval mode, that is the running statistics. During training
those are an exponential average (momentum 0.1) over batches seen while the weights moved, and at
initialisation they are (0, 1), far from the data. ``recalibrate`` replaces them with the population
statistics of the current weights on a batch of data: the per-chunk batch mean and unbiased variance
averaged over the chunks (BatchNorm's cumulative mode, ``momentum=None``), so that the eval-mode
network a growth step measures is the one training sees, on average.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, NORMS) for m in model.modules())


@torch.no_grad()
def recalibrate(model: nn.Module, X: torch.Tensor, chunk_size: int = 256) -> None:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` on inputs ``X``, in chunks of
    ``chunk_size`` (train-mode forward passes without gradients); weights are untouched, the model's
    mode and the BatchNorms' momenta are restored."""
    norms = [m for m in model.modules() if isinstance(m, NORMS) and m.track_running_stats]
    if not norms or X.shape[0] == 0:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for start in range(0, X.shape[0], chunk_size):
            if X.shape[0] - start > 1:  # a BatchNorm needs more than one value per channel
                model(X[start : start + chunk_size])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
