"""Freeze a trained model: a static eval-mode module that takes RAW features.

The frozen model is an ``nn.Sequential`` whose first module, ``standardize``, holds the training
preprocessing as buffers and whose other modules keep the spec's names ``"0"``, ``"1"``, ... so that
state-dict keys (and ONNX initializer names) read ``"{i}.weight"`` exactly as in the run.

Exactness: ``standardize`` stores mean/std rounded to float32 exactly like
``tinydeploy.data.apply_standardizer`` does and computes ``(x - mean) / std`` in float32, and
IEEE subtraction and division are correctly rounded, so on CPU the frozen model's output on raw X is
bit-identical to the trained model's output on ``apply_standardizer(X)``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinydeploy.errors import SpecError
from tinydeploy.model.build import build_model
from tinydeploy.model.serialization import ARCH_FILE, MODEL_FILE, load_model
from tinydeploy.model.spec import ArchSpec

STANDARDIZE = "standardize"


class Standardize(nn.Module):
    """``(x - mean) / std`` with float32 buffers shaped like one sample (per feature) or (C, 1, ...) (per channel)."""

    def __init__(self, preprocessing: dict[str, Any], input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if preprocessing.get("kind") != "standardize":
            raise SpecError(f"unknown preprocessing kind {preprocessing.get('kind')!r}: expected 'standardize'")
        per_channel = preprocessing.get("per") == "channel"
        shape = (input_shape[0], *[1] * (len(input_shape) - 1)) if per_channel else input_shape
        mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(shape)
        std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(shape)
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def freeze(model: nn.Module, spec: ArchSpec, *, preprocessing: bool = True) -> nn.Sequential:
    """A detached eval-mode copy of ``model`` on CPU, with the spec's preprocessing first if asked."""
    plain = build_model(spec)
    plain.load_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()}, strict=True)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    if preprocessing and spec.preprocessing:
        modules[STANDARDIZE] = Standardize(spec.preprocessing, spec.input_shape)
    modules.update((str(i), module) for i, module in enumerate(plain))
    frozen = nn.Sequential(modules).eval()
    frozen.requires_grad_(False)
    return frozen


def load_frozen(directory: str | os.PathLike[str], *, preprocessing: bool = True) -> tuple[nn.Sequential, ArchSpec]:
    """Rebuild the frozen model from ``directory``'s model.safetensors and arch.json (no pickle)."""
    directory = Path(directory)
    model, spec = load_model(directory / MODEL_FILE)
    arch_path = directory / ARCH_FILE
    if arch_path.is_file():
        arch = ArchSpec.from_json(arch_path.read_text(encoding="utf-8"))
        if arch.to_json() != spec.to_json():
            raise SpecError(f"{arch_path} disagrees with the spec stored in {directory / MODEL_FILE}: re-export the run")
    return freeze(model, spec, preprocessing=preprocessing), spec
