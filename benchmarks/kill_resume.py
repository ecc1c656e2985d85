"""Kill and resume: ``tinydeploy grow`` killed with SIGKILL at random moments, resumed with
``tinydeploy grow --resume``, against the same grow left alone (real CLI processes, default options).

For each dataset: one uninterrupted run; then one run killed ``--kills`` times, each time at a moment
drawn uniformly within the uninterrupted run's duration after the time its imports took (so the
kill lands in the grow itself), and resumed after each kill; the last resume runs
to the end. Reported: max |difference| of the final weights (0 means bit-identical), whether widths,
growth log, history and metrics (wall times excepted) are equal, and where each kill landed.

Usage:
    .venv/bin/python benchmarks/kill_resume.py                 # digits and mnist1d, 3 kills each
    .venv/bin/python benchmarks/kill_resume.py --datasets digits --kills 5 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import Report, machine_info  # noqa: E402

from tinydeploy.training.rundir import COMMIT_LOG, read_commits, read_run  # noqa: E402

NAME = "kill_resume"
WALL_CLOCK = ("wall_time_s", "command")


def tinydeploy(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    return subprocess.Popen([sys.executable, "-m", "tinydeploy", "grow", *args], env=env, cwd=BENCH.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_first_commit(out: Path, process: subprocess.Popen) -> float:
    """Wait until the run has committed its first checkpoint; returns the time it did."""
    while process.poll() is None:
        if (out / COMMIT_LOG).is_file() and read_commits(out):
            return time.perf_counter()
        time.sleep(0.02)
    return time.perf_counter()


def compare(a: Path, b: Path) -> dict[str, Any]:
    ra, rb = read_run(a), read_run(b)
    sa, sb = ra.model.state_dict(), rb.model.state_dict()
    strip = lambda m: {k: v for k, v in m.items() if k not in WALL_CLOCK}  # noqa: E731
    return {
        "max_abs_diff": max(float((sa[k] - sb[k]).abs().max()) for k in sa) if sa.keys() == sb.keys() else None,
        "widths": [ra.spec.hidden_widths, rb.spec.hidden_widths],
        "growth_log_equal": ra.growth_log == rb.growth_log,
        "history_equal": ra.metrics["history"] == rb.metrics["history"],
        "metrics_equal": strip(ra.metrics) == strip(rb.metrics),
        "test_accuracy": ra.metrics["metrics"]["test"]["accuracy"],
    }


def one_dataset(dataset: str, kills: int, rng: random.Random, tmp: Path) -> dict[str, Any]:
    flags = ["--dataset", dataset, "--arch", "mlp", "--device", "cpu"]
    reference, killed = tmp / f"{dataset}-reference", tmp / f"{dataset}-killed"
    launched = time.perf_counter()
    process = tinydeploy([*flags, "--out", str(reference)])
    started = wait_for_first_commit(reference, process)
    assert process.wait() == 0, "the uninterrupted run failed"
    startup, duration = started - launched, time.perf_counter() - started
    landed = []
    process = tinydeploy([*flags, "--out", str(killed)])
    for _ in range(kills):
        time.sleep(startup + rng.uniform(0.05, 0.6) * duration)  # a moment within the grow, after the imports
        if process.poll() is not None:
            break  # it finished before the kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not (killed / COMMIT_LOG).is_file():  # killed before its first checkpoint: nothing to resume
            landed.append({"generation": None, "epoch": None, "widths": None})
            process = tinydeploy([*flags, "--out", str(killed), "--force"])
            continue
        last = read_commits(killed)[-1]
        landed.append({"generation": last["generation"], "epoch": last["epoch"], "widths": last["widths"]})
        print(f"{dataset}: killed, last checkpoint {landed[-1]}", flush=True)
        process = tinydeploy(["--resume", str(killed)])
    assert process.wait() == 0, "the last resume failed"
    return {"dataset": dataset, "startup_s": startup, "duration_s": duration, "kills": landed,
            **compare(reference, killed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = Report(NAME, "Kill (SIGKILL) and resume against an uninterrupted grow")
    rng = random.Random(args.seed)
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            r = one_dataset(dataset, args.kills, rng, Path(tmp))
            records.append(r)
            rows.append([dataset, f"{r['duration_s']:.1f}", len(r["kills"]),
                         "; ".join(f"epoch {k['epoch']} {k['widths']}" for k in r["kills"]),
                         f"{r['max_abs_diff']:.1e}" if r["max_abs_diff"] else "0", str(r["widths"][1]),
                         r["growth_log_equal"], r["history_equal"], r["metrics_equal"]])
    report.table("Resumed after SIGKILL vs uninterrupted", ["dataset", "run s", "kills", "last checkpoint at each kill",
                                                           "max abs diff", "widths", "log equal", "history equal",
                                                           "metrics equal"], rows,
                 note=("Default options, CPU, real CLI processes; each kill is SIGKILL at a random moment of the run, "
                       "followed by 'tinydeploy grow --resume'. 'metrics equal' compares metrics.json without "
                       "wall times and the command line."))
    report.write({"kills": args.kills, "seed": args.seed, "records": records}, machine_info())


if __name__ == "__main__":
    main()
