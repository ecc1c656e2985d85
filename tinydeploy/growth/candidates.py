"""Candidate neurons for one growable layer, by method (same interface): TINY and Random here, GradMax,
NORTH-pre and Growing by Folding in modules of their own (``gradmax``, ``north``, ``folding``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tinydeploy.growth import linalg
from tinydeploy.growth.statistics import LayerMoments
from tinydeploy.model.losses import LossFn

METHODS = ("tiny", "gradmax", "north", "folding", "random")


@dataclass(frozen=True)
class Candidate:
    """Neurons (or channels) proposed for the growable layer ``in_index`` whose consumer is ``out_index``.

    ``alpha`` (K, D) is the fan-in, D = the producer's fan-in + 1 in its weight's order (for a conv:
    channel, kernel row, kernel column) with the bias last; ``omega`` (o, K, *taps) the fan-out, with
    taps = () for a vector consumer, the consumer's kernel for a conv, (H*W,) for a linear layer after
    flatten; ``dW`` (o, h+1) the best update of the consumer's (unfolded) weights with its bias last.
    They are added as (s sqrt|g| alpha, s sqrt|g| omega) and g dW, for an amplitude g chosen by line
    search (s = sign of g).
    ``gain`` ranks layers when no line search applies: sum lambda_k^2 + Delta_dW for TINY (Eq. 10-12), the
    squared gradient norm the new weights receive for the function-preserving methods.
    ``details``: what the method found (JSON values; the growth log records them).
    """

    method: str
    in_index: int
    out_index: int
    alpha: torch.Tensor
    omega: torch.Tensor
    dW: torch.Tensor | None
    lambdas: list[float]
    lambda_null: float | None
    psi: float
    gain: float
    signed_amplitude: bool
    searches_amplitude: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return self.alpha.shape[0]


@dataclass(frozen=True)
class Context:
    """What a method may read besides a layer's moments: the current model and the estimation batch the
    moments came from (inputs as the model sees them, targets) with the per-sample loss. NORTH reads the
    existing fan-in weights, Folding clusters the samples by their loss."""

    model: nn.Sequential
    X: torch.Tensor
    y: torch.Tensor
    loss_fn: LossFn


def gaussian_like_goal(m: LayerMoments, covariance: torch.Tensor) -> torch.Tensor:
    """N_null = B^t V_gauss^T / n with V_gauss independent of the inputs, drawn at each of the consumer's
    L output positions from N(0, covariance / L) (``covariance`` sums over the positions): N_z (from a
    standard Gaussian Z) mixed by a square root of that covariance."""
    L = linalg.psd_factor(covariance / m.out_positions)
    if m.taps == 1:
        return m.N_z @ L.T
    N_z = m.N_z.reshape(m.N_z.shape[0], m.n_outputs, m.taps)
    return torch.einsum("dcp,mc->dmp", N_z, L).reshape(m.N_z.shape[0], -1)


def bottleneck(m: LayerMoments) -> float:
    """Psi with the paper's dW* (pseudo-inverse, no ridge), Eq. 4 + Prop. 3.1."""
    return float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, m.best_update()))


def fan_out(columns: torch.Tensor, m: LayerMoments) -> torch.Tensor:
    """(o * taps, K) with rows ordered (output, tap) -> omega (o, K, *taps)."""
    k = columns.shape[1]
    omega = columns.reshape(m.n_outputs, m.taps, k).permute(0, 2, 1)
    return omega.reshape(m.n_outputs, k, *m.tap_shape)


def tiny(m: LayerMoments, max_neurons: int, ridge: float = 0.0) -> Candidate:
    """TINY (Prop. 3.1 + 3.2; for convolutions Lemma C.2-C.3): best update dW*, projected goal, new
    neurons from the SVD of S^(-1/2) N, kept only where lambda_k exceeds the null threshold lambda_-
    (earlier appendix D.3). For a conv pair the kernels are alpha_k (C_prev, k, k) and omega_k
    (C_next, k', k') and the bottleneck drops by at least sum lambda_k^2 (Eq. 71). ``ridge``: see
    ``linalg.ridged`` (0: the paper's formulas). S^(-1/2) cuts the directions below B's numerical rank
    (``linalg.rank_cut``: the activities' dtype and the sample count); where S has none, the Cholesky
    whitening L^(-1) stands in for it (``linalg.whitening``: the same lambda_k and neurons)."""
    dW = m.best_update(ridge)
    covariance = linalg.projected_covariance(m.VV, m.S_h, m.N_h, dW)
    psi = float(torch.trace(covariance)) if ridge == 0.0 else bottleneck(m)  # Eq. 4: Psi = tr(V_proj V_proj^T) / n
    N = m.projected_cross_moment(dW)
    cut = linalg.rank_cut(m.n, m.S.shape[0], m.eps)
    S_inv_sqrt = linalg.whitening(m.factor(m.S, cut, ridge), cut, ridge=ridge)
    neurons = linalg.new_neurons(S_inv_sqrt, N)
    lambda_null = float(linalg.null_threshold(S_inv_sqrt, gaussian_like_goal(m, covariance)))
    significant = int((neurons.lambdas > lambda_null).sum())
    kept = neurons.first(min(max_neurons, significant))
    delta_dw = float(torch.trace(dW @ m.N_h))
    return Candidate(
        method="tiny",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=kept.alpha,
        omega=fan_out(kept.omega, m),
        dW=dW,
        lambdas=[float(v) for v in kept.lambdas],
        lambda_null=lambda_null,
        psi=psi,
        gain=float((kept.lambdas**2).sum()) + delta_dw,
        signed_amplitude=False,
    )


