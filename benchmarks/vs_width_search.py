"""Growth against the width search a user would otherwise run (issue 15, item 1).

For each dataset and seed, in one process, one after the other, on CPU with one torch thread:

* ``grow``: one default ``tinydeploy grow`` (the dataset's default architecture, budget and recipe:
  an MLP for digits and moons, a 1-D CNN for mnist1d);
* ``FS``: the grown widths trained from scratch for the same number of epochs (the cost of training
  the final architecture, for the overhead ratio grow / FS);
* ``grid [w,w]``: each fixed width of ``--widths`` on every growable layer, trained with the same recipe
  for the same number of epochs as the grow of that seed
  (``GrowConfig(init_widths=[w,w], max_growth_epochs=0, final_epochs=E)``).

Reported side by side, per dataset: the grown net; the best fixed grid net with no more parameters
than the grown one (mean test accuracy over seeds); the grid's pick by validation accuracy (what a
user choosing among the grid would deploy, any size); the wall time of the grow against the whole
grid and against FS. With ``--repeats R`` each grow and FS job runs R times, alternating, and its
median time is the one reported (the jobs are deterministic: the runs must agree). Wall times are each
job's own (``prepare_grow`` + ``run``, data loading included) and its CPU time, measured in the same
run; on a shared machine the CPU-time ratios are the more reliable.

Usage:
    .venv/bin/python benchmarks/vs_width_search.py                      # digits 5 seeds, mnist1d + moons 3 seeds
    .venv/bin/python benchmarks/vs_width_search.py --datasets digits --seeds 0 --widths 8,32 --name smoke
    .venv/bin/python benchmarks/vs_width_search.py --from results/a.json,results/b.json   # one report of two runs
    .venv/bin/python benchmarks/vs_width_search.py --datasets mnist1d --repeats 3    # grow / FS from median times
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, fmt_int, fmt_pm, machine_info, mean_std, results_path  # noqa: E402

from tinydeploy.atomic import write_json  # noqa: E402
from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402

NAME = "vs_width_search"


def run_one(dataset: str, seed: int, label: str, cfg: GrowConfig) -> dict[str, Any]:
    """One grow or fixed-width job in a scratch run directory; its wall time includes preparing the data."""
    with tempfile.TemporaryDirectory() as scratch:
        start, cpu = time.perf_counter(), time.process_time()
        job = prepare_grow(cfg, Path(scratch) / "run")
        result = job.run()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    m = result.metrics
    row = {"dataset": dataset, "seed": seed, "label": label, "widths": m["final_widths"], "params": m["params"],
           "test_accuracy": m["metrics"]["test"]["accuracy"], "val_accuracy": m["metrics"]["val"]["accuracy"],
           "epochs": m["epochs"], "wall_s": wall, "cpu_s": cpu, "stop_reason": m["stop_reason"],
           "growth_events": m["growth_events"], "phases_s": m["wall_time_s"]}
    print(f"{dataset} seed {seed} {label:14s} widths {row['widths']!s:12s} params {row['params']:>7,} "
          f"test {100 * row['test_accuracy']:.1f}% val {100 * row['val_accuracy']:.1f}% epochs {row['epochs']:.1f} "
          f"stop {row['stop_reason']} ({wall:.1f} s wall, {cpu:.1f} s CPU)", flush=True)
    return row


def config(dataset: str, seed: int, **fields: Any) -> GrowConfig:
    return GrowConfig(**{"dataset": dataset, "seed": seed, "device": "cpu", "threads": 1, **fields})


def fixed(dataset: str, seed: int, widths: list[int], epochs: float) -> GrowConfig:
    """A fixed architecture trained with the grow recipe for ``epochs`` (no growth)."""
    return config(dataset, seed, init_widths=widths, max_growth_epochs=0.0, final_epochs=float(epochs),
                  max_params=10**9)


def warm_up(dataset: str) -> None:
    """A short grow, not reported: imports, first data loading and kernel warm-up are paid here, not by
    whichever job happens to run first."""
    with tempfile.TemporaryDirectory() as scratch:
        prepare_grow(config(dataset, 0, max_growth_epochs=0.5, final_epochs=0.5), Path(scratch) / "run").run()


def repeated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first of several runs of one deterministic job, with the median wall and CPU times of all of them
    (each run's in ``wall_runs_s`` / ``cpu_runs_s``); the runs must agree on what they trained."""
    first = runs[0]
    for r in runs[1:]:
        if (r["widths"], r["test_accuracy"]) != (first["widths"], first["test_accuracy"]):
            raise RuntimeError(f"{first['label']} seed {first['seed']}: repeated runs differ: {r['widths']} vs {first['widths']}")
    return {**first, "wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "wall_runs_s": [r["wall_s"] for r in runs], "cpu_runs_s": [r["cpu_s"] for r in runs]}


def grow_and_fs(dataset: str, seed: int, repeats: int) -> list[dict[str, Any]]:
    """The grow and FS jobs of one seed, run ``repeats`` times each, alternating (grow, FS, grow, FS, ...)
    so that both see the same state of a shared machine; their median times (``repeated``)."""
    grows, fss = [], []
    for _ in range(repeats):
        grows.append(run_one(dataset, seed, "grow", config(dataset, seed)))
        fss.append(run_one(dataset, seed, "FS", fixed(dataset, seed, list(grows[0]["widths"]), grows[0]["epochs"])))
    return [repeated(grows), repeated(fss)]


def run_dataset(dataset: str, seeds: list[int], widths: list[int], layers: int | None,
                repeats: int = 1) -> list[dict[str, Any]]:
    warm_up(dataset)
    rows = []
    for seed in seeds:
        grown, fs = grow_and_fs(dataset, seed, repeats)
        rows += [grown, fs]
        depth = layers or len(grown["widths"])
        for w in widths:
            rows.append(run_one(dataset, seed, f"grid [{','.join([str(w)] * depth)}]",
                                fixed(dataset, seed, [w] * depth, grown["epochs"])))
    return rows


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return mean_std([r[key] for r in rows])[0]


def summarise(rows: list[dict[str, Any]], dataset: str) -> dict[str, Any]:
    """The grown net vs the best fixed grid net at <= its params, the grid's pick by validation, wall times."""
    sel = [r for r in rows if r["dataset"] == dataset]
    labels = list(dict.fromkeys(r["label"] for r in sel))
    by = {label: [r for r in sel if r["label"] == label] for label in labels}
    grid = [label for label in labels if label.startswith("grid")]
    grown = by["grow"]
    seeds = sorted({r["seed"] for r in grown})
    grow_params = _mean(grown, "params")
    cheaper = [label for label in grid if _mean(by[label], "params") <= grow_params]
    best_cheaper = max(cheaper, key=lambda k: _mean(by[k], "test_accuracy")) if cheaper else None
    picks = [max((r for r in sel if r["label"] in grid and r["seed"] == s), key=lambda r: r["val_accuracy"])
             for s in seeds]
    def per_seed(key: str) -> dict[str, list[float]]:
        return {"grow": [r[key] for r in grown], "fs": [r[key] for r in by["FS"]],
                "grid": [sum(r[key] for r in sel if r["label"] in grid and r["seed"] == s) for s in seeds]}

    wall, cpu = per_seed("wall_s"), per_seed("cpu_s")
    return {
        "seeds": seeds,
        "grow": {"test_accuracy": _mean(grown, "test_accuracy"), "params": grow_params,
                 "test_accuracies": [r["test_accuracy"] for r in grown], "widths": [r["widths"] for r in grown]},
        "fs": {"test_accuracy": _mean(by["FS"], "test_accuracy")},
        "best_fixed_at_most_grown_params": None if best_cheaper is None else {
            "label": best_cheaper, "test_accuracy": _mean(by[best_cheaper], "test_accuracy"),
            "params": _mean(by[best_cheaper], "params")},
        "grid_pick_by_val": {"labels": [r["label"] for r in picks],
                             "test_accuracy": _mean(picks, "test_accuracy"), "params": _mean(picks, "params")},
        "wall_s": wall, "cpu_s": cpu,
        "grow_over_grid": mean_std([g / t for g, t in zip(wall["grow"], wall["grid"])])[0],
        "grow_over_fs": mean_std([g / f for g, f in zip(wall["grow"], wall["fs"])])[0],
        "grow_over_grid_cpu": mean_std([g / t for g, t in zip(cpu["grow"], cpu["grid"])])[0],
        "grow_over_fs_cpu": mean_std([g / f for g, f in zip(cpu["grow"], cpu["fs"])])[0],
        "table": [[label, fmt_pm([r["test_accuracy"] for r in by[label]], 100), fmt_int(_mean(by[label], "params")),
                   f"{_mean(by[label], 'epochs'):.1f}", f"{_mean(by[label], 'wall_s'):.1f}",
                   f"{_mean(by[label], 'cpu_s'):.1f}"] for label in labels],
    }


def main(argv: list[str] | None = None) -> int:
    global NAME
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,mnist1d,moons")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--digits-seeds", default="0,1,2,3,4", help="seeds for digits (the acceptance asks 5)")
    p.add_argument("--widths", default="4,8,16,32,64,128", help="fixed width w of each hidden layer")
    p.add_argument("--layers", type=int, default=None, help="growable layers of the grid nets (default: as many "
                   "as the grown net, e.g. 2 hidden layers of the MLP, 2 conv blocks + 1 hidden layer of the CNN)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each grow and FS job (alternating); their "
                   "median times are reported (the grid jobs run once)")
    p.add_argument("--name", default=NAME, help="results file stem")
    p.add_argument("--from", dest="sources", help="comma-separated results JSON files (their 'rows') to "
                   "report together instead of running, e.g. two runs of different datasets")
    args = p.parse_args(argv)
    NAME = args.name
    torch.set_num_threads(1)
    datasets = [d for d in args.datasets.split(",") if d]
    widths = [int(w) for w in args.widths.split(",") if w]
    machine = machine_info()
    report = Report(NAME, "Growth vs the width search a user would otherwise run")
    rows: list[dict[str, Any]] = []
    summaries: dict[str, Any] = {}
    sources = [Path(f) for f in (args.sources or "").split(",") if f]
    if sources:
        rows = [r for f in sources for r in json.loads(f.read_text())["rows"]]
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        widths = sorted({r["widths"][0] for r in rows if r["label"].startswith("grid")})
    for dataset in datasets:
        seeds = [int(s) for s in (args.digits_seeds if dataset == "digits" else args.seeds).split(",") if s]
        if sources:
            seeds = sorted({r["seed"] for r in rows if r["dataset"] == dataset})
        else:
            rows += run_dataset(dataset, seeds, widths, args.layers, args.repeats)
            write_json(results_path(f"{NAME}.partial.json"), {"rows": rows})
        s = summaries[dataset] = summarise(rows, dataset)
        report.table(f"{dataset}: seeds {','.join(map(str, seeds))}",
                     ["net", "test acc %", "params", "epochs", "wall s (mean)", "CPU s (mean)"], s.pop("table"))
    head = ["dataset", "grown: test %", "params", "best fixed <= grown params", "its test %",
            "grid pick by val: test %", "its params", "grow / grid (wall; CPU)", "grow / FS (wall; CPU)"]
    body = []
    for dataset, s in summaries.items():
        best = s["best_fixed_at_most_grown_params"]
        body.append([dataset, f"{100 * s['grow']['test_accuracy']:.2f}", fmt_int(s["grow"]["params"]),
                     best["label"] if best else "none", f"{100 * best['test_accuracy']:.2f}" if best else "-",
                     f"{100 * s['grid_pick_by_val']['test_accuracy']:.2f}", fmt_int(s["grid_pick_by_val"]["params"]),
                     f"{s['grow_over_grid']:.2f}; {s['grow_over_grid_cpu']:.2f}",
                     f"{s['grow_over_fs']:.2f}; {s['grow_over_fs_cpu']:.2f}"])
    report.table("Summary: one grow vs the grid", head, body, note=(
        "Means over seeds. 'best fixed <= grown params': the grid net with the best mean test accuracy among "
        "those with no more mean params than the grown nets. 'grid pick by val': per seed, the grid net with the "
        "best validation accuracy (any size). 'grow / grid': per seed, the grow's time over the sum of the grid's, "
        "averaged; 'grow / FS': over training the grown widths from scratch for the same epochs. Wall time and "
        "the process's CPU time (less sensitive to other users of the shared cores) of each job. "
        f"Grid widths {widths} on each growable layer of the default architecture; default recipe and budgets; 1 torch thread."))
    report.write({"settings": vars(args), "sources": [str(f) for f in sources], "summary": summaries, "rows": rows},
                 machine)
    results_path(f"{NAME}.partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
