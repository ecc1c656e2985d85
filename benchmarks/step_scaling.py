"""Cost of one TINY step against its arithmetic floor, as width and estimation batch grow.

Synthetic data: X ~ N(0, 1) with 64 features, 10 random classes, an MLP 64 -> w -> w -> 10 (ReLU),
both hidden layers growable. One TINY step = ``gather_moments`` over n samples (the library's
default chunking) + ``candidates.tiny`` for both layers (16 neurons max). Its floor is the time of
just the matrix products it must form, as single torch matmuls of the same shapes and dtype
(float32, the dtype of the library's products for a float32 model) on pre-made tensors:

* ``S,N floor``: S = B_prev^T B_prev and N = B_prev^T V for both layers (what Prop. 3.2 needs);
* ``all-products floor``: the seven products ``statistics._accumulate`` forms per layer
  (S, N_v, S_ph, S_h, N_h, VV, N_z), plus one plain forward/backward over the batch (float32, no
  hooks), which the statistics also need.

ratio = step time / floor: 1.0 means the step costs no more than its arithmetic.

``--baseline REF`` adds the side-by-side comparison with the code at git ``REF`` (a ``git archive``
snapshot, e.g. ``main``) at width ``--compare-width`` and batch ``--compare-batch`` (issue 15: 256 and
8,192, one thread): rounds of one fresh process per code, alternating, each timing ``--repeats`` steps
after a warm-up, this tree twice: with the heap setting ``tinydeploy grow`` applies
(``training.host_memory``) and with glibc's defaults (CPU time of the process and wall time); the
speedup is the median over rounds of the per-round ratio, and the lambdas of both layers (all of them,
before the significance test) are compared.

Usage:
    .venv/bin/python benchmarks/step_scaling.py --baseline main
    .venv/bin/python benchmarks/step_scaling.py --widths 8,32 --batches 256,1024 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info, pyplot, save_figure, snapshot, timeit  # noqa: E402

from tinydeploy.growth import candidates, linalg  # noqa: E402
from tinydeploy.growth.statistics import gather_moments  # noqa: E402

NAME = "step_scaling"
D_IN, N_OUT, MAX_NEURONS = 64, 10, 16


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def measure(width: int, n: int, repeats: int, gen: torch.Generator) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, N_OUT))
    X = torch.randn(n, D_IN, generator=gen)
    y = torch.randint(0, N_OUT, (n,), generator=gen)
    growable = [0, 2]

    def gather():
        return gather_moments(model, growable, X, y, loss_fn, generator=gen)

    moments = gather()

    def propose():
        return [candidates.tiny(m, MAX_NEURONS) for m in moments]

    t_gather = timeit(gather, repeats)
    t_cand = timeit(propose, repeats)

    # Floors: pre-made float32 tensors of the shapes the statistics multiply.
    f32 = {"dtype": torch.float32}
    shapes = [  # (B_prev cols, B_h cols, V cols) for layer pairs (0 -> 2) and (2 -> 4), bias column included
        (D_IN + 1, width + 1, width),
        (width + 1, width + 1, N_OUT),
    ]
    tensors = [(torch.randn(n, a, **f32, generator=gen), torch.randn(n, b, **f32, generator=gen),
                torch.randn(n, c, **f32, generator=gen), torch.randn(n, c, **f32, generator=gen)) for a, b, c in shapes]

    def sn_products():
        for Bp, _, V, _ in tensors:
            Bp.T @ Bp
            Bp.T @ V

    def all_products():
        for Bp, Bh, V, Z in tensors:
            Bp.T @ Bp, Bp.T @ V, Bp.T @ Bh, Bh.T @ Bh, Bh.T @ V, V.T @ V, Bp.T @ Z

    def forward_backward():
        for start in range(0, n, 1024):
            model.zero_grad(set_to_none=True)
            loss_fn(model(X[start:start + 1024]), y[start:start + 1024]).sum().backward()
        model.zero_grad(set_to_none=True)

    t_sn = timeit(sn_products, repeats)
    t_all = timeit(all_products, repeats)
    t_fb = timeit(forward_backward, repeats)
    step = t_gather + t_cand
    return {"width": width, "n": n, "gather_s": t_gather, "candidates_s": t_cand, "step_s": step,
            "sn_floor_s": t_sn, "all_products_s": t_all, "forward_backward_s": t_fb,
            "ratio_vs_sn": step / t_sn, "ratio_vs_all": step / (t_all + t_fb)}


def step_case(width: int, n: int, repeats: int) -> dict:
    """One code's step at (width, n): median CPU and wall seconds of ``repeats`` steps after a warm-up,
    and every lambda of both layers (runs in a process importing that code)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, N_OUT))
    X = torch.randn(n, D_IN, generator=gen)
    y = torch.randint(0, N_OUT, (n,), generator=gen)

    def gather():
        return gather_moments(model, [0, 2], X, y, loss_fn, generator=gen)

    def step():
        return [candidates.tiny(m, MAX_NEURONS) for m in gather()]

    step()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    lambdas = []
    for m in gather():
        dW = linalg.best_update(m.S_h, m.N_h)
        N = m.projected_cross_moment(dW)
        lambdas.append([float(v) for v in linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), N).lambdas])
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "lambdas": lambdas}


