"""Files on disk as a new user meets them: exports readable by the server's user, a file it cannot read
named in one line, ``grow --force`` leaving no stale export, ``export`` refusing to replace an export
without ``--force``, an interrupted run exported with a warning and its status, and ``--seeds``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from export_fixtures import trained_run  # noqa: F401
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.export.pipeline import export_run
from tinydeploy.serving.manifest import read_manifest
from tinydeploy.serving.server import create_app
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import prepare_grow

NOBODY = 65534
TINY = ["--dataset", "moons", "--max-growth-epochs", "0.5", "--final-epochs", "0.5", "--threads", "1",
        "--device", "cpu"]


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="tinydeploy-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_user(uid: int, target: Callable[[], Any]) -> tuple[int, str]:
    """Run ``target`` in a forked child that has become user ``uid``: (exit code, its last message)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(read)
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            message = str(target())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message, code = f"{type(exc).__name__}: {exc}", 1
        os.write(write, message.encode()[:8000])
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def _serve_once(directory: Path) -> str:
    app_ = create_app(directory, "cpu", 8)  # loads, verifies every hash and runs the model once
    return f"serving {app_.model.model_path.name}"


def test_exported_files_are_readable_by_the_server_user(trained_run: Path, shared_dir: Path, usual_umask) -> None:
    out = export_run(trained_run, shared_dir / "export", formats=("onnx",)).out_dir
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {name: 0o644 for name in modes} and "model.safetensors" in modes, modes
    if os.geteuid() != 0:
        pytest.skip("running the server as another user needs root")
    code, message = as_user(NOBODY, lambda: _serve_once(out))
    assert (code, message) == (0, "serving model.onnx")


def test_a_file_the_server_cannot_read_is_named_in_one_line(trained_run: Path, shared_dir: Path, usual_umask) -> None:
    if os.geteuid() != 0:
        pytest.skip("a file unreadable by another user needs root to set up")
    out = export_run(trained_run, shared_dir / "export", formats=("onnx",)).out_dir
    (out / "model.onnx").chmod(0o600)
    code, message = as_user(NOBODY, lambda: _serve_once(out))
    assert code == 1 and message == (
        f"Unreadable: cannot read {out / 'model.onnx'}: permission denied for user nobody; make the directory readable "
        f"by that user (chmod -R a+rX {out})")


def test_grow_force_leaves_no_stale_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("grow", *TINY, "--out", run).exit_code == 0
    assert cli("export", run, "--onnx").exit_code == 0
    old = read_manifest(run / "artifacts")["files"]["model.safetensors"]["sha256"]
    regrown = cli("grow", *TINY, "--seed", "1", "--out", run, "--force")
    assert regrown.exit_code == 0, regrown.stderr
    assert not (run / "artifacts").exists()  # verify can no longer pass the old model beside the new run
    assert cli("export", run, "--onnx").exit_code == 0
    assert read_manifest(run / "artifacts")["files"]["model.safetensors"]["sha256"] != old


def test_grow_force_refuses_an_artifacts_folder_no_export_wrote(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)
    (run / "artifacts" / "notes.txt").write_text("mine")
    refused = cli("grow", *TINY, "--out", run, "--force")
    assert refused.exit_code == 2 and refused.stderr.strip() == (
        f"error: --force over {run}: {run / 'artifacts'} holds files but no manifest.json, so no tinydeploy export "
        "wrote it; --force removes only what a run owns (its files, checkpoints and exports): move it out or pass a "
        "new --out")
    assert sorted(p.name for p in run.rglob("*")) == ["artifacts", "notes.txt"]


def test_second_export_is_refused_without_force_and_replaces_whole_with_it(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    first = cli("export", trained_run, "--onnx", "--torchscript", "--out", out)
    assert first.exit_code == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = cli("export", trained_run, "--onnx", "--out", out)
    assert again.exit_code == 2 and again.stderr.startswith(f"error: {out} already holds an export (arch.json, ")
    assert again.stderr.rstrip().endswith("pass --force to replace it whole (files this export does not write are "
                                          "removed), or choose another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing deleted
    forced = cli("export", trained_run, "--onnx", "--out", out, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert not (out / "model.ts").exists() and "model.ts" not in read_manifest(out)["files"]


def test_an_interrupted_run_exports_with_a_warning_and_its_status(tmp_path: Path) -> None:
    job = prepare_grow(GrowConfig(dataset="moons", max_growth_epochs=2, final_epochs=2, threads=1, device="cpu"),
                       tmp_path / "run")
    result = job.run(lambda progress: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C at the first report
    assert result.metrics["status"] == "interrupted"
    exported = cli("export", tmp_path / "run", "--onnx")
    assert exported.exit_code == 0, exported.stderr
    epochs = result.metrics["epochs"]
    assert f"warning: the run in {tmp_path / 'run'} is interrupted at epoch {epochs:g}: this exports its last " \
           "checkpoint, not a finished model; finish it with 'tinydeploy grow --resume" in " ".join(exported.stderr.split())
    assert "[run status: interrupted]" in exported.stdout
    assert read_manifest(tmp_path / "run" / "artifacts")["run_status"] == "interrupted"


def test_seeds_keep_the_best_on_validation_and_report_the_spread(tmp_path: Path) -> None:
    out = tmp_path / "run"
    grown = cli("grow", *TINY, "--seeds", "3", "--seed", "4", "--out", out)
    assert grown.exit_code == 0, grown.stderr
    report = json.loads((out / "seeds.json").read_text())
    runs = {row["seed"]: row for row in report["runs"]}
    assert sorted(runs) == [4, 5, 6] and all((out / "seeds" / f"seed-{s}" / "metrics.json").is_file() for s in runs)
    best = max(runs.values(), key=lambda row: (row["val_accuracy"], -row["val_loss"]))
    assert report["kept"] == best["seed"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == best["seed"] and metrics["seeds"]["kept"] == best["seed"]
    accuracies = [row["test_accuracy"] for row in runs.values()]
    spread = report["spread"]["test_accuracy"]
    assert spread["min"] == min(accuracies) and spread["max"] == max(accuracies)
    assert f"test accuracy over 3 seeds: {spread['mean']:.4f} +- {spread['std']:.4f}" in grown.stdout
    assert cli("export", out, "--onnx").exit_code == 0
