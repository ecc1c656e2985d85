"""The run directory written by ``tinydeploy grow`` and read by ``export``/``report``.

Layout (every file written atomically):

- ``model.safetensors``: weights, with the architecture spec in the string metadata (no pickle);
- ``arch.json``: the same spec, indented;
- ``growth_log.jsonl``: one JSON object per growth event;
- ``metrics.json``: final metrics, widths, parameters, wall time, the dataset ``source`` and history.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tinydeploy.atomic import write_json, write_text
from tinydeploy.errors import TinyDeployError
from tinydeploy.model.serialization import ARCH_FILE, MODEL_FILE, load_model, save_model
from tinydeploy.model.spec import ArchSpec

GROWTH_LOG_FILE = "growth_log.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class Run:
    """A loaded run directory."""

    path: Path
    model: nn.Sequential
    spec: ArchSpec
    growth_log: list[dict[str, Any]]
    metrics: dict[str, Any]


def write_growth_log(run_dir: str | os.PathLike[str], events: list[dict[str, Any]]) -> None:
    """Write all growth events, one JSON object per line."""
    write_text(Path(run_dir) / GROWTH_LOG_FILE, "".join(json.dumps(e) + "\n" for e in events))


def write_run(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    spec: ArchSpec,
    growth_log: list[dict[str, Any]],
    metrics: dict[str, Any],
) -> Path:
    """Write a complete run directory; each file is replaced atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(run_dir / MODEL_FILE, model, spec, {"tinydeploy.kind": "run"})
    write_json(run_dir / ARCH_FILE, spec.to_dict())
    write_growth_log(run_dir, growth_log)
    write_json(run_dir / METRICS_FILE, metrics)
    return run_dir


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    """Load a run directory, with a one-line error if it is missing or foreign."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TinyDeployError(f"run directory {run_dir} does not exist: pass the --out directory of 'tinydeploy grow'")
    missing = [f for f in (MODEL_FILE, ARCH_FILE, METRICS_FILE) if not (run_dir / f).is_file()]
    if missing:
        raise TinyDeployError(
            f"{run_dir} is not a tinydeploy run directory (missing {', '.join(missing)}): "
            "pass the --out directory of 'tinydeploy grow'"
        )
    model, spec = load_model(run_dir / MODEL_FILE)
    log_path = run_dir / GROWTH_LOG_FILE
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    return Run(run_dir, model, spec, log, metrics)
