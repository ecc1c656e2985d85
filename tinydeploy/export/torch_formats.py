"""TorchScript (``model.ts``) and torch.export (``model.pt2``) files with the metadata embedded.

Loading either format can run code hidden in the file (see ``tinydeploy.export.artifacts``), so the
loaders here take bytes the caller has already hashed and are only called for files this process
just wrote or for a directory the user trusts explicitly (``--trust-pickle``).

``torch.jit`` warns on every call that it is deprecated in favour of ``torch.export``; TorchScript is
still a requested format, so exactly that ``FutureWarning`` is silenced around the calls made here.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Iterator

import torch
from torch import nn

from tinydeploy.model.spec import ArchSpec

_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
        yield


def _decoded(extra: dict[str, str | bytes]) -> dict[str, str]:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in extra.items()}


def save_torchscript(frozen: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Script ``frozen`` (batch size stays dynamic) and save it with ``metadata`` as extra files."""
    with _jit_deprecation_silenced():
        scripted = torch.jit.script(frozen)
        torch.jit.save(scripted, str(path), _extra_files=metadata)


def load_torchscript(data: bytes, keys: list[str]) -> tuple[nn.Module, dict[str, str]]:
    """The scripted module in ``data`` and the extra files named ``keys`` (missing ones come back empty).
    Runs TorchScript code of the file: trusted bytes only."""
    extra: dict[str, str | bytes] = {key: "" for key in keys}
    with _jit_deprecation_silenced():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    return module.eval(), _decoded(extra)


def save_pt2(frozen: nn.Module, spec: ArchSpec, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """``torch.export`` ``frozen`` with a dynamic batch dimension and save it with ``metadata``."""
    example = torch.zeros((2, *spec.input_shape), dtype=torch.float32)
    program = torch.export.export(frozen, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path), extra_files=metadata)


def load_pt2(data: bytes, keys: list[str]) -> tuple[nn.Module, dict[str, str]]:
    """The exported program in ``data`` as a callable module and the extra files named ``keys``.
    Unpickles parts of the file: trusted bytes only."""
    extra: dict[str, str | bytes] = {key: "" for key in keys}
    program = torch.export.load(io.BytesIO(data), extra_files=extra)
    return program.module(), _decoded(extra)
