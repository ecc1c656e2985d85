"""ResNet growth (issue 11, the paper's Sec. 5.1 protocol scaled down): TINY vs GradMax vs Random growing
every residual block's middle channels from a fraction s of their full width, against the same
architecture trained from scratch with every block at full middle width for the same epochs.

Presets (each run is ``tinydeploy grow`` through the library, one seed):

* ``quick``: digits as 1x8x8 images, ``resnet10`` (one block per stage), stream 1/16 (4/8/16/32),
  s = 1/4, 1 growth epoch + 1 final epoch, one torch thread: a smoke test of a few minutes on CPU;
* ``cpu`` (the documented CPU configuration): mnist5k, ``resnet18``, stream 1/8 (8/16/32/64), s = 1/64,
  4 growth epochs with a growth step every 2, then 14 final epochs, one torch thread;
* ``paper``: CIFAR-100 from ``--data-dir`` on CUDA, ``resnet18`` at the full stream, s = 1/64 and 1/4,
  SGD lr 1e-2 (App. E/F.1), 10 growth epochs + 20 final epochs (bf16 autocast, GPU-resident data).

Writes ``results/resnet_growth[-<preset>].{json,md,png}``: a table (method, s, widths, params, MACs,
test accuracy, epochs, wall time) and accuracy vs parameters and vs epochs plots.

Usage:
    .venv/bin/python benchmarks/resnet_growth.py --preset quick
    .venv/bin/python benchmarks/resnet_growth.py --preset cpu
    .venv/bin/python benchmarks/resnet_growth.py --preset paper --data-dir ~/data --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, fmt_int, machine_info, pyplot, results_path, save_figure  # noqa: E402

from tinydeploy.atomic import write_json  # noqa: E402
from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"dataset": "digits", "arch": "resnet10", "stream_width": 1 / 16, "factors": [1 / 4],
              "max_growth_epochs": 1.0, "final_epochs": 1.0, "threads": 1},
    "cpu": {"dataset": "mnist5k", "arch": "resnet18", "stream_width": 1 / 8, "factors": [1 / 64],
            "max_growth_epochs": 4.0, "grow_every": 2.0, "final_epochs": 14.0, "threads": 1},
    "paper": {"dataset": "cifar100", "arch": "resnet18", "stream_width": 1.0, "factors": [1 / 64, 1 / 4],
              "max_growth_epochs": 10.0, "final_epochs": 20.0, "optimizer": "sgd", "lr": 1e-2},
}
METHODS = ("tiny", "gradmax", "random")


def run_one(label: str, cfg: GrowConfig) -> dict[str, Any]:
    """One grow (or from-scratch) job; returns its numbers and its per-epoch history."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = prepare_grow(cfg, Path(scratch) / "run", force=True).run()
        wall = time.perf_counter() - start
    m = result.metrics
    row = {"label": label, "widths": m["final_widths"], "initial_widths": m["initial_widths"], "params": m["params"],
           "macs": m["macs"], "test_accuracy": m["metrics"]["test"]["accuracy"], "epochs": m["epochs"], "wall_s": wall,
           "stop_reason": m["stop_reason"], "history": [{k: h.get(k) for k in ("epoch", "params", "val_accuracy")}
                                                        for h in m.get("history", [])]}
    print(f"{label:24s} widths {row['widths']} params {row['params']:>9,} MACs {row['macs']:>12,} "
          f"test {row['test_accuracy']:.4f} epochs {row['epochs']:.1f} ({wall:.0f} s)", flush=True)
    return row


def configs(preset: dict[str, Any], args) -> list[tuple[str, GrowConfig]]:
    base = {k: v for k, v in preset.items() if k not in ("factors",)}
    base.update(seed=args.seed, device=args.device, data_dir=args.data_dir)
    runs = []
    for factor in preset["factors"]:
        for method in METHODS:
            runs.append((f"{method} s=1/{round(1 / factor)}", GrowConfig(**base, method=method, width_factor=factor)))
    return runs


def from_scratch(preset: dict[str, Any], args, full: list[int], epochs: float) -> GrowConfig:
    """Every block at its full middle width, trained for ``epochs`` without growth."""
    base = {k: v for k, v in preset.items() if k not in ("factors", "max_growth_epochs", "final_epochs")}
    return GrowConfig(**base, seed=args.seed, device=args.device, data_dir=args.data_dir, init_widths=full,
                      max_growth_epochs=0.0, final_epochs=epochs)


def plot(rows: list[dict[str, Any]], name: str) -> None:
    plt = pyplot()
    fig, (by_params, by_epochs) = plt.subplots(1, 2, figsize=(12, 4))
    for row in rows:
        history = [h for h in row["history"] if h.get("val_accuracy") is not None]
        by_params.plot([h["params"] for h in history], [100 * h["val_accuracy"] for h in history], ".-",
                       label=row["label"])
        by_epochs.plot([h["epoch"] for h in history], [100 * h["val_accuracy"] for h in history], ".-",
                       label=row["label"])
    by_params.set(xscale="log", xlabel="parameters", ylabel="validation accuracy %")
    by_epochs.set(xlabel="epochs", ylabel="validation accuracy %")
    by_params.legend(fontsize=7)
    save_figure(fig, f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="torchvision's CIFAR files (paper preset)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    name = f"resnet_growth-{args.preset}"
    machine = machine_info()
    report = Report(name, f"ResNet growth, preset {args.preset}: TINY vs GradMax vs Random vs from scratch")
    rows = [run_one(label, cfg) for label, cfg in configs(preset, args)]
    tiny = rows[0]
    full = [int(w) for w in _full_widths(tiny, preset)]
    rows.append(run_one("from scratch, full width", from_scratch(preset, args, full, float(tiny["epochs"]))))
    write_json(results_path(f"{name}.partial.json"), {"rows": rows})
    table = [[r["label"], str(r["initial_widths"]), str(r["widths"]), fmt_int(r["params"]), fmt_int(r["macs"]),
              f"{100 * r['test_accuracy']:.2f}", f"{r['epochs']:.1f}", f"{r['wall_s']:.0f}"] for r in rows]
    report.table(f"{preset['dataset']}, {preset['arch']}, stream x{preset['stream_width']:g} (seed {args.seed})",
                 ["run", "initial widths", "final widths", "params", "MACs", "test acc %", "epochs", "wall s"], table)
    plot(rows, name)
    report.write({"rows": rows, "settings": {**{k: v for k, v in preset.items()}, "preset": args.preset,
                                             "seed": args.seed, "device": args.device}}, machine)
    results_path(f"{name}.partial.json").unlink(missing_ok=True)


def _full_widths(row: dict[str, Any], preset: dict[str, Any]) -> list[int]:
    """Every block's full middle width: its stage's stream width (``tinydeploy.training.architecture``)."""
    from tinydeploy.model.spec import RESNET_STAGES, RESNET_STREAM

    streams = [max(1, round(w * preset["stream_width"])) for w in RESNET_STREAM]
    return [w for blocks, w in zip(RESNET_STAGES[preset["arch"]], streams) for _ in range(blocks)]


if __name__ == "__main__":
    main()
