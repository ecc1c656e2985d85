"""Re-check an export directory without rewriting it: manifest hashes first, then the parity gate.

The directory is untrusted. Every file the manifest lists is hashed (no symbolic links followed) and
every file it does not list fails the check; the artifacts are then loaded from the very bytes that
were hashed. safetensors and ONNX are reloaded and gated by default. TorchScript and torch.export
files can run code when loaded, so they are checked by hash only unless ``trust_pickle`` is set.
The test data named in parity.json is reloaded by readers that cannot run code: CIFAR's pickled batches
go through a restricted unpickler that resolves nothing but numpy's array constructors
(``tinydeploy.data.torchvision_sets.RestrictedUnpickler``).

``hashes_only=True`` stops after the hashes and imports no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinydeploy.errors import IntegrityError, TinyDeployError
from tinydeploy.export.artifacts import CODE_FORMATS, FORMATS, INPUTS_KEY, PARITY_FILE
from tinydeploy.serving.manifest import read_verified, verify_manifest
from tinydeploy.serving.providers import choose_providers

_SOURCE_KEYS = {"name": str, "data_dir": (str, type(None)), "target": (str, type(None)), "split_seed": int,
                "val_fraction": float, "task": str, "as_images": bool, "stratify": bool}


@dataclass
class VerifyResult:
    """Every gated artifact's result, the tolerance, and the artifacts checked by hash only."""

    directory: Path
    parity: list[Any]
    atol: float
    rtol: float
    hash_only: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)


def check_data_source(source: Any) -> dict[str, Any]:
    """The recorded test-data source, if it is well formed."""
    if not isinstance(source, dict) or set(source) - set(_SOURCE_KEYS) or "name" not in source:
        raise IntegrityError(f"{PARITY_FILE}: inputs.data_source is malformed: re-run 'tinydeploy export'")
    for key, kind in _SOURCE_KEYS.items():
        if key in source and (not isinstance(source[key], kind) or (isinstance(source[key], bool) and kind is not bool)):
            raise IntegrityError(f"{PARITY_FILE}: inputs.data_source.{key} has the wrong type: re-run 'tinydeploy export'")
    return source


def _parity_record(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        recorded = json.loads(read_verified(directory, manifest, PARITY_FILE).decode("utf-8"))
        tolerance, inputs = recorded["tolerance"], recorded["inputs"]
        float(tolerance["atol"]), float(tolerance["rtol"]), int(inputs["seed"])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError, KeyError, ValueError):
        raise IntegrityError(f"{directory / PARITY_FILE} is malformed: re-run 'tinydeploy export'") from None
    return recorded


def verify_export(
    directory: str | os.PathLike[str],
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
    *,
    trust_pickle: bool = False,
    hashes_only: bool = False,
) -> VerifyResult:
    """Check hashes, reload each artifact with its own runtime from the hashed bytes and re-run the gate
    against the frozen model rebuilt from the directory's model.safetensors. The tolerance defaults to
    the one recorded in parity.json. Raises ``IntegrityError`` or ``ParityError`` on failure; writes
    nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TinyDeployError(f"export directory {directory} does not exist: pass the --out directory of 'tinydeploy export'")
    choose_providers(provider)
    manifest = verify_manifest(directory, unlisted=True)
    present = [fmt for fmt, name in FORMATS.items() if name in manifest["files"]]
    sizes = {fmt: manifest["files"][FORMATS[fmt]]["size"] for fmt in present}
    hash_only = [fmt for fmt in present if hashes_only or (fmt in CODE_FORMATS and not trust_pickle)]
    if hashes_only:
        return VerifyResult(directory, [], float("nan"), float("nan"), hash_only, sizes)
    if FORMATS["safetensors"] not in manifest["files"]:
        raise IntegrityError(f"{directory} has no {FORMATS['safetensors']} in its manifest: re-run 'tinydeploy export'")
    if PARITY_FILE not in manifest["files"]:
        raise IntegrityError(f"{directory} has no {PARITY_FILE} in its manifest: re-run 'tinydeploy export'")
    recorded = _parity_record(directory, manifest)
    atol = float(recorded["tolerance"]["atol"]) if atol is None else atol
    rtol = float(recorded["tolerance"]["rtol"]) if rtol is None else rtol
    source = check_data_source(recorded["inputs"].get("data_source"))
    return _gate(directory, manifest, source, int(recorded["inputs"]["seed"]), atol, rtol, provider,
                 [fmt for fmt in present if fmt not in hash_only], hash_only, sizes, trust_pickle)


def _gate(directory: Path, manifest: dict[str, Any], source: dict[str, Any], seed: int, atol: float, rtol: float,
          provider: str, formats: list[str], hash_only: list[str], sizes: dict[str, int],
          trust_pickle: bool) -> VerifyResult:
    """Rebuild the frozen model from the hashed safetensors bytes and gate ``formats`` (imports torch)."""
    from tinydeploy.export.gate import gate_file, gate_inputs
    from tinydeploy.export.parity import ParityError, failure_message
    from tinydeploy.model.freeze import freeze
    from tinydeploy.model.serialization import ARCH_FILE, load_model_bytes, metadata_from_bytes
    from tinydeploy.model.spec import ArchSpec

    weights = read_verified(directory, manifest, FORMATS["safetensors"])
    included = metadata_from_bytes(weights).get(INPUTS_KEY) == "raw"
    model, spec = load_model_bytes(weights)
    if ARCH_FILE in manifest["files"]:
        arch = ArchSpec.from_json(read_verified(directory, manifest, ARCH_FILE).decode("utf-8"))
        if arch.to_json() != spec.to_json():
            raise IntegrityError(f"{directory / ARCH_FILE} disagrees with the spec stored in {FORMATS['safetensors']}: re-export the run")
    frozen = freeze(model, spec, preprocessing=included)
    data = gate_inputs(frozen, spec, source, included, seed=seed)
    results = [
        gate_file(fmt, read_verified(directory, manifest, FORMATS[fmt]), spec, data, atol, rtol, provider,
                  trusted=trust_pickle)
        for fmt in formats
    ]
    if not all(r.passed for r in results):
        raise ParityError(f"{failure_message(results, atol, rtol)} in {directory}", results)
    return VerifyResult(directory, results, atol, rtol, hash_only, sizes)
