"""Exactly one onnxruntime wheel: the `cpu` / `gpu` extras, the refusal of both, and a clear error
(with nothing written) where neither is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinydeploy.serving.providers import MISSING_WHEEL, WHEELS, installed_wheels, wheel_conflict

REPO = Path(__file__).resolve().parents[1]

#: Runs the CLI where ``import onnxruntime`` fails as it does without the wheel (the module spec is
#: found, as torch's optional-dependency probes expect, but loading it raises ModuleNotFoundError).
_WITHOUT_ONNXRUNTIME = """
import importlib.abc, importlib.machinery, sys
class Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named '{spec.name}'", name=spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            return importlib.machinery.ModuleSpec(name, Absent())
sys.meta_path.insert(0, Block())
from cli.main import main
sys.argv = ["tinydeploy", *sys.argv[1:]]
main()
"""


def test_both_wheels_are_refused_with_the_commands_that_fix_it() -> None:
    assert wheel_conflict({"onnxruntime-gpu", "numpy", "onnxruntime"}) == (
        "both onnxruntime and onnxruntime-gpu are installed and overwrite each other's files: "
        "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'tinydeploy[cpu]' or 'tinydeploy[gpu]'"
    )


@pytest.mark.parametrize("installed", [set(), {"onnxruntime"}, {"onnxruntime-gpu"}, {"onnxruntime-gpu", "onnx"}])
def test_one_wheel_or_none_is_no_conflict(installed: set[str]) -> None:
    assert wheel_conflict(installed) is None


def test_this_environment_has_exactly_one_wheel() -> None:
    assert len(installed_wheels()) == 1


def test_the_extras_install_one_wheel_each_and_the_base_neither() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def wheels(requirements: list[str]) -> list[str]:
        names = (r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for r in requirements)
        return [n for n in names if n in WHEELS]

    extras = project["optional-dependencies"]
    assert wheels(project["dependencies"]) == []
    assert {extra: wheels(extras[extra]) for extra in WHEELS.values()} == {"cpu": ["onnxruntime"],
                                                                            "gpu": ["onnxruntime-gpu"]}
    assert [extra for extra, reqs in extras.items() if extra not in WHEELS.values() and wheels(reqs)] == []


def test_without_onnxruntime_grow_works_and_export_names_the_extra(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_ONNXRUNTIME, *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    run = tmp_path / "run"
    grown = cli("grow", "--dataset", "moons", "--max-growth-epochs", "1", "--final-epochs", "1", "--out", str(run))
    assert grown.returncode == 0, grown.stderr
    files = sorted(run.rglob("*"))
    exported = cli("export", str(run), "--onnx")
    assert (exported.returncode, exported.stderr) == (2, f"error: {MISSING_WHEEL}\n")
    assert sorted(run.rglob("*")) == files  # no artifacts directory, nothing half-written
