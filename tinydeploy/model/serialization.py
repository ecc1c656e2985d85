"""Weights + spec in one safetensors file (no pickle): the spec travels in the string metadata."""

from __future__ import annotations

import json
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


def metadata_from_bytes(data: bytes, where: str = "model.safetensors") -> dict[str, str]:
    """The string metadata of safetensors ``data``: ``__metadata__`` of the JSON header that follows
    the header's length (8 bytes, little-endian)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise TinyDeployError(f"cannot read {where}: not a safetensors file (bad header length); is it a tinydeploy model.safetensors?")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TinyDeployError(f"cannot read {where}: its safetensors header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TinyDeployError(f"cannot read {where}: its safetensors metadata is not a map of strings")
    return dict(metadata)


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Sequential, ArchSpec]:
    """Rebuild the plain model from a safetensors file written by ``save_model``."""
    path = Path(path)
    if not path.is_file():
        raise TinyDeployError(f"{path} does not exist: pass a run or export directory holding model.safetensors")
    metadata = read_metadata(path)
    if SPEC_KEY not in metadata:
        raise SpecError(f"{path} has no '{SPEC_KEY}' metadata: it was not written by tinydeploy")
    return _build(ArchSpec.from_json(metadata[SPEC_KEY]), load_file(str(path)), path)


def load_model_bytes(data: bytes, where: str = "model.safetensors") -> tuple[nn.Sequential, ArchSpec]:
    """``load_model`` from bytes already read (and hashed) by the caller: nothing is re-read from disk."""
    from safetensors.torch import load

    metadata = metadata_from_bytes(data, where)
    if SPEC_KEY not in metadata:
        raise SpecError(f"{where} has no '{SPEC_KEY}' metadata: it was not written by tinydeploy")
    spec = ArchSpec.from_json(metadata[SPEC_KEY])
    try:
        state = load(data)
    except (SafetensorError, ValueError) as exc:
        raise TinyDeployError(f"cannot read {where}: {exc}") from None
    return _build(spec, state, where)


def _build(spec: ArchSpec, state: dict, where: str | os.PathLike[str]) -> tuple[nn.Sequential, ArchSpec]:
    model = build_model(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SpecError(f"{where}: weights do not match the spec in its metadata ({exc})") from exc
    return model.eval(), spec
