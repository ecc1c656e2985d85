"""Candidate neurons for one growable layer, by method: TINY, GradMax or Random (same interface)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinydeploy.growth import linalg
from tinydeploy.growth.statistics import LayerMoments

METHODS = ("tiny", "gradmax", "random")

#: GradMax fan-out scale (App. E.3.1, Eq. 195): root-mean-square of the new fan-out entries.
GRADMAX_FAN_OUT_RMS = 1e-3


@dataclass(frozen=True)
class Candidate:
    """Neurons proposed for the hidden layer feeding linear module ``out_index``.

    ``alpha`` (K, d+1) and ``omega`` (o, K) are added as (s sqrt|g| alpha, s sqrt|g| omega) and ``dW``
    (o, h+1) as g dW, for an amplitude g chosen by line search (s = sign of g).
    ``gain`` ranks layers when no line search applies: sum lambda_k^2 + Delta_dW for TINY (Eq. 10-12).
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

    @property
    def n_neurons(self) -> int:
        return self.alpha.shape[0]


def _gaussian_like_goal(m: LayerMoments, covariance: torch.Tensor) -> torch.Tensor:
    """N_null = B_prev V_gauss^T / n with V_gauss ~ N(0, covariance), independent of B_prev."""
    return m.N_z @ linalg.psd_sqrt(covariance).T


def tiny(m: LayerMoments, max_neurons: int) -> Candidate:
    """TINY (Prop. 3.1 + 3.2): best update dW*, projected goal, new neurons from the SVD of S^(-1/2) N,
    kept only where lambda_k exceeds the null threshold lambda_- (earlier appendix D.3)."""
    dW = linalg.best_update(m.S_h, m.N_h)
    psi = float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW))
    N = linalg.projected_cross_moment(m.N_v, m.S_ph, dW)
    S_inv_sqrt = linalg.psd_inverse_sqrt(m.S)
    neurons = linalg.new_neurons(S_inv_sqrt, N)
    covariance = linalg.projected_covariance(m.VV, m.S_h, m.N_h, dW)
    lambda_null = float(linalg.null_threshold(S_inv_sqrt, _gaussian_like_goal(m, covariance)))
    significant = int((neurons.lambdas > lambda_null).sum())
    kept = neurons.first(min(max_neurons, significant))
    delta_dw = float(torch.trace(dW @ m.N_h))
    return Candidate(
        method="tiny",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=kept.alpha,
        omega=kept.omega,
        dW=dW,
        lambdas=[float(v) for v in kept.lambdas],
        lambda_null=lambda_null,
        psi=psi,
        gain=float((kept.lambdas**2).sum()) + delta_dw,
        signed_amplitude=False,
    )


def gradmax(m: LayerMoments, max_neurons: int) -> Candidate:
    """GradMax (App. B.1, E.3.1): fan-in 0, fan-out = top eigenvectors of N~^T N~ (unprojected goal),
    scaled to a small norm. The function is unchanged at insertion, so no amplitude is searched."""
    dW = linalg.best_update(m.S_h, m.N_h)
    psi = float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW))
    rank = min(m.N_v.shape)
    omega, eigenvalues = linalg.gradmax_fan_out(m.N_v, min(max_neurons, rank))
    null = _gaussian_like_goal(m, m.VV)
    lambda_null = float(torch.linalg.matrix_norm(null, ord=2))
    lambdas = eigenvalues.sqrt()
    k = int((lambdas > lambda_null).sum())
    omega, lambdas = omega[:, :k], lambdas[:k]
    if k:
        omega = omega * (GRADMAX_FAN_OUT_RMS / omega.pow(2).mean().sqrt())
    return Candidate(
        method="gradmax",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=torch.zeros(k, m.S.shape[0], dtype=m.S.dtype, device=m.S.device),
        omega=omega,
        dW=None,
        lambdas=[float(v) for v in lambdas],
        lambda_null=lambda_null,
        psi=psi,
        gain=float((lambdas**2).sum()),
        signed_amplitude=False,
        searches_amplitude=False,
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
    dW = linalg.best_update(m.S_h, m.N_h)
    psi = float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW))
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


def propose(method: str, m: LayerMoments, max_neurons: int, generator: torch.Generator | None = None) -> Candidate:
    """Dispatch to the candidate function of ``method``."""
    if method == "tiny":
        return tiny(m, max_neurons)
    if method == "gradmax":
        return gradmax(m, max_neurons)
    if method == "random":
        return random(m, max_neurons, generator)
    raise ValueError(f"unknown growth method '{method}': use one of {', '.join(METHODS)}")
