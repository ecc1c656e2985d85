"""Inference cost of grown models against a big fixed MLP [1000, 1000], exported the same way.

For each dataset: the TINY-grown model (seed 0) and a [1000, 1000] MLP are exported with
``tinydeploy.export.export_run`` (safetensors + ONNX + TorchScript + torch.export, each gated on
parity), quantized to int8 with ``tinydeploy.export.quantize.quantize_int8`` (dynamic, gated on a <= 1 pp
accuracy drop), then measured with ``tinydeploy.export.bench.run_bench``: onnxruntime fp32, onnxruntime
int8, torch eager, TorchScript and torch.export, single-threaded, batches 1 / 32 / 256, interleaved.

Models come from ``benchmarks/results/runs/`` when ``growth_quality.py`` left them there
(``<dataset>-tiny-s0``, ``digits-fixed1000x1000-s0``); otherwise they are trained here: the grown
model with the default ``tinydeploy grow`` settings, the big MLP for ``--big-epochs`` epochs only
(enough for parity and latency; its accuracy is then not comparable and the table says so).

Usage:
    .venv/bin/python benchmarks/inference.py
    .venv/bin/python benchmarks/inference.py --datasets digits --iters 50 --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info, pyplot, results_path, save_figure, thread_kwargs  # noqa: E402

from tinydeploy.export.bench import ENGINE_ORDER, run_bench  # noqa: E402
from tinydeploy.export.pipeline import export_run  # noqa: E402
from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402
from tinydeploy.training.rundir import read_run  # noqa: E402

NAME = "inference"
RUNS = results_path("runs")
FORMATS = ("onnx", "torchscript", "pt2")
FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.ts",
         "pt2": "model.pt2", "int8": "model.int8.onnx"}


def get_run(dataset: str, kind: str, work: Path, big_epochs: float, quick: bool) -> tuple[Path, str]:
    """(run directory, provenance) for the grown or big model of ``dataset``."""
    stored = RUNS / (f"{dataset}-tiny-s0" if kind == "grown" else f"{dataset}-fixed1000x1000-s0")
    if stored.is_dir() and not quick:
        return stored, f"trained by growth_quality.py ({stored.relative_to(results_path('').parent.parent)})"
    if kind == "grown":
        cfg = GrowConfig(dataset=dataset, method="tiny", seed=0, device="cpu", arch="mlp", **thread_kwargs(1))
        if quick:
            cfg.max_growth_epochs, cfg.final_epochs = 8.0, 8.0
        why = "grown here, default settings" if not quick else "grown here, QUICK schedule"
    else:
        cfg = GrowConfig(dataset=dataset, init_widths=[1000, 1000], max_growth_epochs=0, final_epochs=big_epochs,
                         max_params=10**9, seed=0, device="cpu", arch="mlp", **thread_kwargs(1))
        why = f"trained here for {big_epochs:g} epochs only: latency/size reference, accuracy not comparable"
    run_dir = work / f"{dataset}-{kind}-run"
    prepare_grow(cfg, run_dir).run()
    return run_dir, why


def measure(dataset: str, kind: str, run_dir: Path, why: str, out: Path, args) -> dict[str, Any]:
    run = read_run(run_dir)
    t0 = time.perf_counter()
    exported = export_run(run_dir, out, formats=FORMATS, command="benchmarks/inference.py")
    export_s = time.perf_counter() - t0
    int8: dict[str, Any] = {}
    try:
        from tinydeploy.export.quantize import QuantizationError, quantize_int8

        try:
            q = quantize_int8(out, command="benchmarks/inference.py")
            int8 = {"passed": True, "gate": q.report["gate"], "size": q.report["size"]}
        except QuantizationError as exc:
            int8 = {"passed": False, "error": str(exc), "gate": exc.result.get("gate")}
    except ImportError as exc:  # tinydeploy.export.quantize missing
        int8 = {"passed": False, "error": f"tinydeploy.export.quantize unavailable: {exc}"}
    sizes = {fmt: (out / f).stat().st_size for fmt, f in FILES.items() if (out / f).is_file()}
    bench = run_bench(out, batch_sizes=tuple(args.batch_sizes), iters=args.iters, warmup=args.warmup, threads=1)
    return {
        "dataset": dataset, "kind": kind, "provenance": why, "widths": run.spec.hidden_widths,
        "params": run.spec.n_params(), "macs": run.spec.macs(),
        "test_accuracy": run.metrics["metrics"]["test"]["accuracy"], "epochs": run.metrics["epochs"],
        "export_s": export_s, "parity": [{"format": p.format, "passed": p.passed, "max_abs_diff": p.max_abs_diff} for p in exported.parity],
        "int8": int8, "sizes_bytes": sizes, "bench": bench,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,mnist1d")
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--big-epochs", type=float, default=2.0)
    p.add_argument("--keep-exports", action="store_true", help="keep export dirs under results/exports/")
    p.add_argument("--quick", action="store_true", help="train fresh short-schedule models (ignores stored runs)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(1)
    machine = machine_info()
    report = Report(NAME, "Inference: grown MLPs vs fixed [1000,1000], per engine (1 thread)")
    models = []
    work = Path(tempfile.mkdtemp(prefix="tinybench-inf-"))
    try:
        for ds in [d for d in args.datasets.split(",") if d]:
            for kind in ("grown", "big"):
                run_dir, why = get_run(ds, kind, work, args.big_epochs, args.quick)
                out = (results_path("exports") / f"{ds}-{kind}") if args.keep_exports else work / f"{ds}-{kind}-export"
                if out.exists():
                    shutil.rmtree(out)
                rec = measure(ds, kind, run_dir, why, out, args)
                models.append(rec)
                print(f"[{report.elapsed:5.0f}s] {ds} {kind} {rec['widths']} exported + benchmarked", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    torch.set_num_threads(1)

    rows = []
    for r in models:
        s = r["sizes_bytes"]
        rows.append([r["dataset"], r["kind"], "x".join(map(str, r["widths"])), f"{r['params']:,}", f"{r['macs']:,}",
                     f"{100 * r['test_accuracy']:.1f}", *(f"{s[k] / 1024:,.1f}" if k in s else "-" for k in FILES),
                     ("pass" if r["int8"].get("passed") else "FAIL") +
                     (f" ({100 * r['int8']['gate']['int8']:.1f}%)" if r["int8"].get("gate") else ""),
                     r["provenance"]])
    report.table("Models and size on disk (KiB)",
                 ["dataset", "model", "widths", "params", "MACs", "test acc %", *[f"{k} KiB" for k in FILES],
                  "int8 gate (int8 acc)", "provenance"], rows)

    for ds in dict.fromkeys(r["dataset"] for r in models):
        rows = []
        for r in (m for m in models if m["dataset"] == ds):
            res = r["bench"]["results"]
            for engine in ENGINE_ORDER:
                if engine not in res:
                    continue
                rows.append([r["kind"], engine, *(f"{res[engine][str(b)]['p50_ms'] * 1000:.1f}" for b in args.batch_sizes),
                             *(f"{res[engine][str(b)]['throughput_rows_per_s']:,.0f}" for b in args.batch_sizes)])
        grown = next(m for m in models if m["dataset"] == ds and m["kind"] == "grown")
        big = next(m for m in models if m["dataset"] == ds and m["kind"] == "big")
        ratios = []
        for engine in ENGINE_ORDER:
            if engine in grown["bench"]["results"] and engine in big["bench"]["results"]:
                ratios.append(f"{engine} " + "/".join(
                    f"{big['bench']['results'][engine][str(b)]['p50_ms'] / grown['bench']['results'][engine][str(b)]['p50_ms']:.0f}x"
                    for b in args.batch_sizes))
        report.table(
            f"{ds}: p50 latency (µs) and throughput (rows/s), batches {args.batch_sizes}",
            ["model", "engine", *[f"p50 µs b={b}" for b in args.batch_sizes], *[f"rows/s b={b}" for b in args.batch_sizes]],
            rows,
            note=(f"Grown {grown['widths']} vs big {big['widths']}: size {big['sizes_bytes']['onnx'] / grown['sizes_bytes']['onnx']:.0f}x "
                  f"smaller ONNX, p50 speed-up (big / grown) per engine at b={'/'.join(map(str, args.batch_sizes))}: "
                  + "; ".join(ratios) + "."))

    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.batch_sizes), figsize=(5 * len(args.batch_sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], args.batch_sizes):
        labels, values = [], []
        for r in models:
            for engine in ENGINE_ORDER:
                if engine in r["bench"]["results"]:
                    labels.append(f"{r['dataset']} {r['kind']} {engine}")
                    values.append(r["bench"]["results"][engine][str(b)]["p50_ms"] * 1000)
        ax.barh(labels, values, color=["C0" if " grown " in label else "C3" for label in labels])
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency (µs, log)")
        ax.set_title(f"batch {b}")
        ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, f"{NAME}.png")
    report.note(f"All engines single-threaded (tinydeploy.export.bench defaults: interleaved blocks of 10 calls, "
                f"{args.iters} timed calls per engine and batch, {args.warmup} warm-up). CPU shared with other users.")
    report.write({"settings": vars(args), "models": models}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
