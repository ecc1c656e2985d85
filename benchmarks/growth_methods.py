"""Growth methods compared: TINY vs GradMax vs NORTH-pre vs Growing by Folding vs Random.

Every method grows the same network under the same schedule and parameter budget, so that only the
way neurons are chosen differs:

* a shallow ReLU MLP (one hidden layer: the only kind Folding grows), starting at width
  ``--init-width`` (default 2, the folding talk's 2-2-2 start);
* the default MLP recipe (``tinydeploy.training.config.RECIPES["mlp"]``: a growth step at
  initialisation and then every 0.25 epoch for at most 40 epochs, then 60 epochs with cosine decay;
  Adam, batch 16; ``--growth-epochs`` / ``--final-epochs`` shorten both for every method alike) and each
  dataset's default parameter budget and input noise;
* each method's own rule for how many neurons a step adds (TINY: its significance test; GradMax: the
  same test on its eigenvalues; NORTH: its activation-orthogonality trigger; Folding: one fold per
  step; Random: the budget), all capped at 16 per step and by the budget; growth stops after 8 steps
  in a row without a neuron.

Measured per run: test accuracy, parameters, hidden width, linear regions (distinct ReLU activation
patterns on a 200 x 200 grid over the training inputs' box, 2-D datasets only), wall time, and
neurons whose fan-in is still exactly 0 at the end. On the 2-D datasets two references at Folding's
final width: the same network freshly initialised ("random init", before any training) and trained
from that initialisation with Folding's epoch count ("trained from scratch"); and the same at the talk's
scale (its 2-2-2 grown to 2-3-2): Folding grown from width 2 to each of ``--fold-widths`` units.
Runs go to ``--jobs`` worker processes, longest first; ``--resume`` finishes an interrupted run.

Usage:
    python benchmarks/growth_methods.py                                   # full schedule (~45 min on 2 cores)
    python benchmarks/growth_methods.py --growth-epochs 20 --final-epochs 30 --jobs 2  # the committed run
    python benchmarks/growth_methods.py --datasets moons --seeds 0 --quick  # smoke test
    python benchmarks/growth_methods.py --replot
    python benchmarks/growth_methods.py ... --resume                       # finish an interrupted run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Report, accuracy_point, fmt_int, fmt_pm, machine_info, mean_std, params_axes,  # noqa: E402
                    pyplot, results_path, save_figure)

from tinydeploy.atomic import write_json  # noqa: E402
from tinydeploy.training.config import DATASET_DEFAULTS, RECIPES, GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402

NAME = "growth_methods"
METHODS = {"TINY": "tiny", "GradMax": "gradmax", "NORTH-pre": "north", "Folding": "folding", "Random": "random"}
REFERENCES = ("random init (Folding width)", "trained from scratch (Folding width)")
#: The talk's scale (2-2-2 grown to 2-3-2): Folding grown to a few hidden units, and that width from scratch.
TALK = ("Folding to width w", "trained from scratch (width w)")
#: Relative cost of one run per dataset (measured), to start the longest first.
COST = {"mnist1d": 6.0, "digits": 4.0, "spirals": 2.0}
TWO_D = ("moons", "spirals", "sine2d", "quadratic2d")
COLORS = {"TINY": "C0", "GradMax": "C1", "NORTH-pre": "C4", "Folding": "C3", "Random": "C2",
          REFERENCES[1]: "C7"}
MARKERS = {"TINY": "o", "GradMax": "s", "NORTH-pre": "v", "Folding": "D", "Random": "^", REFERENCES[1]: "x"}


def zero_fan_in(model: torch.nn.Sequential, growable: list[int]) -> int:
    """Hidden neurons whose whole fan-in (weights and bias) is exactly 0."""
    return sum(int(((model[i].weight == 0).all(dim=1) & (model[i].bias == 0)).sum()) for i in growable)


def run_one(cfg: GrowConfig) -> dict[str, Any]:
    """One grow (or fixed-width training) job in a temporary run directory; its measurements."""
    with tempfile.TemporaryDirectory(prefix="tinybench-") as tmp:
        job = prepare_grow(cfg, Path(tmp) / "run")
        regions_at_init = job.linear_regions() if cfg.dataset in TWO_D else None
        started = time.perf_counter()
        m = job.run().metrics
        wall = time.perf_counter() - started
        return {
            "dataset": cfg.dataset, "seed": cfg.seed, "method": cfg.method, "init_widths": m["initial_widths"],
            "final_widths": m["final_widths"], "params": m["params"], "max_params": m["max_params"],
            "test_accuracy": m["metrics"]["test"]["accuracy"], "train_accuracy": m["metrics"]["train"]["accuracy"],
            "epochs": m["epochs"], "stop_reason": m["stop_reason"], "growth_events": m["growth_events"],
            "regions": m.get("linear_regions"), "regions_end_of_growth": m.get("linear_regions_end_of_growth"),
            "regions_at_init": regions_at_init, "wall_s": wall,
            "wall_time_s": m["wall_time_s"], "zero_fan_in": zero_fan_in(job.model, job.spec.growable_indices),
            "history": [{k: h[k] for k in ("epoch", "phase", "params", "widths", "val_accuracy")} for h in m["history"]],
        }


def run_task(task: tuple[str, str, int, str, int | None], args) -> list[dict[str, Any]]:
    """One unit of work for a worker process (1 torch thread): a method's run ("method"; Folding's on 2-D
    data also trains the same width from scratch), or a fold at the talk's scale ("talk": Folding grown to
    ``width`` hidden units, against that width freshly initialised and trained from scratch)."""
    torch.set_num_threads(1)
    kind, ds, seed, label, width = task
    if kind == "method":
        rec = {"label": label, "talk_width": None, **run_one(config(ds, seed, METHODS[label], args))}
        if label != "Folding" or ds not in TWO_D:
            return [rec]
        cfg = config(ds, seed, "tiny", args, init_widths=list(rec["final_widths"]), max_growth_epochs=0.0,
                     final_epochs=rec["epochs"], max_params=10**9)
        return [rec, {"label": REFERENCES[1], "talk_width": None, **run_one(cfg)}]
    budget = width_params(ds, width, args)
    fold = {"label": TALK[0], "talk_width": width, **run_one(config(ds, seed, "folding", args, max_params=budget))}
    cfg = config(ds, seed, "tiny", args, init_widths=[width], max_growth_epochs=0.0, final_epochs=fold["epochs"],
                 max_params=10**9)
    return [fold, {"label": TALK[1], "talk_width": width, **run_one(cfg)}]


def width_params(dataset: str, width: int, args) -> int:
    """Parameters of the one-hidden-layer net of ``width`` units on ``dataset``."""
    with tempfile.TemporaryDirectory(prefix="tinybench-") as tmp:
        job = prepare_grow(config(dataset, 0, "tiny", args, init_widths=[width]), Path(tmp) / "run")
        return sum(p.numel() for p in job.model.parameters())


def config(dataset: str, seed: int, method: str, args, **overrides: Any) -> GrowConfig:
    base: dict[str, Any] = dict(dataset=dataset, seed=seed, method=method, device="cpu", threads=1,
                                arch="mlp", init_widths=[args.init_width])
    if args.quick:
        base.update(max_growth_epochs=4.0, final_epochs=4.0)
    if args.growth_epochs is not None:
        base.update(max_growth_epochs=args.growth_epochs)
    if args.final_epochs is not None:
        base.update(final_epochs=args.final_epochs)
    base.update(overrides)
    return GrowConfig(**base)


def summarise(records: list[dict[str, Any]], report: Report, datasets: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for ds in datasets:
        rows, summary[ds] = [], {}
        for label in (*METHODS, REFERENCES[1]):
            rs = [r for r in records if r["dataset"] == ds and r["label"] == label]
            if not rs:
                continue
            acc_m, acc_s = mean_std(r["test_accuracy"] for r in rs)
            p_m, p_s = mean_std(r["params"] for r in rs)
            wall_m, wall_s = mean_std(r["wall_s"] for r in rs)
            regions = [r["regions"] for r in rs if r["regions"] is not None]
            grown = [r["regions_end_of_growth"] for r in rs if r.get("regions_end_of_growth") is not None]
            summary[ds][label] = {"test_accuracy_mean": acc_m, "test_accuracy_std": acc_s, "params_mean": p_m,
                                  "params_std": p_s, "wall_mean_s": wall_m,
                                  "regions_mean": mean_std(regions)[0] if regions else None}
            rows.append([
                label, fmt_pm([r["test_accuracy"] for r in rs], 100, 1), fmt_int(p_m) + (f" ± {p_s:,.0f}" if p_s else ""),
                " / ".join(str(r["final_widths"][0]) for r in rs),
                (f"{fmt_pm(grown, 1, 0)} -> " if grown and label in METHODS else "") + fmt_pm(regions, 1, 0)
                if regions else "-",
                f"{wall_m:.1f} ± {wall_s:.1f}",
                ", ".join(sorted({r["stop_reason"] for r in rs})),
                f"{sum(r['zero_fan_in'] for r in rs)}/{sum(r['final_widths'][0] for r in rs)}",
            ])
        budget = DATASET_DEFAULTS.get(ds, {}).get("max_params")
        report.table(f"{ds} (budget {budget:,} params, {len({r['seed'] for r in records if r['dataset'] == ds})} seeds)",
                     ["method", "test acc % (mean ± std)", "params", "final width (per seed)",
                      "linear regions (end of growth -> final)",
                      "wall s", "stop reason", "zero fan-in at the end"], rows)
    return summary


def region_table(records: list[dict[str, Any]], report: Report, datasets: list[str]) -> dict[str, Any]:
    """Folding's regions against the same width freshly initialised and trained from scratch."""
    out, rows = {}, []
    for ds in [d for d in datasets if d in TWO_D]:
        fold = [r for r in records if r["dataset"] == ds and r["label"] == "Folding"]
        fresh = [r for r in records if r["dataset"] == ds and r["label"] == REFERENCES[1]]
        if not fold or not fresh:
            continue
        init = [r["regions_at_init"] for r in fresh]
        grown, trained = [r["regions"] for r in fold], [r["regions"] for r in fresh]
        more = all(g > i for g, i in zip(grown, init))
        out[ds] = {"folding": grown, "random_init": init, "trained_from_scratch": trained, "folding_more_than_init": more}
        rows.append([ds, " / ".join(str(r["final_widths"][0]) for r in fold), " / ".join(map(str, grown)),
                     " / ".join(map(str, init)), " / ".join(map(str, trained)), "yes" if more else "NO"])
    if rows:
        report.table("Linear regions at equal width (per seed)", ["dataset", "Folding width", "Folding (grown)",
                     "random init, same width", "trained from scratch, same width", "Folding > random init"], rows)
    return out


