"""CNN growth quality: TINY-grown CNNs against the same architecture from scratch, a grid of fixed CNN
widths, and Random growth at equal parameters, on mnist5k and digits-as-images (1x8x8).

For each dataset and seed, on CPU with one torch thread, every run uses the default CNN recipe of
``tinydeploy grow --arch cnn`` (``tinydeploy.training.config.RECIPES["cnn"]``: Adam, random shifts,
constant learning rate while growing, cosine decay after; the same batch size, learning rate and
augmentation for every model) and the dataset's default budgets:

* ``TINY``: grown from width 1 (all growable layers) until a budget or ``patience`` idle steps stop it,
  then ``final_epochs`` of training;
* ``Random @ TINY params``: Random growth (Gaussian neurons, amplitude by line search) with the
  parameter budget set to what TINY ended with for that seed;
* ``FS (TINY arch)``: TINY's final widths trained from scratch;
* ``Fixed (c1, c2, h)``: a grid of fixed widths (conv block 1, conv block 2, hidden linear).

Every fixed architecture trains as many epochs as the TINY run of that seed (growth + final), with
``GrowConfig(init_widths=W, max_growth_epochs=0, final_epochs=E)``. The verdict line compares TINY
with the best fixed grid CNN that has no more parameters than TINY (mean over seeds).

Usage:
    .venv/bin/python benchmarks/cnn_growth.py                                   # full run
    .venv/bin/python benchmarks/cnn_growth.py --quick --seeds 0 --datasets digits  # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, fmt_int, fmt_pm, machine_info, mean_std, pyplot, results_path, save_figure  # noqa: E402

from tinydeploy.atomic import write_json  # noqa: E402
from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402

NAME = "cnn_growth"
RUNS_DIR = results_path("runs") / "cnn"
#: Fixed widths (conv block 1, conv block 2, hidden linear) per dataset.
GRIDS: dict[str, list[tuple[int, int, int]]] = {
    "mnist5k": [(4, 8, 8), (4, 8, 16), (6, 12, 16), (8, 16, 16), (8, 8, 32), (16, 16, 16), (8, 16, 32), (16, 32, 64)],
    "digits": [(4, 4, 8), (4, 8, 8), (6, 16, 8), (8, 8, 16), (8, 16, 16), (16, 32, 32)],
}


def run_one(dataset: str, seed: int, label: str, cfg: GrowConfig) -> dict[str, Any]:
    """One grow (or fixed training) job on CPU; the seed-0 run directories are kept under results/runs/cnn."""
    keep = seed == 0
    out = RUNS_DIR / f"{dataset}-{label.replace(' ', '_').replace('@', 'at')}-s{seed}" if keep else None
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        job = prepare_grow(cfg, out or Path(scratch) / "run", force=True)
        result = job.run()
        wall = time.perf_counter() - start
    m = result.metrics
    row = {"dataset": dataset, "seed": seed, "label": label, "widths": m["final_widths"], "params": m["params"],
           "macs": m["macs"], "test_accuracy": m["metrics"]["test"]["accuracy"], "epochs": m["epochs"],
           "wall_s": wall, "stop_reason": m["stop_reason"], "growth_events": m["growth_events"]}
    print(f"{dataset} seed {seed} {label:28s} widths {row['widths']} params {row['params']:>7,} "
          f"MACs {row['macs']:>9,} test {row['test_accuracy']:.4f} ({wall:.0f} s)", flush=True)
    return row


def config(dataset: str, seed: int, args, **fields: Any) -> GrowConfig:
    base = {"dataset": dataset, "arch": "cnn", "seed": seed, "device": "cpu", "threads": 1}
    if args.quick:
        base.update(max_growth_epochs=1.0, final_epochs=1.0)
    return GrowConfig(**{**base, **fields})


def run_dataset(dataset: str, args) -> list[dict[str, Any]]:
    rows = []
    tiny = {seed: run_one(dataset, seed, "TINY", config(dataset, seed, args)) for seed in args.seeds}
    rows += tiny.values()
    for seed in args.seeds:
        t = tiny[seed]
        fixed = {"max_growth_epochs": 0.0, "final_epochs": float(t["epochs"])}
        rows.append(run_one(dataset, seed, "Random @ TINY params",
                            config(dataset, seed, args, method="random", max_params=t["params"])))
        rows.append(run_one(dataset, seed, "FS (TINY arch)",
                            config(dataset, seed, args, init_widths=list(t["widths"]), **fixed)))
        grid = GRIDS[dataset][:2] if args.quick else GRIDS[dataset]
        for widths in grid:
            rows.append(run_one(dataset, seed, f"Fixed {widths}",
                                config(dataset, seed, args, init_widths=list(widths), **fixed)))
    return rows


def summary(rows: list[dict[str, Any]], dataset: str) -> tuple[list[list[str]], str]:
    labels = list(dict.fromkeys(r["label"] for r in rows if r["dataset"] == dataset))
    table, means = [], {}
    for label in labels:
        sel = [r for r in rows if r["dataset"] == dataset and r["label"] == label]
        acc = [r["test_accuracy"] for r in sel]
        means[label] = (mean_std(acc)[0], mean_std([r["params"] for r in sel])[0])
        widths = sel[0]["widths"] if len({tuple(r["widths"]) for r in sel}) == 1 else "per seed: " + "; ".join(
            str(r["widths"]) for r in sel)
        table.append([label, str(widths), fmt_pm(acc, 100), fmt_int(mean_std([r["params"] for r in sel])[0]),
                      fmt_int(mean_std([r["macs"] for r in sel])[0]), f"{mean_std([r['epochs'] for r in sel])[0]:.1f}",
                      f"{mean_std([r['wall_s'] for r in sel])[0]:.0f}"])
    tiny_acc, tiny_params = means["TINY"]
    fixed = {k: v for k, v in means.items() if k.startswith("Fixed") and v[1] <= tiny_params}
    if fixed:
        best = max(fixed, key=lambda k: fixed[k][0])
        verdict = (f"TINY {100 * tiny_acc:.2f}% with {tiny_params:,.0f} params vs best fixed grid CNN with no more "
                   f"params: {best} {100 * fixed[best][0]:.2f}% ({fixed[best][1]:,.0f} params): "
                   + ("TINY is at least as accurate." if tiny_acc >= fixed[best][0] else "TINY is below it."))
    else:
        verdict = "No fixed grid CNN has as few parameters as TINY."
    return table, verdict


def plot(rows: list[dict[str, Any]], datasets: list[str], name: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for label in dict.fromkeys(r["label"] for r in rows if r["dataset"] == dataset):
            sel = [r for r in rows if r["dataset"] == dataset and r["label"] == label]
            style = {"TINY": "o", "Random @ TINY params": "s", "FS (TINY arch)": "^"}.get(label, "x")
            ax.plot([r["params"] for r in sel], [100 * r["test_accuracy"] for r in sel], style,
                    label=label if style != "x" else None, color=None if style != "x" else "grey")
        ax.set(xscale="log", xlabel="parameters", ylabel="test accuracy %", title=dataset)
        ax.legend(fontsize=7)
    save_figure(fig, f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist5k,digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="1 growth + 1 final epoch, 2 grid widths (smoke test)")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    datasets = args.datasets.split(",")
    machine = machine_info()
    report = Report(args.name, "CNN growth on mnist5k and digits-as-images: TINY vs fixed widths vs Random")
    if RUNS_DIR.exists():
        shutil.rmtree(RUNS_DIR)
    rows: list[dict[str, Any]] = []
    partial = results_path(f"{args.name}.partial.json")
    for dataset in datasets:
        rows += run_dataset(dataset, args)
        write_json(partial, {"rows": rows})
        table, verdict = summary(rows, dataset)
        report.table(f"{dataset}: test accuracy (mean ± std over seeds {args.seeds})",
                     ["model", "widths (c1, c2, hidden)", "test acc %", "params", "MACs", "epochs", "wall s"],
                     table, note=verdict)
    plot(rows, datasets, args.name)
    report.write({"rows": rows, "settings": {"datasets": datasets, "seeds": args.seeds, "quick": args.quick}}, machine)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
