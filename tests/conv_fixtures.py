"""Small float64 CNNs of every producer/consumer pair kind, and a brute-force reference for their
statistics: explicit loops over output positions and kernel taps, written from the paper's
definitions (App. C.2.2), sharing no code with ``tinydeploy.growth.pairs``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from growth_fixtures import recorded_activities
from torch import nn

from tinydeploy.growth import candidates, linalg
from tinydeploy.model.build import GlobalAvgPool
from tinydeploy.model.losses import per_sample_loss

#: pair kind -> the modules between producer and consumer and the consumer's type.
KINDS = ("conv", "pool-conv", "flatten-linear", "pool-flatten-linear", "gap-linear")


@dataclass(frozen=True)
class Case:
    dims: int = 2
    kind: str = "conv"
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    next_kernel: int = 3
    next_stride: int = 1
    next_padding: int = 1
    size: int = 7
    channels: int = 2
    width: int = 3
    next_width: int = 4
    classes: int = 3
    n: int = 24
    activation: type[nn.Module] = nn.ReLU

    def __str__(self) -> str:
        return (f"{self.dims}d-{self.kind}-k{self.kernel}s{self.stride}p{self.padding}"
                f"-k{self.next_kernel}s{self.next_stride}p{self.next_padding}")


def build(case: Case, seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """Producer at module 0, consumer after the case's modules, then a small head; data and labels."""
    torch.manual_seed(seed)
    conv = nn.Conv1d if case.dims == 1 else nn.Conv2d
    pool = nn.AvgPool1d if case.dims == 1 else nn.AvgPool2d
    shape = (case.channels, case.size) if case.dims == 1 else (case.channels, case.size, case.size)
    producer = conv(case.channels, case.width, case.kernel, case.stride, case.padding)
    modules: list[nn.Module] = [producer, case.activation()]
    if case.kind.startswith("pool"):
        modules.append(pool(2, 2))
    probe = nn.Sequential(*modules)(torch.zeros(1, *shape))
    if case.kind.endswith("conv"):
        modules += [conv(case.width, case.next_width, case.next_kernel, case.next_stride, case.next_padding),
                    nn.Tanh(), GlobalAvgPool(), nn.Linear(case.next_width, case.classes)]
    elif case.kind == "gap-linear":
        modules += [GlobalAvgPool(), nn.Linear(case.width, case.next_width), nn.Tanh(),
                    nn.Linear(case.next_width, case.classes)]
    else:
        modules += [nn.Flatten(), nn.Linear(probe[0].numel(), case.next_width), nn.Tanh(),
                    nn.Linear(case.next_width, case.classes)]
    model = nn.Sequential(*modules).double()
    X = torch.randn(case.n, *shape, dtype=torch.float64)
    y = (X.flatten(1)[:, :3].sum(1) * 2).long().clamp(-1, 1) + 1
    return model, X, y % case.classes


def consumer_index(model: nn.Sequential) -> int:
    return next(i for i, m in enumerate(model) if i > 0 and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))


def explicit(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, out: int):
    """Producer input, consumer input, V_goal = -dL/dA at the consumer output (one autograd pass)."""
    return recorded_activities(model, X, y, per_sample_loss("classification"), 0, out)


def _grid(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, None, :] if x.dim() == 3 else x


def patch(x: torch.Tensor, row: int, col: int, kernel: tuple[int, int], stride: tuple[int, int],
          padding: tuple[int, int]) -> torch.Tensor:
    """The flattened (channel, kernel row, kernel column) patch of (n, C, H, W) behind output (row, col)."""
    padded = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    top, left = row * stride[0], col * stride[1]
    return padded[:, :, top : top + kernel[0], left : left + kernel[1]].reshape(x.shape[0], -1)