def talk_table(records: list[dict[str, Any]], report: Report, datasets: list[str]) -> dict[str, Any]:
    """The talk's scale: Folding grown from width 2 to w against width w freshly initialised (before any
    training) and trained from scratch with as many epochs, per dataset and w. A hidden layer of w ReLU
    units on 2-D inputs has at most 1 + w + w(w-1)/2 linear regions (w lines in general position)."""
    out, rows = {}, []
    for ds in [d for d in datasets if d in TWO_D]:
        widths = sorted({r["talk_width"] for r in records if r["dataset"] == ds and r["label"] == TALK[0]})
        for w in widths:
            fold = [r for r in records if r["dataset"] == ds and r["label"] == TALK[0] and r["talk_width"] == w]
            fresh = [r for r in records if r["dataset"] == ds and r["label"] == TALK[1] and r["talk_width"] == w]
            grown, init = [r["regions"] for r in fold], [r["regions_at_init"] for r in fresh]
            trained = [r["regions"] for r in fresh]
            wins = sum(g > i for g, i in zip(grown, init))
            out.setdefault(ds, {})[w] = {
                "folding_widths": [r["final_widths"][0] for r in fold], "folding": grown, "random_init": init,
                "trained_from_scratch": trained, "folding_more_than_init": wins,
                "folding_accuracy": [r["test_accuracy"] for r in fold],
                "scratch_accuracy": [r["test_accuracy"] for r in fresh]}
            rows.append([ds, w, 1 + w + w * (w - 1) // 2, " / ".join(str(r["final_widths"][0]) for r in fold),
                         " / ".join(map(str, grown)),
                         " / ".join(map(str, init)), " / ".join(map(str, trained)), f"{wins}/{len(grown)}",
                         fmt_pm([r["test_accuracy"] for r in fold], 100, 1),
                         fmt_pm([r["test_accuracy"] for r in fresh], 100, 1)])
    if rows:
        report.table("Linear regions at the talk's scale: Folding grown from width 2 to w (per seed)",
                     ["dataset", "w", "at most (w lines in the plane)", "Folding width reached", "Folding regions", "random init, width w",
                      "trained from scratch, width w", "Folding > random init (seeds)", "Folding test acc %",
                      "from scratch test acc %"], rows)
    return out


