"""`tinydeploy grow` end to end in a subprocess (real files), and its one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.data import apply_standardizer, load_dataset
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import run_grow
from tinydeploy.training.rundir import read_run

FAST = ["--max-growth-epochs", "1", "--final-epochs", "1", "--grow-every", "0.25"]


def tinydeploy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tinydeploy", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_grow_end_to_end_on_digits(tmp_path):
    out = tmp_path / "run"
    result = tinydeploy("grow", "--dataset", "digits", "--out", str(out), "--max-params", "600", *FAST)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "arch.json", "growth_log.jsonl", "metrics.json",
                                               "history.jsonl", "checkpoints.jsonl", "checkpoints"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["initial_widths"] == [1, 1]
    assert metrics["params"] <= 600 and metrics["params"] > metrics["initial_params"]
    assert set(metrics["wall_time_s"]) == {"total", "training", "growth", "checkpoint"}
    run = read_run(out)
    data = load_dataset(**metrics["data_source"])
    with torch.no_grad():
        logits = run.model(torch.from_numpy(apply_standardizer(data.X_test, run.spec.preprocessing)))
    accuracy = float((logits.argmax(1).numpy() == data.y_test).mean())
    assert metrics["metrics"]["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.5  # chance: 0.1
    events = [json.loads(line) for line in (out / "growth_log.jsonl").read_text().splitlines()]
    assert events and events[-1]["widths"] == metrics["final_widths"]
    assert events[0]["epoch"] == 0.0  # the first growth step runs at initialisation
    for e in events:
        assert e["method"] == "tiny" and e["gamma"] > 0 and e["loss_after"] < e["loss_before"]
        assert all(lam > e["lambda_null"] for lam in e["lambdas"]) and len(e["lambdas"]) == e["neurons_added"]
    assert run.spec.hidden_widths == metrics["final_widths"] and run.spec.n_params() == metrics["params"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["tinydeploy.spec"])["layers"][0]["out_features"] == metrics["final_widths"][0]
    assert "final" in result.stdout and str(metrics["final_widths"]) in result.stdout
    assert not list(out.glob(".*tmp"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history == metrics["history"] and history[-1]["phase"] == "final"


def test_grow_is_reproducible_on_cpu(tmp_path):
    cfg = GrowConfig(max_growth_epochs=0.5, final_epochs=0.5, max_params=400, device="cpu", seed=7)
    a = run_grow(cfg, tmp_path / "a")
    b = run_grow(cfg, tmp_path / "b")
    assert a.metrics["final_widths"] == b.metrics["final_widths"]
    for (name, pa), (_, pb) in zip(read_run(a.run_dir).model.state_dict().items(),
                                   read_run(b.run_dir).model.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_help_lists_every_command_and_option():
    result = tinydeploy("grow", "--help")
    assert result.returncode == 0
    for option in ("--dataset", "--method", "--init-widths", "--grow-every", "--max-params", "--max-width",
                   "--target-accuracy", "--final-epochs", "--device", "--neurons-per-step", "--seed"):
        assert option in result.stdout


def _npz(path: Path, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"X_train": rng.normal(size=(60, 3)).astype(np.float32), "y_train": np.arange(60) % 3,
              "X_test": rng.normal(size=(20, 3)).astype(np.float32), "y_test": np.arange(20) % 3}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    nan = np.zeros((60, 3), np.float32)
    nan[5, 1] = np.nan
    csv = tmp / "table.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)))
    return [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", str(_npz(tmp / "nan.npz", X_train=nan))], "X_train has 1 NaN/inf value(s): remove or impute them"),
        (["--dataset", str(_npz(tmp / "short.npz", y_train=np.arange(50) % 3))],
         "X_train has 60 samples but y_train has 50: they must match"),
        (["--dataset", str(_npz(tmp / "range.npz", y_train=np.arange(60) % 3 * 2))],
         "classification labels must be 0..C-1"),
        (["--dataset", str(_npz(tmp / "few.npz", X_train=np.zeros((6, 3), np.float32), y_train=np.arange(6) % 3))],
         "only 6 training samples: need at least 10"),
        (["--dataset", str(csv)], "needs a label column: pass --target COLUMN"),
        (["--dataset", str(csv), "--target", "nope"], "target column 'nope' not in"),
        (["--activation", "sigmoid"], "activation 'sigmoid' has sigma(0)=0.5, but TINY needs sigma(0)=0"),
        (["--init-widths", "4,x"], "--init-widths must be comma-separated positive integers like 1,1; got '4,x'"),
        (["--method", "magic"], "unknown method 'magic': use one of tiny, gradmax, north, folding, random"),
        (["--method", "folding"], "--method folding grows shallow ReLU MLPs with one hidden layer, this network is "
         "Linear - ReLU - Linear - ReLU - Linear: pass --arch mlp --activation relu and one initial width"),
        (["--method", "folding", "--init-widths", "2", "--dataset", "sine"],
         "--method folding folds decision boundaries and needs a classification dataset"),
        (["--device", "tpu"], "unknown device 'tpu': use one of auto, cpu, cuda"),
        (["--target-accuracy", "97"], "--target-accuracy is a fraction in (0, 1], got 97.0"),
        (["--dataset", "sine", "--target-accuracy", "0.9"], "--target-accuracy applies to classification"),
    ]


def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path):
    """In-process through the real Typer app (one interpreter for all cases keeps the suite fast)."""
    for args, message in _bad_inputs(tmp_path):
        out = tmp_path / "never"
        result = CliRunner().invoke(app, ["grow", "--out", str(out), *args, *FAST])
        assert result.exit_code == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        assert not out.exists(), args


def test_folding_run_on_2d_data_reports_its_folds_and_linear_regions(tmp_path):
    from tinydeploy.model.regions import count_linear_regions

    out = tmp_path / "fold"
    result = CliRunner().invoke(app, ["grow", "--dataset", "sine2d", "--method", "folding", "--init-widths", "2",
                                      "--out", str(out), *FAST])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    events = [json.loads(line) for line in (out / "growth_log.jsonl").read_text().splitlines()]
    assert events and all(e["method"] == "folding" and e["neurons_added"] == 1 for e in events)
    assert {"x_t", "x_f", "fold", "cluster_mean_loss"} <= set(events[0]["details"])
    run = read_run(out)
    data = load_dataset(**metrics["data_source"])
    X = torch.from_numpy(apply_standardizer(data.X_train, run.spec.preprocessing))
    expected = count_linear_regions(run.model, X.min(0).values.tolist(), X.max(0).values.tolist())
    assert metrics["linear_regions"] == expected > metrics["final_widths"][0]  # more regions than lines
    assert f"linear regions {expected} " in result.stdout


def test_existing_run_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = tinydeploy("grow", "--out", str(out), *FAST)
    assert result.returncode == 2
    assert f"error: --out {out} is not empty: pass a new directory or --force to overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    result = tinydeploy("grow", "--device", "cuda", "--out", str(tmp_path / "x"), *FAST)
    assert result.returncode == 2
    assert "--device cuda was asked for but no usable CUDA GPU is visible to torch" in result.stderr


def test_user_file_gets_a_budget_from_its_size_and_says_so(tmp_path):
    """A user .npz has no default budget: it gets the larger of USER_PARAMS_PER_SAMPLE per training sample
    and a hidden layer of USER_MIN_WIDTH units, stated in a notice."""
    from tinydeploy.training.config import USER_MIN_WIDTH, USER_PARAMS_PER_SAMPLE
    from tinydeploy.training.job import prepare_grow

    few = _npz(tmp_path / "few.npz")  # 48 training samples, 3 features, 3 classes: the hidden layer decides
    many = _npz(tmp_path / "many.npz", X_train=np.random.default_rng(1).normal(size=(600, 3)).astype(np.float32),
                y_train=np.arange(600) % 3)
    expected = {few: USER_MIN_WIDTH * (3 + 1 + 3), many: USER_PARAMS_PER_SAMPLE * 480}
    for path, budget in expected.items():
        job = prepare_grow(GrowConfig(dataset=str(path), device="cpu"), tmp_path / path.stem)
        assert job.max_params == budget
        assert job.notices == [f"no --max-params: the budget is {budget:,} parameters (the larger of "
                               f"{USER_PARAMS_PER_SAMPLE} per training sample and a hidden layer of {USER_MIN_WIDTH} "
                               "units; pass --max-params to change it)"]
    given = prepare_grow(GrowConfig(dataset=str(few), max_params=50, device="cpu"), tmp_path / "given")
    assert given.max_params == 50 and given.notices == []
    assert prepare_grow(GrowConfig(device="cpu"), tmp_path / "digits").notices == []  # its own default
