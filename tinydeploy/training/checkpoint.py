"""Resume state without pickle: optimizer and random-number-generator state as tensors plus JSON.

Each function returns ``(tensors, state)``: ``tensors`` go into a safetensors file, ``state`` is JSON
(floats round-trip exactly through Python's json). Restoring them gives bit-identical training.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str = "optimizer.") -> tuple[Tensors, dict[str, Any]]:
    """Any torch optimizer's ``state_dict`` split into tensors (``optimizer.<param>.<key>``) and JSON."""
    state_dict = optimizer.state_dict()
    tensors: Tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Tensors, state: dict[str, Any],
                         prefix: str = "optimizer.") -> None:
    """Load what ``optimizer_state`` saved into a fresh optimizer of the same kind over the same parameters."""
    entries: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in state["scalars"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix):].split(".", 1)
            entries.setdefault(int(index), {})[key] = value
    fresh = optimizer.state_dict()["param_groups"]
    groups = []
    for saved, current in zip(state["param_groups"], fresh):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    optimizer.load_state_dict({"state": entries, "param_groups": groups})


def rng_state(generators: dict[str, torch.Generator]) -> tuple[Tensors, dict[str, Any]]:
    """Torch's global CPU (and current CUDA device's) state, the given generators, numpy's and Python's
    (the Mersenne-twister key arrays as int64 tensors, the rest as JSON)."""
    tensors: Tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    tensors["rng.python_internal"] = torch.tensor(internal, dtype=torch.int64)
    state = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "gauss_next": gauss_next}}
    return tensors, state


def restore_rng(generators: dict[str, torch.Generator], tensors: Tensors, state: dict[str, Any]) -> None:
    """Set every generator ``rng_state`` saved back to where it was."""
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
    n = state["numpy"]
    keys = tensors["rng.numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in tensors["rng.python_internal"].tolist()), p["gauss_next"]))
