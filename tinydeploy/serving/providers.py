"""onnxruntime execution providers, chosen deliberately (imports only onnxruntime and the stdlib).

onnxruntime-gpu lists ``TensorrtExecutionProvider`` and ``CUDAExecutionProvider`` as available even
on machines where their libraries cannot load, so passing every available provider fails or silently
falls back. CUDA is therefore only used when a probe session really reports it as running.
onnxruntime is imported on first use, so that reading ``PROVIDER_CHOICES`` (the CLI's help) is free.

Two wheels install the same ``onnxruntime`` import package: ``onnxruntime`` (CPU, the ``tinydeploy[cpu]``
extra) and ``onnxruntime-gpu`` (CUDA, the ``tinydeploy[gpu]`` extra). With both installed, whichever was
installed last has overwritten part of the other's files, so the import works but the providers on
offer depend on install order. :func:`import_onnxruntime` refuses that state, and a missing wheel,
with the command that fixes it.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Collection

from tinydeploy.errors import TinyDeployError

if TYPE_CHECKING:
    import onnxruntime as ort

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
#: The provider of every command and API when none is asked for: the CPU, where compact models run
#: fastest and the parity gate measured them; ``cuda`` or ``auto`` (CUDA only where it really loads) on request.
DEFAULT_PROVIDER = "cpu"
PROVIDER_HELP = ("onnxruntime execution provider: cpu, cuda (fails loudly when CUDA cannot load) or auto (CUDA "
                 "where it really loads, else CPU).")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: The distributions that provide the ``onnxruntime`` import package, and the extra that installs each.
WHEELS = {"onnxruntime": "cpu", "onnxruntime-gpu": "gpu"}
MISSING_WHEEL = ("onnxruntime is not installed: pip install 'tinydeploy[cpu]' (CPU) or 'tinydeploy[gpu]' "
                 "(NVIDIA GPUs)")

#: A 65-byte ONNX model (y = Relu(x), x float[1], IR 7, opset 13), serialised once with
#: ``onnx.helper`` so that this module does not need the ``onnx`` package to probe a provider.
_PROBE_MODEL = (
    b"\x08\x07:7\n\x0c\n\x01x\x12\x01y\"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02"
    b"\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


def wheel_conflict(installed: Collection[str]) -> str | None:
    """The one-line error for the onnxruntime distributions ``installed`` (names as pip lists them),
    or None when they cannot clash (at most one of ``WHEELS``)."""
    both = sorted(name for name in WHEELS if name in installed)
    if len(both) < 2:
        return None
    return (f"both {' and '.join(both)} are installed and overwrite each other's files: "
            f"pip uninstall -y {' '.join(both)}, then pip install 'tinydeploy[cpu]' or 'tinydeploy[gpu]'")


def installed_wheels() -> set[str]:
    """Which of ``WHEELS`` are installed in this environment."""
    found = set()
    for name in WHEELS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.add(name)
    return found


@functools.lru_cache(maxsize=None)
def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module; a ``TinyDeployError`` naming the fix when no wheel or both are installed."""
    conflict = wheel_conflict(installed_wheels())
    if conflict is not None:
        raise TinyDeployError(conflict)
    try:
        import onnxruntime
    except ImportError as exc:
        raise TinyDeployError(MISSING_WHEEL) from exc
    return onnxruntime


def quiet_session_options() -> ort.SessionOptions:
    """Session options that log errors only (no provider-fallback warnings on stderr)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """Whether a session asked for CUDA really runs on ``CUDAExecutionProvider``."""
    ort = import_onnxruntime()

    if CUDA not in ort.get_available_providers():
        return False
    options = quiet_session_options()
    options.log_severity_level = 4  # a failing CUDA load is expected here, not an error to print
    try:
        session = ort.InferenceSession(_PROBE_MODEL, sess_options=options, providers=[CUDA, CPU])
    except Exception:  # onnxruntime raises several exception types when CUDA libraries are missing
        return False
    return CUDA in session.get_providers()


def choose_providers(requested: str) -> list[str]:
    """Providers for ``requested`` in {"auto", "cpu", "cuda"}; "cuda" without a usable GPU raises."""
    if requested not in PROVIDER_CHOICES:
        raise TinyDeployError(f"unknown provider '{requested}': use one of {', '.join(PROVIDER_CHOICES)}")
    if requested == "cpu":
        return [CPU]
    if cuda_usable():
        return [CUDA, CPU]
    if requested == "auto":
        return [CPU]
    ort = import_onnxruntime()
    raise TinyDeployError(
        f"provider 'cuda' requested but onnxruntime {ort.__version__} cannot run CUDAExecutionProvider here "
        f"(available: {', '.join(ort.get_available_providers())}): install onnxruntime-gpu matching the "
        "CUDA driver (pip install 'tinydeploy[gpu]'), or use 'cpu'"
    )


def open_session(model: str | Path | bytes, requested: str = "cpu") -> ort.InferenceSession:
    """An ``InferenceSession`` on the providers ``choose_providers(requested)`` picks."""
    ort = import_onnxruntime()

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=quiet_session_options(), providers=choose_providers(requested))
