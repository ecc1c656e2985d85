"""Cost of one convolutional TINY step against the unfolded products it must compute, and its peak memory.

Network: the default mnist5k CNN shape at width w everywhere, conv3x3(1->w) - ReLU - avgpool2 -
conv3x3(w->w) - ReLU - avgpool2 - flatten - linear(49w -> w) - ReLU - linear(w -> 10), on n random
1x28x28 images with random labels. Its three growable layers give the pair kinds conv->pool->conv,
conv->pool->flatten->linear and linear->linear. One TINY step = ``gather_moments`` of the three
layers on n samples (the library's streamed chunks, float64 products) + ``candidates.tiny`` for each
(16 neurons max, the CNN recipe's ridge).

The reference ("unfolded products") materialises what the step streams: the whole batch unfolded at
once (``F.unfold`` of every pair's producer input, pooled, unfolded again by the consumer window, and
the consumer inputs), then the same products as single float64 matmuls: S, N_v, N_z, S_h, N_h, VV
and the projected N, plus one plain forward/backward of the batch. ratio = step / reference.

Peak memory: each configuration runs in a fresh subprocess; the reported peak is its maximum resident
set size (``ru_maxrss``) minus the resident size after building the model and data, for the step
and for the reference separately.

Usage:
    .venv/bin/python benchmarks/conv_step.py
    .venv/bin/python benchmarks/conv_step.py --widths 4,8 --batches 256,1024 --repeats 1     # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info, pyplot, save_figure, timeit  # noqa: E402

from tinydeploy.growth import candidates, linalg  # noqa: E402
from tinydeploy.growth.statistics import gather_moments  # noqa: E402
from tinydeploy.model.build import build_model  # noqa: E402
from tinydeploy.model.spec import ArchSpec, ConvBlock  # noqa: E402
from tinydeploy.training.config import RECIPES  # noqa: E402

NAME = "conv_step"
MAX_NEURONS = 16


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def problem(width: int, n: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, list[int]]:
    torch.manual_seed(0)
    spec = ArchSpec.cnn(task="classification", input_shape=(1, 28, 28), blocks=[ConvBlock(pool=2), ConvBlock(pool=2)],
                        conv_widths=[width, width], hidden_widths=[width], n_outputs=10)
    gen = torch.Generator().manual_seed(1)
    return build_model(spec), torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen), \
        spec.growable_indices


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(model, X, y, growable) -> None:
    ridge = float(RECIPES["cnn"]["ridge"])
    moments = gather_moments(model, growable, X, y, loss_fn, generator=torch.Generator().manual_seed(0), ridge=ridge)
    for m in moments:
        candidates.tiny(m, MAX_NEURONS, ridge)


def unfolded_reference(model, X, y, growable) -> None:
    """The same statistics from the whole batch unfolded at once (no chunks): what streaming avoids holding."""
    inputs, grads = {}, {}

    def record(i: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inputs[i] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(i, g))

        return hook

    hooks = [model[i].register_forward_hook(record(i)) for i in range(len(model))
             if isinstance(model[i], (nn.Linear, nn.Conv2d))]
    loss_fn(model(X), y).sum().backward()
    for h in hooks:
        h.remove()
    weights = [i for i in range(len(model)) if isinstance(model[i], (nn.Linear, nn.Conv2d))]
    for i in growable:
        out = weights[weights.index(i) + 1]
        x = inputs[i].double()
        if isinstance(model[i], nn.Conv2d):
            P = F.unfold(x, 3, padding=1)
            P = torch.cat([P, torch.ones_like(P[:, :1])], 1).reshape(len(X), -1, *x.shape[2:])
            P = F.avg_pool2d(P, 2)
            if isinstance(model[out], nn.Conv2d):
                U = F.unfold(P, 3, padding=1)  # (n, D * 9, L)
            else:
                U = P.flatten(2)[..., None].flatten(1, 2)  # (n, D * HW, 1)
        else:
            U = torch.cat([x, torch.ones_like(x[:, :1])], 1)[:, :, None]
        b = inputs[out].double()
        Bh = F.unfold(b, 3, padding=1) if b.dim() == 4 else b[:, :, None]
        Bh = torch.cat([Bh, torch.ones_like(Bh[:, :1])], 1)
        V = -grads[out].double().reshape(len(X), grads[out].shape[1], -1)
        Ur, Bhr, Vr = (t.permute(0, 2, 1).reshape(-1, t.shape[1]) for t in (U, Bh, V))
        P2 = P.permute(0, 2, 3, 1).reshape(-1, P.shape[1]) if isinstance(model[i], nn.Conv2d) else Ur
        S_h, N_h = Bhr.T @ Bhr, Bhr.T @ Vr
        _ = (P2.T @ P2, Ur.T @ Vr, Ur.T @ torch.randn_like(Vr), Vr.T @ Vr)
        dW = linalg.best_update(S_h, N_h)
        _ = Ur.T @ (Vr - Bhr @ dW.T)


def one(width: int, n: int, repeats: int, which: str) -> dict[str, Any]:
    """Run in a fresh process: time and peak resident memory of the step or of the reference."""
    torch.set_num_threads(1)
    model, X, y, growable = problem(width, n)
    before = rss_mib()
    fn = step if which == "step" else unfolded_reference
    seconds = timeit(lambda: fn(model, X, y, growable), repeats)
    return {"seconds": seconds, "peak_mib": max(0.0, rss_mib() - before)}


def measure(width: int, n: int, repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {"width": width, "n": n}
    for which in ("step", "reference"):
        out = subprocess.run([sys.executable, __file__, "--one", f"{width},{n},{repeats},{which}"],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        row[f"{which}_s"], row[f"{which}_peak_mib"] = result["seconds"], result["peak_mib"]
    row["ratio"] = row["step_s"] / row["reference_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="2,4,8,16,32")
    parser.add_argument("--batches", default="256,1024,3200")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        width, n, repeats, which = args.one.split(",")
        print(json.dumps(one(int(width), int(n), int(repeats), which)))
        return
    torch.set_num_threads(1)
    machine = machine_info()
    report = Report(NAME, "Convolutional TINY step vs the unfolded products it computes")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        for n in (int(b) for b in args.batches.split(",")):
            rows.append(measure(width, n, args.repeats))
            r = rows[-1]
            print(f"w={width} n={n}: step {r['step_s']:.2f} s ({r['step_peak_mib']:.0f} MiB), unfolded reference "
                  f"{r['reference_s']:.2f} s ({r['reference_peak_mib']:.0f} MiB)", flush=True)
    report.table(
        "One TINY step on the three pairs of the mnist5k CNN shape (1 torch thread, float64 products)",
        ["width", "estimation batch", "step (s)", "step peak (MiB)", "unfolded reference (s)",
         "reference peak (MiB)", "step / reference"],
        [[r["width"], r["n"], f"{r['step_s']:.2f}", f"{r['step_peak_mib']:.0f}", f"{r['reference_s']:.2f}",
          f"{r['reference_peak_mib']:.0f}", f"{r['ratio']:.2f}"] for r in rows],
        note="Peak = maximum resident set size of a fresh process during the measurement, minus its size after "
             "building the model and data. The step streams chunks of at most 2^23 float64 values of unfolded "
             "views; the reference holds the whole batch unfolded.",
    )
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["n"] for r in rows}):
        sel = [r for r in rows if r["n"] == n]
        ax_t.plot([r["width"] for r in sel], [r["step_s"] for r in sel], "o-", label=f"step, n={n}")
        ax_t.plot([r["width"] for r in sel], [r["reference_s"] for r in sel], "x--", label=f"unfolded, n={n}")
        ax_m.plot([r["width"] for r in sel], [r["step_peak_mib"] for r in sel], "o-", label=f"step, n={n}")
        ax_m.plot([r["width"] for r in sel], [r["reference_peak_mib"] for r in sel], "x--", label=f"unfolded, n={n}")
    for ax, label in ((ax_t, "seconds"), (ax_m, "peak MiB")):
        ax.set(xscale="log", yscale="log", xlabel="width", ylabel=label)
        ax.legend(fontsize=7)
    save_figure(fig, f"{NAME}.png")
    report.write({"rows": rows, "settings": vars(args)}, machine)


if __name__ == "__main__":
    main()
