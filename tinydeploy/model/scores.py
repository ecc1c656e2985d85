"""Scores of a model's outputs against targets (numpy only): what ``metrics.json``, the width report
and the parity gate report for each task."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Scores of a regression, in the order they are shown.
REGRESSION_SCORES = ("mse", "rmse", "mae", "r2")


def regression_scores(outputs: Any, y: Any) -> dict[str, float]:
    """MSE, RMSE, MAE and R^2 of ``outputs`` against ``y`` (both (n, d) or (n,)), in float64.

    R^2 = 1 - sum (y - out)^2 / sum (y - mean(y))^2 per output, averaged over the outputs (scikit-learn's
    ``r2_score``); an output whose target is constant scores 1 when predicted exactly, else 0."""
    out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    target = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    error = out - target
    mse = float(np.mean(error**2))
    residual = (error**2).sum(axis=0)
    total = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    safe = np.where(total > 0, total, 1.0)
    r2 = np.where(total > 0, 1.0 - residual / safe, np.where(residual == 0, 1.0, 0.0))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(error))), "r2": float(r2.mean())}


def score_names(task: str) -> tuple[str, ...]:
    """The scores reported for ``task``: accuracy, or the regression scores."""
    return ("accuracy",) if task == "classification" else REGRESSION_SCORES
