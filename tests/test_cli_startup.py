"""Start-up of the CLI: commands load lazily, and the torch-free commands run where torch cannot be imported."""

from __future__ import annotations

import importlib
import inspect
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from serving_fixtures import export_dir, exported, trained_run  # noqa: F401

from cli.app import COMMANDS, app

REPO = Path(__file__).resolve().parents[1]

#: Runs the tinydeploy CLI (argv after the script) in an interpreter where importing torch,
#: torchvision or scikit-learn raises; prints the heavy modules that got imported anyway.
_BLOCKED_CLI = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "sklearn"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.argv = ["tinydeploy", *sys.argv[1:]]
import atexit
heavy = {"torch", "onnxruntime", "numpy"}
atexit.register(lambda: print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)), file=sys.stderr))
from cli.main import main
main()
"""


def blocked(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_CLI, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def heavy_modules(done: subprocess.CompletedProcess[str]) -> list[str]:
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_help_lists_every_command_without_importing_torch_or_onnxruntime() -> None:
    done = blocked("--help")
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert f" {name} " in done.stdout
    assert heavy_modules(done) == []


def test_the_command_table_matches_the_registered_commands() -> None:
    """``tinydeploy --help`` shows COMMANDS without importing the modules: it must say what they register."""
    modules = sorted(p.stem for p in (REPO / "cli").glob("*.py") if p.stem not in ("__init__", "__main__", "main"))
    for module in modules:  # every command module, so that a command missing from COMMANDS is caught
        importlib.import_module(f"cli.{module}")
    registered = {(info.name or info.callback.__name__): info for info in app.registered_commands}
    assert set(registered) == set(COMMANDS)
    for name, (module, short_help) in COMMANDS.items():
        callback = registered[name].callback
        assert callback.__module__ == module
        assert inspect.getdoc(callback).splitlines()[0] == short_help


def test_unknown_commands_suggest_close_ones() -> None:
    done = blocked("exprot", "--help")
    assert done.returncode == 2 and "No such command 'exprot'. Did you mean 'export'?" in done.stderr


def test_torch_free_commands_run_without_torch(export_dir: Path, tmp_path: Path) -> None:
    rows = tmp_path / "x.csv"
    rows.write_text("".join(",".join("0" for _ in range(64)) + "\n" for _ in range(5)))
    predict = blocked("predict", export_dir, "-i", rows, "--provider", "cpu")
    assert predict.returncode == 0, predict.stderr
    assert len(predict.stdout.splitlines()) == 6 and heavy_modules(predict) == ["numpy", "onnxruntime"]
    verify = blocked("verify", export_dir, "--hashes-only")
    assert verify.returncode == 0 and "manifest hashes match (4 artifacts, none loaded)" in verify.stdout
    assert "torch" not in heavy_modules(verify)
    report = blocked("report", export_dir)
    assert report.returncode == 0 and report.stdout.startswith("Width report: digits")
    for command in ("serve", "predict", "verify", "report", "bench"):
        shown = blocked(command, "--help")
        assert shown.returncode == 0 and "torch" not in heavy_modules(shown), command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_and_answers_without_torch(export_dir: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BLOCKED_CLI,
            "serve",
            str(export_dir),
            "--port",
            str(port),
            "--provider",
            "cpu",
            "--max-batch",
            "8",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.05)
        assert health.json()["status"] == "ok"
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": np.zeros(64).tolist()})
        assert answer.status_code == 200 and len(answer.json()["labels"]) == 1
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert json.loads(err.strip().splitlines()[-1]) == ["numpy", "onnxruntime"]