def _geometry(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    if isinstance(module, nn.Conv1d):
        return (1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0])
    return tuple(module.kernel_size), tuple(module.stride), tuple(module.padding)


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def brute_force(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every moment of the pair (producer 0, its consumer) by explicit loops (float64)."""
    out = consumer_index(model)
    x_in, b_h, V = explicit(model, X, y, out)
    n = X.shape[0]
    producer, consumer = model[0], model[out]
    # intermediate patches per pixel (before pooling): B^c_i
    x = _grid(x_in)
    kernel, stride, padding = _geometry(producer)
    H, W = (_out(s, k, st, p) for s, k, st, p in zip(x.shape[-2:], kernel, stride, padding))
    ones = torch.ones(n, 1, dtype=X.dtype)
    pixels = [[torch.cat([patch(x, r, c, kernel, stride, padding), ones], 1) for c in range(W)] for r in range(H)]
    between = model[1:out]
    for module in between:  # linearised: pools average patches, global pooling averages all
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
            k = 2
            rows = range(H // k) if isinstance(module, nn.AvgPool2d) else [0]
            kr = k if isinstance(module, nn.AvgPool2d) else 1
            pixels = [[sum(pixels[r * kr + a][c * k + b] for a in range(kr) for b in range(k)) / (kr * k)
                       for c in range(W // k)] for r in rows]
            H, W = len(pixels), len(pixels[0])
        elif isinstance(module, GlobalAvgPool):
            pixels = [[sum(p for row in pixels for p in row) / (H * W)]]
            H = W = 1
    D = pixels[0][0].shape[1]
    if isinstance(consumer, nn.Linear):
        taps_geometry = ((H, W), (1, 1), (0, 0))
        b_cols = [[torch.cat([b_h.flatten(1), ones], 1)]]
    else:
        taps_geometry = _geometry(consumer)
        b = _grid(b_h)
        (kh, kw), (sh, sw), (ph, pw) = taps_geometry
        Ho, Wo = _out(b.shape[-2], kh, sh, ph), _out(b.shape[-1], kw, sw, pw)
        b_cols = [[torch.cat([patch(b, r, c, (kh, kw), (sh, sw), (ph, pw)), ones], 1) for c in range(Wo)]
                  for r in range(Ho)]
    (kh, kw), (sh, sw), (ph, pw) = taps_geometry
    positions = [(r, c) for r in range(len(b_cols)) for c in range(len(b_cols[0]))]
    zero = torch.zeros(n, D, dtype=X.dtype)
    Bt = []  # per output position: (n, taps, D)
    for r, c in positions:
        rows = []
        for a in range(kh):
            for b_ in range(kw):
                q_r, q_c = r * sh + a - ph, c * sw + b_ - pw
                inside = 0 <= q_r < H and 0 <= q_c < W
                rows.append(pixels[q_r][q_c] if inside else zero)
        Bt.append(torch.stack(rows, 1))
    taps = kh * kw
    r_factor = min(taps, D)
    Vl = V.reshape(n, V.shape[1], -1)  # (n, o, L)
    Bh = [b_cols[r][c] for r, c in positions]
    Vs = [Vl[:, :, pos] for pos in range(len(Bh))]  # V_goal per output position, (n, o)
    o = Vl.shape[1]
    S = sum(torch.einsum("ipd,ipe->de", B, B) for B in Bt) * r_factor / n
    N_v = sum(torch.einsum("ipd,im->dmp", B, v) for v, B in zip(Vs, Bt)).reshape(D, o * taps) / n
    S_h = sum(b.T @ b for b in Bh) / n
    N_h = sum(b.T @ v for v, b in zip(Vs, Bh)) / n
    VV = sum(v.T @ v for v in Vs) / n
    dW = N_h.T @ torch.linalg.pinv(S_h, hermitian=True, rtol=1e-10)
    V_proj = [v - b @ dW.T for v, b in zip(Vs, Bh)]
    N = sum(torch.einsum("ipd,im->dmp", B, v) for v, B in zip(V_proj, Bt)).reshape(D, o * taps) / n
    psi = sum(float(v.pow(2).sum()) for v in V_proj) / n
    return {"S": S, "N_v": N_v, "S_h": S_h, "N_h": N_h, "VV": VV, "N": N, "dW": dW, "psi": torch.tensor(psi),
            "Bt": Bt, "Bh": Bh, "V": Vs, "V_proj": V_proj, "taps": taps, "grid": (H, W)}


def cases() -> list[Case]:
    """Every pair kind in 1-d and 2-d, and the producer's and consumer's kernel 1/3/5, stride 1/2, padding 0/1."""
    found = []
    for dims in (1, 2):
        size = 11 if dims == 1 else 7
        for kind in KINDS:
            found.append(Case(dims=dims, kind=kind, size=size * (2 if "pool" in kind else 1)))
            if "pool" in kind:  # the fused pool path with a strided, unpadded producer and a ragged pool edge
                found.append(Case(dims=dims, kind=kind, kernel=5, stride=2, padding=0, size=size * 2))
        for k in (1, 3, 5):
            for s in (1, 2):
                for p in (0, 1):
                    found.append(Case(dims=dims, kernel=k, stride=s, padding=p, size=size))
                    found.append(Case(dims=dims, next_kernel=k, next_stride=s, next_padding=p, size=size))
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Tiny float64 problems run ~10x faster on one torch thread than on two shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def all_neurons(m) -> candidates.Candidate:
    """TINY's candidate with every neuron of the SVD (no significance cut), for exact identities."""
    cand = candidates.tiny(m, max_neurons=10**6)
    dW = linalg.best_update(m.S_h, m.N_h)
    neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), m.projected_cross_moment(dW))
    return replace(cand, alpha=neurons.alpha, omega=candidates.fan_out(neurons.omega, m),
                   lambdas=[float(v) for v in neurons.lambdas], dW=dW)
