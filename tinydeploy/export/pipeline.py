"""Freeze a run, export it, gate every artifact on parity, then publish the export directory.

The whole export directory, manifest.json last, is built in a hidden staging directory beside the
target (``.tinydeploy-staging-<name>-<pid>-<token>``, same filesystem). Only when every artifact has
passed the parity gate and the width report agrees with the exported weights is it swapped in with
``tinydeploy.atomic.replace_directory``: an atomic exchange with the old directory, which is then
deleted. A reader therefore sees the whole old or the whole new export at every instant, and a
failure or a kill at any point publishes nothing; staging directories of dead exports are removed by
the next export to the same target.

An existing export directory is replaced only with ``force`` (``--force``), and then whole: files of
the earlier export that this one does not write are gone, never silently mixed or kept. A run that did
not complete (interrupted, or still running) is exported from its last checkpoint with a warning,
and its status is recorded in the manifest (``run_status``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from safetensors import safe_open

from tinydeploy.atomic import replace_directory, write_json
from tinydeploy.errors import IntegrityError, TinyDeployError
from tinydeploy.export.artifacts import PARITY_FILE
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
from tinydeploy.export.profile import PROFILE_BATCHES, PROFILE_RUNS, PROFILE_SEED, layer_latency
from tinydeploy.export.width_report import add_latency, build_width_report, check_widths, write_width_report
from tinydeploy.model.freeze import freeze
from tinydeploy.model.fold import fold_batchnorm
from tinydeploy.serving.manifest import MANIFEST_FILE, STAGING_PREFIX, directory_entries, read_manifest, write_manifest
from tinydeploy.serving.providers import DEFAULT_PROVIDER, choose_providers
from tinydeploy.training.rundir import ARCH_FILE, EXPORT_DIR, METRICS_FILE, Run, read_run

ARTIFACTS_DIR = EXPORT_DIR
#: Suffix of the name the previous export is moved to where no atomic exchange exists.
OLD_SUFFIX = "-old"

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
    #: Things the user should know, one line each (e.g. the run did not complete).
    warnings: list[str] = field(default_factory=list)
    run_status: str = "complete"


def check_output_dir(out_dir: Path, run_dir: Path, force: bool = False) -> None:
    """Fail up front, in one line, if ``out_dir`` cannot hold an export (nothing is touched): it holds
    an export and ``force`` is not given, or files no export wrote."""
    if out_dir.resolve() == run_dir.resolve():
        raise TinyDeployError(f"--out {out_dir} is the run directory itself: choose another directory")
    if out_dir.is_symlink():
        raise TinyDeployError(f"--out {out_dir} is a symbolic link: pass the directory it points to")
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyDeployError(f"cannot write to {out_dir}: it is a file, not a directory")
    existing = out_dir.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TinyDeployError(f"cannot create output directory {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TinyDeployError(f"cannot write to output directory {out_dir}: {existing} is not writable")
    if not out_dir.is_dir():
        return
    files, odd = directory_entries(out_dir)
    if not (out_dir / MANIFEST_FILE).is_file():
        if files or odd:
            raise TinyDeployError(
                f"{out_dir} is not empty and not a tinydeploy export directory: choose a new or empty --out"
            )
        return
    try:
        listed = read_manifest(out_dir)["files"]
    except IntegrityError as exc:
        raise TinyDeployError(f"{out_dir} holds a damaged export ({exc}): remove it or choose another --out") from None
    foreign = [name for name in [*files, *odd] if name not in listed]
    if foreign:
        raise TinyDeployError(
            f"{out_dir} holds {', '.join(foreign[:5])}, which no export wrote; an export replaces the whole "
            "directory: move them out or choose another --out"
        )
    if not force:
        shown = ", ".join(sorted(listed)[:6]) + (", ..." if len(listed) > 6 else "")
        raise TinyDeployError(f"{out_dir} already holds an export ({shown}): pass --force to replace it whole "
                              "(files this export does not write are removed), or choose another --out")


def staging_name(out_dir: Path) -> str:
    """The prefix of the staging directories of exports to ``out_dir`` (they live beside it)."""
    return f"{STAGING_PREFIX}{out_dir.name}-"


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete staging directories beside ``out_dir`` left by exports whose process is gone.

    Where no atomic exchange exists, an export killed between its two renames leaves no ``out_dir``
    and the previous export under ``<staging>-old``: that one is put back first."""
    removed: list[Path] = []
    prefix = staging_name(out_dir)
    if not out_dir.parent.is_dir():
        return removed
    stale = []
    for entry in sorted(out_dir.parent.iterdir()):
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-")[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            stale.append(entry)
    previous = [e for e in stale if e.name.endswith(OLD_SUFFIX) and (e / MANIFEST_FILE).is_file()]
    if previous and not out_dir.exists():
        os.rename(previous[0], out_dir)
        stale.remove(previous[0])
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_staging(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f"{staging_name(out_dir)}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o777)  # the usual mode under the umask: the published directory keeps it
    return staging


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file."""
    with safe_open(str(path), framework="numpy") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}


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
    """Write and gate every artifact, the width report and parity.json into ``stage``. ONNX, TorchScript
    and torch.export hold the model with every BatchNorm folded into its convolution
    (``model.fold.fold_batchnorm``); the gate compares them against the unfolded frozen model."""
    frozen = freeze(run.model, run.spec, preprocessing=preprocessing)
    deployed = fold_batchnorm(frozen) if run.spec.has_batchnorm else frozen
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
        write_artifact(fmt, path, run.model, deployed, run.spec, metadata, opset)
        say(f"checking {fmt} parity")
        # this process wrote the file a moment ago: loading it (TorchScript and torch.export too) is trusted
        results.append(gate_file(fmt, path.read_bytes(), run.spec, data, atol, rtol, provider, trusted=True))
    if not all(r.passed for r in results):
        raise ParityError(f"{failure_message(results, atol, rtol)}; nothing was published", results)
    if "onnx" in chosen:
        check_widths(report, initializer_shapes(stage / FORMATS["onnx"]), FORMATS["onnx"], folded=True)
        say("profiling the ONNX model per layer")
        onnx_bytes = (stage / FORMATS["onnx"]).read_bytes()
        rng = np.random.default_rng(PROFILE_SEED)
        per_module = {f"batch_{n}": layer_latency(onnx_bytes, rng.standard_normal((n, *run.spec.input_shape)))
                      for n in PROFILE_BATCHES}
        add_latency(report, run.spec, per_module,
                    f"onnxruntime profiler, {FORMATS['onnx']}, CPU, 1 thread, mean of {PROFILE_RUNS} runs")
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
    provider: str = DEFAULT_PROVIDER,
    progress: Progress | None = None,
    force: bool = False,
) -> ExportResult:
    """Export the run in ``run_dir`` (safetensors always, plus ``formats``) to ``out_dir``.

    Raises ``ParityError`` (carrying every format's measurements) when an artifact fails the gate;
    nothing is published then. ``provider`` picks onnxruntime's execution provider for the gate;
    ``force`` replaces an existing export directory (see the module docstring).
    """
    start = time.perf_counter()
    chosen = ("safetensors", *parse_formats(formats))
    choose_providers(provider)
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / ARTIFACTS_DIR
    warnings = []
    if run.status != "complete":
        epochs = run.metrics.get("epochs")
        at = f" at epoch {epochs:g}" if isinstance(epochs, (int, float)) else ""
        warnings.append(f"the run in {run.path} is {run.status}{at}: this exports its last checkpoint, not a finished "
                        f"model; finish it with 'tinydeploy grow --resume {run.path}' and export again")
    if opset is not None and "onnx" not in chosen:
        raise TinyDeployError(f"opset {opset} was given but ONNX is not among the formats: add onnx or drop the opset")
    opset = check_opset(opset) if "onnx" in chosen else None
    if "data_source" not in run.metrics:
        raise TinyDeployError(f"{run.path / METRICS_FILE} has no 'data_source': re-run 'tinydeploy grow'")
    check_output_dir(out, run.path, force)

    remove_stale_staging(out)
    staging = _make_staging(out)
    try:
        results, report = _stage(staging, run, chosen, opset, preprocessing, atol, rtol, provider, progress or (lambda _: None))
        write_manifest(staging, command, str(run.path.resolve()), run_status=run.status)
        replace_directory(staging, out, staging.with_name(staging.name + OLD_SUFFIX))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    files = {fmt: out / FORMATS[fmt] for fmt in chosen}
    sizes = {fmt: path.stat().st_size for fmt, path in files.items()}
    return ExportResult(out, files, results, report, opset, time.perf_counter() - start, sizes, warnings, run.status)
