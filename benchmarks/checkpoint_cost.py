"""Share of a grow's wall time spent writing its run directory (checkpoints, logs, final files).

Each case runs one grow in a fresh process, in-process timing wrappers around the job's ``checkpoint``
(which evaluates the metrics it writes and commits a generation) and, where the code has them, the
run directory's log appends and final ``publish``. With ``--baseline REF`` the same measurement runs
side by side on a snapshot of git ``REF`` (``git archive``: read-only), e.g. ``main``, which rewrote
the whole run directory (history included) after every growth step.

Cases:
- ``digits``: the default ``tinydeploy grow`` (digits, 3,000-parameter budget).
- ``mnist1d-long``: ``--dataset mnist1d --grow-every 0.05 --max-growth-epochs E --max-params 15000
  --patience 1000`` (issue 15's 300-epoch grow with E = 300; ``--epochs`` shortens it).

Usage:
    .venv/bin/python benchmarks/checkpoint_cost.py --baseline main
    .venv/bin/python benchmarks/checkpoint_cost.py --cases mnist1d-long --epochs 300 --tag mnist1d_300
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import snapshot  # noqa: E402

NAME = "checkpoint_cost"
CASES = ("digits", "mnist1d-long")


def config(case: str, epochs: float) -> dict[str, Any]:
    if case == "digits":
        return {"device": "cpu"}
    return {"dataset": "mnist1d", "arch": "mlp", "device": "cpu", "grow_every": 0.05, "max_growth_epochs": epochs,
            "max_params": 15000, "patience": 1000}


def measure(case: str, epochs: float) -> dict[str, Any]:
    """One grow with the run-directory writes timed (runs in the process of the code under test)."""
    import tinydeploy
    from tinydeploy.training import job as job_module
    from tinydeploy.training.config import GrowConfig

    spent = {"seconds": 0.0, "checkpoints": 0}

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start
        return wrapper

    try:
        from tinydeploy.training.rundir import RunWriter
        RunWriter.append = timed(RunWriter.append)
        RunWriter.publish = timed(RunWriter.publish)
    except ImportError:
        pass
    checkpoint = job_module.GrowJob.checkpoint

    def counted(self, *args, **kwargs):
        spent["checkpoints"] += 1
        return checkpoint(self, *args, **kwargs)

    job_module.GrowJob.checkpoint = timed(counted)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = job_module.run_grow(GrowConfig(**config(case, epochs)), Path(tmp) / "run")
        wall = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (Path(tmp) / "run").rglob("*") if p.is_file())
    m = result.metrics
    loop = m["wall_time_s"]["total"]  # the job's own wall time (imports and data loading excluded)
    return {"case": case, "code": str(Path(tinydeploy.__file__).parent), "wall_s": loop, "call_s": wall,
            "rundir_s": spent["seconds"], "share": spent["seconds"] / loop, "training_s": m["wall_time_s"]["training"],
            "growth_s": m["wall_time_s"]["growth"], "checkpoints": spent["checkpoints"], "growth_steps": m.get("growth_steps"),
            "final_widths": m["final_widths"], "params": m["params"], "epochs": m["epochs"],
            "test_accuracy": m["metrics"]["test"]["accuracy"], "run_dir_bytes": size}


def run_case(root: Path, case: str, epochs: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, __file__, "--measure", case, "--epochs", str(epochs)], env=env,
                         capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--epochs", type=float, default=300.0, help="--max-growth-epochs of mnist1d-long")
    parser.add_argument("--baseline", help="git ref to measure side by side (e.g. main)")
    parser.add_argument("--tag", help="suffix of the results files (checkpoint_cost_TAG.json/.md)")
    parser.add_argument("--measure", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.epochs)))
        return

    from common import Report, machine_info

    report = Report(f"{NAME}_{args.tag}" if args.tag else NAME, "Run-directory writes: share of the grow's wall time")
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        roots = [("this tree", BENCH.parent)]
        if args.baseline:
            roots.append((args.baseline, snapshot(args.baseline, Path(tmp))))
        for case in args.cases:
            for label, root in roots:
                r = run_case(root, case, args.epochs)
                r["label"] = label
                records.append(r)
                rows.append([case, label, f"{r['wall_s']:.1f}", f"{r['rundir_s']:.2f}", f"{100 * r['share']:.1f}%",
                             r["checkpoints"], f"{1000 * r['rundir_s'] / max(r['checkpoints'], 1):.1f}",
                             str(r["final_widths"]), f"{r['params']:,}", f"{100 * r['test_accuracy']:.1f}",
                             f"{r['run_dir_bytes'] / 1024:.0f}"])
                print(rows[-1], flush=True)
    report.table("Run-directory writes", ["case", "code", "wall s", "run-dir s", "share", "writes",
                                          "ms per write", "widths", "params", "test %", "run dir KB"], rows,
                 note=(f"mnist1d-long: --max-growth-epochs {args.epochs:g}. 'wall s' is the job's own wall time "
                       "(metrics.json), 'run-dir s' every checkpoint (the metrics evaluated for it included), log "
                       "append and final write within it."))
    report.write({"epochs": args.epochs, "records": records}, machine_info())


if __name__ == "__main__":
    main()
