"""A real, small run directory built without the growth engine, shared by the export tests.

Import the fixtures into a test module with ``from export_fixtures import exported, trained_run``.
The run and the export are built once per test process (module-level cache), whichever module asks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tinydeploy.data import apply_standardizer, fit_standardizer, load_dataset
from tinydeploy.export.pipeline import ExportResult, export_run
from tinydeploy.training.rundir import write_run
from tinydeploy.model.build import build_model
from tinydeploy.model.spec import ArchSpec

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(Path(sys.executable))
INITIAL_WIDTHS = [1, 1]
FINAL_WIDTHS = [12, 6]
#: (hidden layer, neurons added) per growth step: 1+7+4 = 12 and 1+5 = 6.
GROWTH = [(0, 7), (1, 5), (0, 4)]
_cache: dict[str, Any] = {}


def _evaluate(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        out = model(torch.from_numpy(X))
        target = torch.from_numpy(y)
        return {
            "accuracy": float((out.argmax(1) == target).float().mean()),
            "loss": float(torch.nn.functional.cross_entropy(out, target)),
        }


def _growth_log(spec: ArchSpec) -> list[dict[str, Any]]:
    widths, events = list(INITIAL_WIDTHS), []
    for step, (hidden, added) in enumerate(GROWTH, start=1):
        widths[hidden] += added
        events.append({
            "step": step, "epoch": 2 * step, "layer": spec.growable_indices[hidden], "hidden_index": hidden,
            "method": "tiny", "neurons_added": added, "lambdas": [1.0 / k for k in range(1, added + 1)],
            "lambda_null": 0.05, "gamma": 0.5, "loss_before": 2.0 / step, "loss_after": 1.8 / step,
            "acc_before": 0.2 * step, "acc_after": 0.25 * step, "psi_before": 1.0 / step, "psi_after": 0.8 / step,
            "params": spec.with_hidden_widths(widths).n_params(), "widths": list(widths),
        })
    return events


def build_run(run_dir: Path, epochs: int = 8) -> Path:
    """Train a [12, 6] MLP on standardised digits with Adam and write a complete run directory."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    prep = fit_standardizer(data.X_train)
    spec = ArchSpec.mlp(
        task="classification", input_shape=data.input_shape, hidden_widths=FINAL_WIDTHS,
        n_outputs=len(data.classes), classes=data.classes, preprocessing=prep, dataset="digits",
    )
    model = build_model(spec)
    X_train = torch.from_numpy(apply_standardizer(data.X_train, prep))
    y_train = torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    splits = {name: (apply_standardizer(getattr(data, f"X_{name}"), prep), getattr(data, f"y_{name}"))
              for name in ("train", "val", "test")}
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(X_train)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X_train[batch]), y_train[batch]).backward()
            optimizer.step()
        model.eval()
        val, train = _evaluate(model, *splits["val"]), _evaluate(model, *splits["train"])
        history.append({"epoch": epoch, "params": spec.n_params(), "widths": FINAL_WIDTHS,
                        "val_accuracy": val["accuracy"], "train_loss": train["loss"], "val_loss": val["loss"]})
    model.eval()
    reference = spec.with_hidden_widths([32, 32])
    metrics = {
        "dataset": "digits",
        "task": "classification",
        "data_source": data.source,
        "initial_widths": INITIAL_WIDTHS,
        "final_widths": FINAL_WIDTHS,
        "params": spec.n_params(),
        "macs": spec.macs(),
        "metrics": {name: _evaluate(model, *split) for name, split in splits.items()},
        "history": history,
        "reference": {"widths": [32, 32], "params": reference.n_params(), "test_accuracy": 0.95},
        "final_bottleneck": [0.125, 0.0625],
    }
    return write_run(run_dir, model, spec, _growth_log(spec), metrics)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory (built once per process)."""
    if "run" not in _cache:
        _cache["run"] = build_run(tmp_path_factory.mktemp("export-fixture") / "run")
    return _cache["run"]


@pytest.fixture(scope="session")
def exported(trained_run: Path) -> ExportResult:
    """The run exported in-process to RUN/artifacts with every format (exported once per process)."""
    if "export" not in _cache:
        _cache["export"] = export_run(trained_run, formats=("onnx", "torchscript", "pt2"), command="pytest fixture")
    return _cache["export"]
