"""Weights + spec in one safetensors file (no pickle): the spec travels in the string metadata."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinydeploy import __version__
from tinydeploy.atomic import atomic_path
from tinydeploy.errors import SpecError, TinyDeployError
from tinydeploy.model.build import build_model
from tinydeploy.model.spec import ArchSpec

SPEC_KEY = "tinydeploy.spec"
#: File names of the weights and of the indented spec in run and export directories.
MODEL_FILE = "model.safetensors"
ARCH_FILE = "arch.json"


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: ArchSpec,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model``'s state dict and ``spec`` atomically to a safetensors file."""
    metadata = {
        SPEC_KEY: spec.to_json(),
        "tinydeploy.spec_sha256": spec.sha256(),
        "tinydeploy.version": __version__,
        **(extra_metadata or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise TinyDeployError(f"cannot read {path}: {exc}; is it a tinydeploy model.safetensors?") from exc


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Sequential, ArchSpec]:
    """Rebuild the plain model from a safetensors file written by ``save_model``."""
    path = Path(path)
    if not path.is_file():
        raise TinyDeployError(f"{path} does not exist: pass a run or export directory holding model.safetensors")
    metadata = read_metadata(path)
    if SPEC_KEY not in metadata:
        raise SpecError(f"{path} has no '{SPEC_KEY}' metadata: it was not written by tinydeploy")
    spec = ArchSpec.from_json(metadata[SPEC_KEY])
    model = build_model(spec)
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SpecError(f"{path}: weights do not match the spec in its metadata ({exc})") from exc
    return model.eval(), spec
