"""Per-feature standardisation fitted on the training split and recorded in the spec."""

from __future__ import annotations

from typing import Any

import numpy as np

from tinydeploy.errors import DataError


def fit_standardizer(X_train: np.ndarray) -> dict[str, Any]:
    """Per-feature mean and std of the flattened training inputs (std below 1e-6 becomes 1)."""
    flat = np.asarray(X_train, dtype=np.float64).reshape(len(X_train), -1)
    std = flat.std(axis=0)
    std[std < 1e-6] = 1.0
    return {"kind": "standardize", "mean": flat.mean(axis=0).tolist(), "std": std.tolist()}


def apply_standardizer(X: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """``(X - mean) / std`` per feature, as float32 with the shape of ``X``."""
    if prep.get("kind") != "standardize":
        raise DataError(f"unknown preprocessing kind {prep.get('kind')!r}: expected 'standardize'")
    mean = np.asarray(prep["mean"], dtype=np.float32)
    std = np.asarray(prep["std"], dtype=np.float32)
    flat = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    if flat.shape[1] != mean.size:
        raise DataError(f"inputs have {flat.shape[1]} features but the standardizer was fitted on {mean.size}")
    return ((flat - mean) / std).astype(np.float32).reshape(np.shape(X))
