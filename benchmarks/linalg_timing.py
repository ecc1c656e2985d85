"""eigh vs SVD for the linear algebra of one TINY step, at the shapes growth meets (issue 11: "eigh/SVD
where it is faster; measure").

A growth step decomposes, per layer, S ((d, d), d = fan-in + 1, 9 C + 1 for a 3x3 convolution over C
channels) and M = S^(-1/2) N ((d, o), o = the consumer's outputs times its taps). The library uses
``eigh(S)`` for S^(-1/2) (``linalg.psd_inverse_sqrt``), ``svd(M)`` for the new neurons
(``linalg.new_neurons``) and the spectral norm of S^(-1/2) N_null for lambda_- (``linalg.null_threshold``).
Each is timed against its alternative on the same random matrices (S = X^T X / n from n = 4 d Gaussian
rows, N Gaussian), float64 as in the library:

* ``S^(-1/2)``: eigh(S) vs svd(S) (S is symmetric PSD, so both give the same factors);
* ``new neurons``: svd(M) vs eigh of the smaller Gram matrix (M^T M or M M^T), whose eigenvalues are
  lambda_k^2; agreement = largest relative difference of the top 16 lambdas;
* ``lambda_-``: matrix_norm(M, 2) (an SVD) vs the largest eigenvalue of the smaller Gram (eigvalsh).

Median of ``--repeats`` calls after a warm-up, on ``--device`` (``cuda`` when asked and present),
``--threads`` torch threads. Writes ``results/linalg_timing.{json,md}``.

Usage:
    .venv/bin/python benchmarks/linalg_timing.py
    .venv/bin/python benchmarks/linalg_timing.py --device cuda --sizes 577,2305,4609
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info, timeit  # noqa: E402

NAME = "linalg_timing"
#: (d, o): an MLP layer of width 64 and 256, then 3x3 convolutions over 64, 128 and 256 channels
#: whose consumer has as many output channels (o = 9 C).
DEFAULT_SHAPES = "65x64,257x256,577x576,1153x1152,2305x2304"


def problem(d: int, o: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """S (d, d) from 4 d Gaussian rows and M = S^(-1/2) N with N (d, o) Gaussian, float64."""
    X = torch.randn(4 * d, d, generator=gen, dtype=torch.float64).to(device)
    S = X.T @ X / X.shape[0]
    sigma, O = torch.linalg.eigh(S)
    M = (O / sigma.sqrt()) @ O.T @ torch.randn(d, o, generator=gen, dtype=torch.float64).to(device)
    return S, M


def gram(M: torch.Tensor) -> torch.Tensor:
    """The smaller of M^T M and M M^T: its eigenvalues are the squared singular values of M."""
    return M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T


def top_by_gram(M: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest singular values of M from the eigenvalues of its smaller Gram matrix."""
    return torch.linalg.eigvalsh(gram(M)).flip(0)[:k].clamp_min(0).sqrt()


def measure(d: int, o: int, device: torch.device, repeats: int, gen: torch.Generator) -> dict[str, float]:
    S, M = problem(d, o, device, gen)

    def timed(fn) -> float:
        def call() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return 1e3 * timeit(call, repeats)

    lambdas = torch.linalg.svdvals(M)[:16]
    return {
        "d": d, "o": o,
        "eigh_S_ms": timed(lambda: torch.linalg.eigh(S)),
        "svd_S_ms": timed(lambda: torch.linalg.svd(S)),
        "svd_M_ms": timed(lambda: torch.linalg.svd(M, full_matrices=False)),
        "eigh_gram_ms": timed(lambda: torch.linalg.eigh(gram(M))),
        "norm2_ms": timed(lambda: torch.linalg.matrix_norm(M, ord=2)),
        "eigvalsh_gram_ms": timed(lambda: torch.linalg.eigvalsh(gram(M))),
        "gram_rel_diff": float(((top_by_gram(M, 16) - lambdas).abs() / lambdas).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated DxO shapes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    report = Report(NAME, f"eigh vs SVD in a TINY step ({args.device}, {args.threads} thread(s), float64)")
    rows = [measure(d, o, device, args.repeats, gen) for d, o in shapes]
    report.table(
        "median ms per call",
        ["d", "o", "eigh(S)", "svd(S)", "svd(M)", "eigh(Gram M)", "norm2(M)", "eigvalsh(Gram M)", "lambda rel. diff"],
        [[r["d"], r["o"], f"{r['eigh_S_ms']:.2f}", f"{r['svd_S_ms']:.2f}", f"{r['svd_M_ms']:.2f}",
          f"{r['eigh_gram_ms']:.2f}", f"{r['norm2_ms']:.2f}", f"{r['eigvalsh_gram_ms']:.2f}",
          f"{r['gram_rel_diff']:.1e}"] for r in rows],
        note="svd(S)/eigh(S), eigh(Gram)/svd(M) and eigvalsh(Gram)/norm2 below 1 mean the alternative is faster.",
    )
    report.table("ratios (alternative / library's choice)", ["d", "o", "svd(S)/eigh(S)", "eigh(Gram)/svd(M)",
                                                              "eigvalsh(Gram)/norm2"],
                 [[r["d"], r["o"], f"{r['svd_S_ms'] / r['eigh_S_ms']:.2f}", f"{r['eigh_gram_ms'] / r['svd_M_ms']:.2f}",
                   f"{r['eigvalsh_gram_ms'] / r['norm2_ms']:.2f}"] for r in rows])
    report.write({"rows": rows, "settings": vars(args)}, machine_info())


if __name__ == "__main__":
    main()
