"""Per-sample losses shared by training, growth statistics and the amplitude line search."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_loss(task: str) -> LossFn:
    """``l_i`` for each sample: cross-entropy for classification, mean squared error for regression."""
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    return lambda out, y: ((out - y) ** 2).mean(dim=1)


def task_metric(task: str, out: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy for classification, mean squared error for regression."""
    if task == "classification":
        return float((out.argmax(dim=1) == y).float().mean())
    return float(((out - y) ** 2).mean())
