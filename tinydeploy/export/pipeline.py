"""Freeze a run, export it, gate every artifact on parity, then publish the export directory.

Every file is first written into a hidden staging directory inside the output directory. Only when
every artifact has passed the parity gate and the width report agrees with the exported weights
are the files renamed to their final names (same filesystem, so each rename is atomic), followed by
manifest.json. A failure publishes nothing.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from safetensors import safe_open

from tinydeploy.atomic import write_json
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.formats import FORMATS, artifact_metadata, parse_formats, write_artifact
from tinydeploy.export.gate import gate_file, gate_inputs
from tinydeploy.export.onnx_format import check_opset, initializer_shapes
from tinydeploy.export.parity import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    FormatParity,
    ParityError,
    failure_message,
    parity_document,
)
from tinydeploy.export.width_report import build_width_report, check_widths, write_width_report
from tinydeploy.model.freeze import freeze
from tinydeploy.serving.manifest import MANIFEST_FILE, STAGING_PREFIX, read_manifest, write_manifest
from tinydeploy.serving.providers import choose_providers
from tinydeploy.training.rundir import ARCH_FILE, METRICS_FILE, Run, read_run

PARITY_FILE = "parity.json"
ARTIFACTS_DIR = "artifacts"

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    """What ``export_run`` published."""

    out_dir: Path
    files: dict[str, Path]
    parity: list[FormatParity]
    report: dict[str, Any]
    opset: int | None
    seconds: float
    sizes: dict[str, int] = field(default_factory=dict)


def check_output_dir(out_dir: Path, run_dir: Path) -> None:
    """Fail up front, in one line, if ``out_dir`` cannot hold an export."""
    if out_dir.resolve() == run_dir.resolve():
        raise TinyDeployError(f"--out {out_dir} is the run directory itself: choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyDeployError(f"cannot write to {out_dir}: it is a file, not a directory")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TinyDeployError(f"cannot create output directory {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TinyDeployError(f"cannot write to output directory {out_dir}: {existing} is not writable")
    if out_dir.is_dir() and not (out_dir / MANIFEST_FILE).is_file():
        if any(not p.name.startswith(STAGING_PREFIX) for p in out_dir.iterdir()):
            raise TinyDeployError(
                f"{out_dir} is not empty and not a tinydeploy export directory: choose a new or empty --out"
            )


def _previous_files(out_dir: Path) -> list[str]:
    """Files listed by an earlier export's manifest in ``out_dir`` (replaced or removed on publish)."""
    if not (out_dir / MANIFEST_FILE).is_file():
        return []
    return list(read_manifest(out_dir)["files"])


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file."""
    with safe_open(str(path), framework="numpy") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}


def _publish(stage: Path, out_dir: Path, stale: list[str]) -> None:
    """Move every staged file to its final name and drop files of an earlier export not written now."""
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    staged = {p.name for p in stage.iterdir()}
    for name in stale:
        if name not in staged:
            (out_dir / name).unlink(missing_ok=True)
    for name in sorted(staged):
        os.replace(stage / name, out_dir / name)


def _stage(
    stage: Path,
    run: Run,
    chosen: tuple[str, ...],
    opset: int | None,
    preprocessing: bool,
    atol: float,
    rtol: float,
    provider: str,
    say: Progress,
) -> tuple[list[FormatParity], dict[str, Any]]:
    """Write and gate every artifact, the width report and parity.json into ``stage``."""
    frozen = freeze(run.model, run.spec, preprocessing=preprocessing)
    included = preprocessing and bool(run.spec.preprocessing)
    metadata = artifact_metadata(run.spec, included)
    say("loading the test split")
    data = gate_inputs(frozen, run.spec, run.metrics["data_source"], included)
    report = build_width_report(run.spec, run.growth_log, run.metrics)
    write_json(stage / ARCH_FILE, run.spec.to_dict())
    results = []
    for fmt in chosen:
        say(f"exporting {fmt}")
        path = stage / FORMATS[fmt]
        write_artifact(fmt, path, run.model, frozen, run.spec, metadata, opset)
        say(f"checking {fmt} parity")
        results.append(gate_file(fmt, path, run.spec, data, atol, rtol, provider))
    if not all(r.passed for r in results):
        raise ParityError(f"{failure_message(results, atol, rtol)}; nothing was published", results)
    if "onnx" in chosen:
        check_widths(report, initializer_shapes(stage / FORMATS["onnx"]), FORMATS["onnx"])
    else:
        check_widths(report, _safetensors_shapes(stage / FORMATS["safetensors"]), FORMATS["safetensors"])
    say("writing the width report")
    write_width_report(stage, report)
    write_json(stage / PARITY_FILE, parity_document(results, atol, rtol, data.description))
    return results, report


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    formats: Iterable[str] = ("onnx", "torchscript", "pt2"),
    opset: int | None = None,
    preprocessing: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    command: str = "",
    provider: str = "cpu",
    progress: Progress | None = None,
) -> ExportResult:
    """Export the run in ``run_dir`` (safetensors always, plus ``formats``) to ``out_dir``.

    Raises ``ParityError`` (carrying every format's measurements) when an artifact fails the gate;
    nothing is published then. ``provider`` picks onnxruntime's execution provider for the gate.
    """
    start = time.perf_counter()
    chosen = ("safetensors", *parse_formats(formats))
    choose_providers(provider)
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / ARTIFACTS_DIR
    check_output_dir(out, run.path)
    if opset is not None and "onnx" not in chosen:
        raise TinyDeployError(f"opset {opset} was given but ONNX is not among the formats: add onnx or drop the opset")
    opset = check_opset(opset) if "onnx" in chosen else None
    if "data_source" not in run.metrics:
        raise TinyDeployError(f"{run.path / METRICS_FILE} has no 'data_source': re-run 'tinydeploy grow'")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_files(out)
    try:
        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=out) as staging:
            results, report = _stage(
                Path(staging), run, chosen, opset, preprocessing, atol, rtol, provider, progress or (lambda _: None)
            )
            _publish(Path(staging), out, stale)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    write_manifest(out, command, str(run.path.resolve()))
    files = {fmt: out / FORMATS[fmt] for fmt in chosen}
    sizes = {fmt: path.stat().st_size for fmt, path in files.items()}
    return ExportResult(out, files, results, report, opset, time.perf_counter() - start, sizes)
