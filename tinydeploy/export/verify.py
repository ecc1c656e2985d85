"""Re-check an export directory without rewriting it: manifest hashes first, then the parity gate."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tinydeploy.errors import TinyDeployError
from tinydeploy.export.formats import FORMATS, INPUTS_KEY
from tinydeploy.export.gate import gate_file, gate_inputs
from tinydeploy.export.parity import FormatParity, ParityError, failure_message
from tinydeploy.export.pipeline import PARITY_FILE
from tinydeploy.model.freeze import load_frozen
from tinydeploy.model.serialization import read_metadata
from tinydeploy.serving.manifest import verify_manifest
from tinydeploy.serving.providers import choose_providers


@dataclass
class VerifyResult:
    """Every artifact's gate result and the tolerance it was judged with."""

    directory: Path
    parity: list[FormatParity]
    atol: float
    rtol: float


def verify_export(
    directory: str | os.PathLike[str],
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
) -> VerifyResult:
    """Check hashes, reload each artifact with its own runtime and re-run the gate against the frozen
    model rebuilt from the directory's model.safetensors. The tolerance defaults to the one recorded in
    parity.json. Raises ``IntegrityError`` or ``ParityError`` on failure; writes nothing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TinyDeployError(f"export directory {directory} does not exist: pass the --out directory of 'tinydeploy export'")
    choose_providers(provider)
    verify_manifest(directory)
    if not (directory / PARITY_FILE).is_file():
        raise TinyDeployError(f"{directory} has no {PARITY_FILE}: re-run 'tinydeploy export'")
    recorded = json.loads((directory / PARITY_FILE).read_text(encoding="utf-8"))
    atol = recorded["tolerance"]["atol"] if atol is None else atol
    rtol = recorded["tolerance"]["rtol"] if rtol is None else rtol
    included = read_metadata(directory / FORMATS["safetensors"]).get(INPUTS_KEY) == "raw"
    frozen, spec = load_frozen(directory, preprocessing=included)
    inputs = recorded["inputs"]
    data = gate_inputs(frozen, spec, inputs["data_source"], included, seed=inputs["seed"])
    results = [
        gate_file(fmt, directory / name, spec, data, atol, rtol, provider)
        for fmt, name in FORMATS.items()
        if (directory / name).is_file()
    ]
    if not all(r.passed for r in results):
        raise ParityError(f"{failure_message(results, atol, rtol)} in {directory}", results)
    return VerifyResult(directory, results, atol, rtol)
