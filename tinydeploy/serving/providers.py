"""onnxruntime execution providers, chosen deliberately (imports only onnxruntime and the stdlib).

onnxruntime-gpu lists ``TensorrtExecutionProvider`` and ``CUDAExecutionProvider`` as available even
on machines where their libraries cannot load, so passing every available provider fails or silently
falls back. CUDA is therefore only used when a probe session really reports it as running.
onnxruntime is imported on first use, so that reading ``PROVIDER_CHOICES`` (the CLI's help) is free.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

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

#: A 65-byte ONNX model (y = Relu(x), x float[1], IR 7, opset 13), serialised once with
#: ``onnx.helper`` so that this module does not need the ``onnx`` package to probe a provider.
_PROBE_MODEL = (
    b"\x08\x07:7\n\x0c\n\x01x\x12\x01y\"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02"
    b"\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


def quiet_session_options() -> ort.SessionOptions:
    """Session options that log errors only (no provider-fallback warnings on stderr)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """Whether a session asked for CUDA really runs on ``CUDAExecutionProvider``."""
    import onnxruntime as ort

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
    import onnxruntime as ort

    raise TinyDeployError(
        f"provider 'cuda' requested but onnxruntime {ort.__version__} cannot run CUDAExecutionProvider here "
        f"(available: {', '.join(ort.get_available_providers())}): install onnxruntime-gpu matching the "
        "CUDA driver, or use 'cpu'"
    )


def open_session(model: str | Path | bytes, requested: str = "cpu") -> ort.InferenceSession:
    """An ``InferenceSession`` on the providers ``choose_providers(requested)`` picks."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=quiet_session_options(), providers=choose_providers(requested))
