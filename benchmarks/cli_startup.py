"""CLI start-up as a new user meets it, for several versions of the code side by side (issue 12).

Each version runs from its own source tree with the same interpreter (``PYTHONPATH``): this checkout,
and every ``--other`` tree (e.g. ``git archive 4c82eb2^ | tar -x -C /tmp/before``, the commit before
the lazy CLI). Each version grows a tiny digits run (half an epoch of growth, half an epoch of final
training, one thread) and exports it to ONNX with its own code; then, alternating between versions
``--runs`` times, the script measures the wall time of

* ``tinydeploy --help``, and
* ``tinydeploy predict EXPORT --input rows.csv`` on the first 5 rows of digits (CSV, no header),

each a fresh interpreter (what the console script does: ``from cli.main import main``). Medians,
minima and maxima are reported: the machine is shared, so only ratios within one run mean much.

Usage:
    .venv/bin/python benchmarks/cli_startup.py --other before=/tmp/before --other main=/work/main
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_DIR, Report, machine_info

GROW = ["grow", "--dataset", "digits", "--max-growth-epochs", "0.5", "--final-epochs", "0.5", "--threads", "1",
        "--device", "cpu"]
ENTRY = "import sys; from cli.main import main; sys.argv = ['tinydeploy', *sys.argv[1:]]; sys.exit(main())"


def tinydeploy(source: Path, *args: str) -> float:
    """Run the CLI of the code in ``source`` with ``args``; its wall time in seconds (raises on failure)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ENTRY, *args], env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, cwd=source, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"tinydeploy {' '.join(args)} failed with the code in {source}:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", action="append", default=[], metavar="NAME=DIR",
                        help="Another source tree to measure (repeatable).")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    versions = {"this checkout": BENCH_DIR.parent}
    for item in args.other:
        name, _, directory = item.partition("=")
        versions[name] = Path(directory).resolve()
    report = Report("cli_startup", "CLI start-up: tinydeploy --help and predict on 5 rows")
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        work = Path(tmp)
        from sklearn.datasets import load_digits

        rows = work / "rows.csv"
        rows.write_text("\n".join(",".join(f"{v:g}" for v in row) for row in load_digits().data[:5]) + "\n")
        for i, source in enumerate(versions.values()):
            tinydeploy(source, *GROW, "--out", str(work / f"run{i}"))
            tinydeploy(source, "export", str(work / f"run{i}"), "--onnx")
        times: dict[tuple[str, str], list[float]] = {(v, w): [] for v in versions for w in ("help", "predict")}
        for _ in range(args.runs):
            for i, (name, source) in enumerate(versions.items()):
                times[(name, "help")].append(tinydeploy(source, "--help"))
                times[(name, "predict")].append(
                    tinydeploy(source, "predict", str(work / f"run{i}" / "artifacts"), "--input", str(rows)))
    first = next(iter(versions))
    rows_out = []
    for what, command in (("help", "tinydeploy --help"), ("predict", "tinydeploy predict (5 rows)")):
        base = statistics.median(times[(first, what)])
        for name in versions:
            ts = times[(name, what)]
            rows_out.append([command, name, f"{statistics.median(ts):.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}",
                             f"{statistics.median(ts) / base:.1f}x"])
    report.table(f"wall time in seconds, median of {args.runs} (alternating versions)",
                 ["command", "code", "median s", "min s", "max s", f"vs {first}"], rows_out)
    report.write({"versions": {k: str(v) for k, v in versions.items()},
                  "times_s": {f"{v} / {w}": ts for (v, w), ts in times.items()}}, machine)


if __name__ == "__main__":
    main()