def plot(records: list[dict[str, Any]], datasets: list[str]) -> None:
    plt = pyplot()
    cols = 3
    rows_n = (len(datasets) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.2 * rows_n), squeeze=False)
    for ax, ds in zip(axes.flat, datasets):
        for label in (*METHODS, REFERENCES[1]):
            rs = [r for r in records if r["dataset"] == ds and r["label"] == label]
            if rs:
                accuracy_point(ax, rs, label, COLORS[label], MARKERS[label])
        params_axes(ax, "test accuracy (%)", f"{ds}: mean ± std over seeds")
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    save_figure(fig, f"{NAME}_acc_vs_params.png")
    two_d = [d for d in datasets if d in TWO_D]
    if not two_d:
        return
    fig, axes = plt.subplots(1, len(two_d), figsize=(5.2 * len(two_d), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], two_d):
        for label in (*METHODS, REFERENCES[1]):
            rs = [r for r in records if r["dataset"] == ds and r["label"] == label and r["regions"] is not None]
            if rs:
                ax.scatter([r["params"] for r in rs], [r["regions"] for r in rs], marker=MARKERS[label],
                           color=COLORS[label], label=label)
        refs = [r for r in records if r["dataset"] == ds and r["label"] == REFERENCES[1]]
        if refs:
            ax.scatter([r["params"] for r in refs], [r["regions_at_init"] for r in refs], marker="*", color="k",
                       s=60, label=REFERENCES[0])
        params_axes(ax, "linear regions, 200 x 200 grid (log)", f"{ds}: final networks, every seed", log_y=True)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, f"{NAME}_regions.png")