def keep_freed_buffers() -> None:
    """What ``tinydeploy grow`` does to the process's heap, where the code measured has it."""
    try:
        from tinydeploy.training.host_memory import keep_freed_buffers as setting
    except ImportError:  # a baseline from before the setting: its grow ran with glibc's defaults
        return
    setting()


def _lambda_difference(new: list[list[float]], old: list[list[float]]) -> float:
    """Largest relative difference of the lambdas both codes find above 1e-3 of their layer's largest."""
    worst = 0.0
    for a, b in zip(new, old):
        kept = [k for k in range(min(len(a), len(b))) if b[k] > 1e-3 * b[0]]
        worst = max([worst] + [abs(a[k] - b[k]) / b[k] for k in kept])
    return worst


def compare(baseline: str, width: int, n: int, repeats: int, rounds: int, threads: int, report: Report) -> dict:
    """This tree (as ``tinydeploy grow`` runs it, and with glibc's allocator defaults) against a snapshot of
    git ``baseline`` (as its grow ran it: glibc's defaults), alternating fresh processes, one table."""
    grow, defaults = "this tree", "this tree, glibc defaults"
    records: dict[str, list[dict]] = {grow: [], defaults: [], baseline: []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {grow: (BENCH.parent, "grow"), defaults: (BENCH.parent, "defaults"),
                baseline: (snapshot(baseline, Path(tmp)), "grow")}
        for r in range(rounds):
            for label, (root, host) in runs.items():
                env = {**os.environ, "PYTHONPATH": str(root)}
                out = subprocess.run([sys.executable, __file__, "--measure-step", f"{width},{n},{repeats}",
                                      "--threads", str(threads), "--host-memory", host], env=env,
                                     capture_output=True, text=True, check=True, cwd=root)
                records[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{rounds} {label}: step {1e3 * records[label][-1]['cpu_s']:.1f} ms CPU, "
                      f"{1e3 * records[label][-1]['wall_s']:.1f} ms wall", flush=True)
    old = records[baseline]
    speedup = {label: {k: statistics.median(o[k] / t[k] for o, t in zip(old, records[label]))
                       for k in ("cpu_s", "wall_s")} for label in (grow, defaults)}
    difference = _lambda_difference(records[grow][0]["lambdas"], old[0]["lambdas"])
    rows = [[label, f"{1e3 * statistics.median(x['cpu_s'] for x in recs):.1f}",
             f"{1e3 * statistics.median(x['wall_s'] for x in recs):.1f}"] for label, recs in records.items()]
    rows += [[f"speedup of {label} (median of per-round ratios)", f"{speedup[label]['cpu_s']:.2f}x",
              f"{speedup[label]['wall_s']:.2f}x"] for label in (grow, defaults)]
    report.table(f"One growth step, width {width}, batch {n:,}, {threads} thread(s): this tree vs {baseline}",
                 ["code", "step ms (CPU)", "step ms (wall)"], rows,
                 note=(f"{rounds} rounds x 3 fresh processes, alternating; each the median of {repeats} steps after a "
                       f"warm-up. '{grow}': with the heap setting `tinydeploy grow` applies "
                       "(`training.host_memory.keep_freed_buffers`: freed buffers reused without page faults); "
                       f"'{defaults}': the same code with glibc's defaults, as {baseline} ran. Lambdas of both layers "
                       f"(all, before the significance test), largest relative difference: {difference:.1e}."))
    return {"baseline": baseline, "width": width, "n": n, "rounds": rounds, "records": records,
            "speedup": speedup[grow], "speedup_glibc_defaults": speedup[defaults],
            "lambda_max_rel_difference": difference}


BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="8,32,128,512")
    p.add_argument("--batches", default="256,1024,4096,16384")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="widths 8,64; batches 256,2048; 2 repeats")
    p.add_argument("--baseline", help="git ref to compare one step with, side by side (e.g. main)")
    p.add_argument("--compare-width", type=int, default=256)
    p.add_argument("--compare-batch", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=5, help="alternating process pairs of the comparison")
    p.add_argument("--measure-step", help=argparse.SUPPRESS)
    p.add_argument("--host-memory", choices=("grow", "defaults"), default="grow", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_step:
        torch.set_num_threads(args.threads)
        if args.host_memory == "grow":
            keep_freed_buffers()
        width, n, repeats = (int(v) for v in args.measure_step.split(","))
        print(json.dumps(step_case(width, n, repeats)))
        return 0
    if args.quick:
        args.widths, args.batches, args.repeats = "8,64", "256,2048", 2
    widths = [int(w) for w in args.widths.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    machine = machine_info()
    report = Report(NAME, "One TINY step vs the matrix products it must compute")
    comparison = None
    if args.baseline:
        comparison = compare(args.baseline, args.compare_width, args.compare_batch, args.repeats, args.rounds,
                             args.threads, report)
    gen = torch.Generator().manual_seed(0)
    rows_data = []
    for w in widths:
        for n in batches:
            r = measure(w, n, args.repeats, gen)
            rows_data.append(r)
            print(f"[{report.elapsed:5.0f}s] w={w:4d} n={n:6d}: step {1e3 * r['step_s']:9.2f} ms "
                  f"(gather {1e3 * r['gather_s']:.2f}, candidates {1e3 * r['candidates_s']:.2f}); S,N floor "
                  f"{1e3 * r['sn_floor_s']:.2f} ms; all products {1e3 * r['all_products_s']:.2f} + fwd/bwd "
                  f"{1e3 * r['forward_backward_s']:.2f} ms", flush=True)
    rows = [[r["width"], f"{r['n']:,}", f"{1e3 * r['gather_s']:.2f}", f"{1e3 * r['candidates_s']:.2f}",
             f"{1e3 * r['step_s']:.2f}", f"{1e3 * r['sn_floor_s']:.2f}", f"{r['ratio_vs_sn']:.1f}",
             f"{1e3 * (r['all_products_s'] + r['forward_backward_s']):.2f}", f"{r['ratio_vs_all']:.2f}"]
            for r in rows_data]
    report.table(
        "TINY step time (ms) vs floors, MLP 64 -> w -> w -> 10, both layers",
        ["width w", "batch n", "gather_moments", "candidates.tiny x2", "step", "S,N floor", "step / S,N",
         "all products + fwd/bwd", "step / (all + fwd/bwd)"], rows,
        note=(f"Median of {args.repeats} runs after a warm-up; {args.threads} torch thread(s); float32 products "
              "as in the library. The S,N floor is the strict minimum (S and N only); the all-products floor adds "
              "the products of the former statistics (S_ph, S_h, N_h, VV, N_z: the library now shares S_h with the "
              "next S, draws N_z from S and forms S_ph only where it is cheaper than a second pass) and the "
              "forward/backward pass."))

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for w in widths:
        rs = [r for r in rows_data if r["width"] == w]
        axes[0].plot([r["n"] for r in rs], [1e3 * r["step_s"] for r in rs], "o-", label=f"step w={w}")
        axes[0].plot([r["n"] for r in rs], [1e3 * r["sn_floor_s"] for r in rs], "x:", color=axes[0].lines[-1].get_color())
        axes[1].plot([r["n"] for r in rs], [r["ratio_vs_sn"] for r in rs], "o-", label=f"w={w} vs S,N")
        axes[1].plot([r["n"] for r in rs], [r["ratio_vs_all"] for r in rs], "x:", color=axes[1].lines[-1].get_color(),
                     label=f"w={w} vs all + fwd/bwd")
    axes[0].set(xscale="log", yscale="log", xlabel="estimation batch n", ylabel="ms",
                title="TINY step (solid) vs S,N products (dotted)")
    axes[1].set(xscale="log", yscale="log", xlabel="estimation batch n", ylabel="step / floor",
                title="distance to the arithmetic floor")
    axes[1].axhline(1.0, color="k", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, f"{NAME}.png")
    report.write({"settings": vars(args), "rows": rows_data, "comparison": comparison}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
