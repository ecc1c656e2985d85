"""Per-sample losses shared by training, growth statistics and the amplitude line search."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l_i = -log softmax(out_i)[y_i] (torch's kernel: what training and the statistics differentiate)."""
    return F.cross_entropy(out, y, reduction="none")


def cross_entropy_value(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``cross_entropy`` as logsumexp(out_i) - out_i[y_i]: the same values to float rounding, for scoring
    without gradients. torch's kernel runs log_softmax a row at a time: with 10 classes, 3-4x slower."""
    return torch.logsumexp(out, 1) - out.gather(1, y[:, None])[:, 0]


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l_i = mean over outputs of (out_i - y_i)^2."""
    return ((out - y) ** 2).mean(dim=1)


def per_sample_loss(task: str) -> LossFn:
    """``l_i`` for each sample: cross-entropy for classification, mean squared error for regression."""
    return cross_entropy if task == "classification" else squared_error


def scoring_loss(loss_fn: LossFn) -> LossFn:
    """The per-sample loss to score outputs with, without gradients: ``loss_fn``'s values by a faster route
    where there is one (``cross_entropy_value``), else ``loss_fn`` itself."""
    return cross_entropy_value if loss_fn is cross_entropy else loss_fn


def task_metric(task: str, out: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy for classification, mean squared error for regression."""
    if task == "classification":
        return float((out.argmax(dim=1) == y).float().mean())
    return float(((out - y) ** 2).mean())
