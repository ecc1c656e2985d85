"""Run the parity gate on artifact files: reload each with its own runtime, compare with the frozen model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tinydeploy.data import apply_standardizer, load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.formats import FORMATS, load_artifact
from tinydeploy.export.parity import PARITY_SEED, RANDOM_BATCHES, FormatParity, parity_inputs, run_gate
from tinydeploy.model.serialization import SPEC_KEY
from tinydeploy.model.spec import ArchSpec


@dataclass
class GateInputs:
    """Input batches, the frozen model's outputs on them, test labels, and their description."""

    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    y_test: np.ndarray
    task: str
    description: dict[str, Any]


def run_frozen(frozen: nn.Module, x: np.ndarray) -> np.ndarray:
    """The frozen model's float32 outputs on one numpy batch (CPU)."""
    with torch.no_grad():
        return frozen(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def gate_inputs(
    frozen: nn.Module,
    spec: ArchSpec,
    data_source: dict[str, Any],
    preprocessing_included: bool,
    seed: int = PARITY_SEED,
) -> GateInputs:
    """Reload the run's test split and build the gate's inputs in the space the artifacts expect."""
    dataset = load_dataset(**data_source)
    if tuple(dataset.input_shape) != tuple(spec.input_shape):
        raise TinyDeployError(
            f"the dataset {data_source.get('name')!r} has inputs of shape {list(dataset.input_shape)} but the "
            f"model expects {list(spec.input_shape)}: the run's data_source does not match its model"
        )
    raw = preprocessing_included or not spec.preprocessing
    X = dataset.X_test if raw else apply_standardizer(dataset.X_test, spec.preprocessing)
    inputs = parity_inputs(X, seed)
    description = {
        "data_source": data_source,
        "test_samples": int(len(X)),
        "random_batches": [*RANDOM_BATCHES, int(len(X))],
        "seed": seed,
        "space": "raw features" if raw else "standardized features",
    }
    reference = {name: run_frozen(frozen, x) for name, x in inputs.items()}
    return GateInputs(inputs, reference, dataset.y_test, spec.task, description)


def gate_file(
    fmt: str,
    data: bytes,
    spec: ArchSpec,
    gate: GateInputs,
    atol: float,
    rtol: float,
    provider: str = "cpu",
    *,
    trusted: bool = False,
) -> FormatParity:
    """Load artifact bytes ``data`` as ``fmt`` and run the gate; a file that fails to load or run fails
    the gate. ``trusted`` allows the formats whose loaders can run code (see ``load_artifact``)."""
    try:
        loaded = load_artifact(fmt, data, provider, trusted=trusted)
        spec_matches = loaded.metadata.get(SPEC_KEY) == spec.to_json()
        return run_gate(
            fmt, FORMATS[fmt], loaded.predict, loaded.runtime, gate.inputs, gate.reference,
            gate.y_test, gate.task, atol, rtol, spec_matches,
        )
    except Exception as exc:  # any failure to load or run an artifact is a failed gate, reported by name
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return FormatParity(fmt, FORMATS[fmt], False, error=f"cannot load or run it ({type(exc).__name__}: {first_line})")
