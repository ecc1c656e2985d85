"""The README's Python API example runs as written (a fresh interpreter, in a temporary directory) and
does what it says: a fitted classifier, an export directory the torch-free runtime loads by feature
name, and a Pipeline scored by cross_val_score."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tinydeploy.serving.runtime import OnnxModel

REPO = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.DOTALL)


def test_the_python_api_example_runs(tmp_path: Path) -> None:
    (block,) = readme_python_blocks()
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    fitted, scored = done.stdout.splitlines()
    match = re.fullmatch(r"\[(\d+), (\d+)\] (\d+) test accuracy (0\.\d+)", fitted)
    assert match and float(match.group(4)) > 0.85, fitted
    folds = [float(f) for f in re.fullmatch(r"3-fold accuracy \[(.*)\]", scored).group(1).split()]
    assert len(folds) == 3 and min(folds) > 0.85, scored
    model = OnnxModel(tmp_path / "runs" / "cancer" / "artifacts")
    assert len(model.feature_names) == 30 and model.feature_names[0] == "mean radius"
    assert (tmp_path / "runs" / "cancer" / "metrics.json").is_file()
