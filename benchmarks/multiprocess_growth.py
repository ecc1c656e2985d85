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
from common import Report, fmt_pm, machine_info  # noqa: E402

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
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more grow options")
    args = parser.parse_args()
    flags = ["--dataset", args.dataset, "--arch", "mlp", "--device", "cpu", *args.extra]
    report = Report(NAME, f"Multi-process growth on {args.dataset} (gloo, CPU)")
    records, rows = [], []
    runs = [("1 process", [])] + [(f"--nproc {n}", ["--nproc", str(n)]) for n in args.nprocs]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, extra in runs:
                out = Path(tmp) / f"{label.replace(' ', '_')}-{seed}"
                r = {"label": label, "seed": seed, **grow([*flags, "--seed", str(seed), *extra], out)}
                records.append(r)
                rows.append([seed, label, f"{r['job_s']:.1f}", f"{r['training_s']:.1f}", f"{r['growth_s']:.1f}",
                             f"{r['command_s']:.1f}", str(r["widths"]), f"{r['params']:,}", r["growth_events"],
                             f"{100 * r['test_accuracy']:.2f}"])
                print(rows[-1], flush=True)
    report.table("One process vs N processes (same global batch)",
                 ["seed", "run", "job s", "training s", "growth s", "command s", "widths", "params", "growth events",
                  "test %"], rows,
                 note=(f"Options: {' '.join(flags)} --seed S. 'job s' is the grow's own wall time (metrics.json); "
                       "'command s' adds interpreter start, imports and torchrun. Every process uses one CPU thread "
                       "(compact budget)."))
    summary = []
    for label, _ in runs:
        mine = [r for r in records if r["label"] == label]
        summary.append([label, fmt_pm([r["job_s"] for r in mine]), fmt_pm([r["params"] for r in mine], digits=0),
                        fmt_pm([r["test_accuracy"] for r in mine], 100, 2)])
    report.table(f"Mean ± std over seeds {args.seeds}", ["run", "job s", "params", "test %"], summary)
    report.write({"flags": flags, "seeds": args.seeds, "records": records}, machine_info())


if __name__ == "__main__":
    main()
