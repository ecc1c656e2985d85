"""Names of an export directory's files and of the metadata embedded in them (no heavy imports:
the CLI reads these to build its help, and ``verify --hashes-only`` to check hashes without torch).

Which formats can run code when loaded: TorchScript (``model.ts``: the TorchScript unpickler runs a
module's ``__setstate__``, which may call ``aten::from_file`` and read or write any file) and
torch.export (``model.pt2``: ``torch.export.load`` unpickles sample inputs, weights marked
``use_pickle`` and opaque constants). ONNX (parsed by onnxruntime) and safetensors (a JSON header and
raw tensor bytes) cannot; they are the only formats loaded from an untrusted directory by default.
"""

from __future__ import annotations

from typing import Iterable

from tinydeploy.errors import TinyDeployError

#: Format name -> file name in an export directory. safetensors is always written.
FORMATS: dict[str, str] = {
    "safetensors": "model.safetensors",
    "onnx": "model.onnx",
    "torchscript": "model.ts",
    "pt2": "model.pt2",
}
OPTIONAL_FORMATS = ("onnx", "torchscript", "pt2")
#: Formats whose loaders unpickle or run TorchScript code: loaded only with an explicit trust flag.
CODE_FORMATS = ("torchscript", "pt2")
TRUST_HELP = (
    "Also reload model.ts (TorchScript) and model.pt2 (torch.export). Their loaders can run code "
    "hidden in the file (pickle, TorchScript __setstate__), so without this flag they are checked by "
    "hash only; pass it only for a directory you trust."
)
PARITY_FILE = "parity.json"
INT8_FILE = "model.int8.onnx"

#: Metadata key saying whether the artifact expects raw features ("raw") or standardised ones.
INPUTS_KEY = "tinydeploy.inputs"
SPEC_KEY = "tinydeploy.spec"
#: Metadata key listing the input features' names (JSON list; empty when the data had no names).
FEATURE_NAMES_KEY = "tinydeploy.feature_names"
METADATA_KEYS = [
    SPEC_KEY,
    "tinydeploy.spec_sha256",
    "tinydeploy.version",
    "tinydeploy.task",
    "tinydeploy.classes",
    "tinydeploy.preprocessing",
    INPUTS_KEY,
    FEATURE_NAMES_KEY,
]


def parse_formats(names: Iterable[str]) -> tuple[str, ...]:
    """Validated optional format names in canonical order (safetensors is accepted and implied)."""
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise TinyDeployError(
            f"unknown format '{unknown[0]}': use one of {', '.join(OPTIONAL_FORMATS)} (safetensors is always written)"
        )
    return tuple(f for f in OPTIONAL_FORMATS if f in names)