def random(m: LayerMoments, max_neurons: int, generator: torch.Generator | None = None) -> Candidate:
    """Random baseline (Sec. 5.2, App. E.3.2): Gaussian fan-in and fan-out normalised to unit RMS,
    as many neurons as TINY's rank bound allows, amplitude searched over both signs (Eq. 14)."""
    d1, o = m.S.shape[0], m.N_v.shape[1]
    k = min(max_neurons, d1, o)
    options = {"dtype": m.S.dtype, "device": m.S.device, "generator": generator}
    alpha = torch.randn(k, d1, **options)
    omega = torch.randn(o, k, **options)
    if k:
        alpha, omega = alpha / alpha.pow(2).mean().sqrt(), omega / omega.pow(2).mean().sqrt()
    omega = fan_out(omega, m)
    psi = bottleneck(m)
    return Candidate(
        method="random",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=alpha,
        omega=omega,
        dW=None,
        lambdas=[],
        lambda_null=None,
        psi=psi,
        gain=0.0,
        signed_amplitude=True,
    )


def balance(c: Candidate, producer_rms: float, consumer_rms: float) -> Candidate:
    """Rescale each neuron as (c_k alpha_k, omega_k / c_k) so that its fan-in and fan-out have the same
    size relative to the existing weights of their layers (RMS(c alpha_k) / producer_rms =
    RMS(omega_k / c) / consumer_rms). The product omega_k alpha_k^T, hence the linearised effect, Eq. 9-12
    and Eq. 71, are unchanged, and so is the function for positively homogeneous activations (ReLU);
    only how the new weights sit next to the old ones for the optimizer changes. Neurons with a zero
    fan-in or fan-out (GradMax) are left as they are."""
    k = c.n_neurons
    if k == 0:
        return c
    a_rms = c.alpha.pow(2).mean(dim=1).sqrt()
    o_rms = c.omega.transpose(0, 1).reshape(k, -1).pow(2).mean(dim=1).sqrt()
    ok = (a_rms > 0) & (o_rms > 0)
    scale = torch.where(ok, ((o_rms / consumer_rms) / (a_rms / producer_rms).clamp_min(1e-300)).sqrt(),
                        torch.ones_like(a_rms))
    omega = c.omega / scale.reshape(1, k, *[1] * (c.omega.dim() - 2))
    return replace(c, alpha=c.alpha * scale[:, None], omega=omega)


def check_method(method: str, model: nn.Sequential, growable: list[int], task: str) -> None:
    """Raise a one-line ``TinyDeployError`` when ``method`` cannot grow this model (before any work)."""
    if method == "folding":
        from tinydeploy.growth.folding import check_model

        check_model(model, growable, task)


def propose(method: str, m: LayerMoments, max_neurons: int, generator: torch.Generator | None = None,
            ridge: float = 0.0, context: Context | None = None) -> Candidate:
    """Dispatch to the candidate function of ``method`` (``ridge``: TINY's, see ``linalg.ridged``;
    ``context``: the model and estimation batch, needed by NORTH and Folding)."""
    if method == "tiny":
        return tiny(m, max_neurons, ridge)
    if method == "random":
        return random(m, max_neurons, generator)
    if method == "gradmax":
        from tinydeploy.growth.gradmax import gradmax

        return gradmax(m, max_neurons)
    if method in ("north", "folding") and context is None:
        raise ValueError(f"growth method '{method}' needs the model and the estimation batch (context)")
    if method == "north":
        from tinydeploy.growth.north import north

        return north(m, max_neurons, context, generator)
    if method == "folding":
        from tinydeploy.growth.folding import folding

        return folding(m, max_neurons, context, generator)
    raise ValueError(f"unknown growth method '{method}': use one of {', '.join(METHODS)}")