def main(argv: list[str] | None = None) -> int:
    global NAME
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="moons,spirals,sine2d,quadratic2d,digits,mnist1d")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS), help="labels among " + ", ".join(METHODS))
    p.add_argument("--init-width", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="4 + 4 epochs: a smoke test, not comparable")
    p.add_argument("--growth-epochs", type=float, default=None, help="growth phase at most (default: the recipe's)")
    p.add_argument("--final-epochs", type=float, default=None, help="final phase (default: the recipe's)")
    p.add_argument("--fold-widths", default="3,6,12", help="the talk's scale: widths Folding grows to on 2-D data")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (1 torch thread each)")
    p.add_argument("--name", default=NAME, help="results file stem")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from results/<name>.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of results/<name>.partial.json (an interrupted run) within --datasets and "
                        "--seeds, and run only the missing ones")
    args = p.parse_args(argv)
    NAME = args.name
    if args.replot:
        doc = json.loads(results_path(f"{NAME}.json").read_text())
        plot(doc["records"], list(doc["summary"]))
        return 0
    datasets = [d for d in args.datasets.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    labels = [m for m in args.methods.split(",") if m]
    args.fold_widths = [int(w) for w in args.fold_widths.split(",") if w]
    torch.set_num_threads(1)
    machine = machine_info()
    report = Report(NAME, "Growth methods: TINY vs GradMax vs NORTH-pre vs Folding vs Random")
    records: list[dict[str, Any]] = []
    partial = results_path(f"{NAME}.partial.json")
    if args.resume and partial.is_file():
        records = [r for r in json.loads(partial.read_text())["records"]
                   if r["dataset"] in datasets and r["seed"] in seeds]
    done = {(r["dataset"], r["seed"], r["label"], r["talk_width"]) for r in records}
    tasks = [("method", ds, seed, label, None) for ds in datasets for seed in seeds for label in labels
             if (ds, seed, label, None) not in done]
    if "Folding" in labels:
        tasks += [("talk", ds, seed, "Folding", width) for ds in datasets if ds in TWO_D for seed in seeds
                  for width in args.fold_widths if (ds, seed, TALK[1], width) not in done]
    tasks.sort(key=lambda t: -COST.get(t[1], 1.0) * (0.3 if t[0] == "talk" else 1.0))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for done in as_completed([pool.submit(run_task, task, args) for task in tasks]):
            for rec in done.result():
                records.append(rec)
                print(f"[{report.elapsed:6.0f}s] {rec['dataset']} seed {rec['seed']} {rec['label']:38s} acc "
                      f"{100 * rec['test_accuracy']:.1f}% params {rec['params']:>7,} width {rec['final_widths']} "
                      f"regions {rec['regions_at_init']} -> {rec['regions']} stop {rec['stop_reason']} "
                      f"wall {rec['wall_s']:.1f}s zero fan-in {rec['zero_fan_in']}", flush=True)
            write_json(partial, {"records": records})
    records.sort(key=lambda r: (datasets.index(r["dataset"]), r["seed"], r.get("talk_width") or 0, r["label"]))
    summary = summarise(records, report, datasets)
    regions = region_table(records, report, datasets)
    talk = talk_table(records, report, datasets)
    probe = config(datasets[0], 0, "tiny", args)
    recipe = RECIPES["mlp"]
    growth_epochs = recipe["max_growth_epochs"] if probe.max_growth_epochs is None else probe.max_growth_epochs
    final_epochs = recipe["final_epochs"] if probe.final_epochs is None else probe.final_epochs
    report.note(
        f"Settings: one hidden layer starting at width {args.init_width} for every method; growth at initialisation "
        f"and every {recipe['grow_every']:g} epoch for at most {growth_epochs:g} epochs, then "
        f"{final_epochs:g} epochs with cosine decay (Adam lr {GrowConfig().lr:g}, batch "
        f"{recipe['batch_size']}, weight decay {GrowConfig().weight_decay:g}); at most "
        f"{GrowConfig().neurons_per_step} neurons per step; each dataset's default budget and input noise; "
        f"1 torch thread per run, {args.jobs} run(s) at a time (wall times include that contention)"
        + (" -- QUICK schedule, not comparable" if args.quick else "") + ".")
    plot(records, datasets)
    report.write({"settings": vars(args), "summary": summary, "regions": regions, "talk_scale": talk,
                  "records": records}, machine)
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
