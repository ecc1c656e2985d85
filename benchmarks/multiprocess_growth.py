"""Growth on several processes: ``tinydeploy grow --nproc N`` (torchrun, gloo on CPU) against one process.

Rows: one process (plain ``tinydeploy grow``), ``--nproc 1`` (torchrun + DDP with a single process:
the cost of the machinery alone) and ``--nproc 2``; same options otherwise, so the same global batch.
Reported: the job's own wall time (metrics.json), the command's wall time (imports and torchrun
included), widths, params and test accuracy.

Usage:
    .venv/bin/python benchmarks/multiprocess_growth.py                         # mnist1d, defaults
    .venv/bin/python benchmarks/multiprocess_growth.py --dataset digits --nprocs 1 2 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import Report, machine_info  # noqa: E402

from tinydeploy.training.rundir import read_run  # noqa: E402

NAME = "multiprocess_growth"


def grow(args: list[str], out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tinydeploy", "grow", *args, "--out", str(out)], env=env, check=True,
                   cwd=BENCH.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command = time.perf_counter() - start
    m = read_run(out).metrics
    return {"command_s": command, "job_s": m["wall_time_s"]["total"], "training_s": m["wall_time_s"]["training"],
            "growth_s": m["wall_time_s"]["growth"], "widths": m["final_widths"], "params": m["params"],
            "processes": m.get("processes", 1), "test_accuracy": m["metrics"]["test"]["accuracy"],
            "growth_events": m["growth_events"], "epochs": m["epochs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more grow options")
    args = parser.parse_args()
    flags = ["--dataset", args.dataset, "--device", "cpu", *args.extra]
    report = Report(NAME, f"Multi-process growth on {args.dataset} (gloo, CPU)")
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("1 process", [])] + [(f"--nproc {n}", ["--nproc", str(n)]) for n in args.nprocs]
        for label, extra in runs:
            r = {"label": label, **grow([*flags, *extra], Path(tmp) / label.replace(" ", "_"))}
            records.append(r)
            rows.append([label, f"{r['job_s']:.1f}", f"{r['training_s']:.1f}", f"{r['growth_s']:.1f}",
                         f"{r['command_s']:.1f}", str(r["widths"]), f"{r['params']:,}", r["growth_events"],
                         f"{100 * r['test_accuracy']:.2f}"])
            print(rows[-1], flush=True)
    report.table("One process vs N processes (same global batch)",
                 ["run", "job s", "training s", "growth s", "command s", "widths", "params", "growth events",
                  "test %"], rows,
                 note=(f"Options: {' '.join(flags)}. 'job s' is the grow's own wall time (metrics.json); 'command s' "
                       "adds interpreter start, imports and torchrun. Every process uses one CPU thread here "
                       "(compact budget)."))
    report.write({"flags": flags, "records": records}, machine_info())


if __name__ == "__main__":
    main()
