"""Choice of the torch device for training and growth."""

from __future__ import annotations

import torch

from tinydeploy.errors import TinyDeployError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when a usable GPU is present, else CPU; ``cuda`` without one is an error."""
    if requested not in DEVICES:
        raise TinyDeployError(f"unknown device '{requested}': use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise TinyDeployError("--device cuda was asked for but no usable CUDA GPU is visible to torch: use --device cpu or auto")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
