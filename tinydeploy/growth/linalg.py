"""Closed-form pieces of TINY (Verbockhaven et al., TMLR 2024) as pure functions of matrices.

Orientation follows the paper: activities are stored one column per sample, so with n samples
B_prev is (d+1, n) (inputs of the layer that gains neurons, with a row of ones for the bias), B_h is
(h+1, n) (inputs of the next layer) and V_goal is (o, n) with V_goal = -d(sum_i l_i)/dA_out.
The statistics below are the already-divided moments: S = B B^T / n and N = B V^T / n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Eigenvalues of S below this fraction of the largest are treated as 0 in S^+ and S^(-1/2).
DEFAULT_RELATIVE_CUT = 1e-10


def ridged(S: torch.Tensor, ridge: float) -> torch.Tensor:
    """S + ridge * (tr(S) / d) I: a ridge relative to the mean eigenvalue (scale-free; 0 leaves S)."""
    if ridge == 0.0:
        return S
    return S + ridge * (torch.trace(S) / S.shape[0]) * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)


def rank_cut(n: int, d: int, eps: float) -> float:
    """Relative eigenvalue cut of S = B B^T / n (B: d x n, n samples, entries of unit roundoff ``eps``):
    the larger of the two levels below which an eigenvalue sigma of S is not measured.

    * Sampling: S estimates E[b b^T] from n samples. The estimate couples a direction of variance sigma
      with the top one (variance sigma_max) through a cross term of standard error
      ~ sqrt(sigma sigma_max / n); the direction (and so its eigenvalue) is resolved only while that
      coupling is below sigma itself (Davis-Kahan), i.e. sigma / sigma_max > 1 / n. This is App. E.1's
      "variance grows as 1 / (n sigma_min)" turned into a cut.
    * Rounding: singular values of B below max(n, d) eps s_max are indistinguishable from the rounding of
      its entries (the LAPACK / numpy ``matrix_rank`` tolerance), i.e. eigenvalues below
      (max(n, d) eps)^2 sigma_max.

    Never below ``DEFAULT_RELATIVE_CUT``. Directions below the cut would get fan-in weights
    ~ sigma^(-1/2) (Prop. 3.2: alpha_k = sqrt(lambda_k) S^(-1/2) u_k) fitted to noise: on raw pixels
    with near-constant pixels, fan-ins in the thousands and test outputs in the hundreds."""
    return max(DEFAULT_RELATIVE_CUT, 1.0 / n, (max(n, d) * eps) ** 2)


@dataclass(frozen=True)
class Spectrum:
    """S = O diag(sigma) O^T of a symmetric PSD matrix (``torch.linalg.eigh``), computed once: S^+ and
    S^(-1/2) with any cut and ridge come from it (``ridged(S, r)`` has the same O and the eigenvalues
    sigma + r mean(sigma)), so a matrix that is one pair's S_h and the next pair's S is decomposed once."""

    sigma: torch.Tensor
    O: torch.Tensor

    @staticmethod
    def of(S: torch.Tensor) -> Spectrum:
        sigma, O = torch.linalg.eigh(S)
        return Spectrum(sigma, O)


@dataclass(frozen=True)
class Cholesky:
    """ridged(S, ridge) = L L^T for a matrix none of whose eigenvalues the cut would drop
    (``uncut_cholesky``): then S^+ = S^(-1), and L^(-1) whitens like S^(-1/2) (``whitening``), at a
    fraction of an eigendecomposition's cost."""

    L: torch.Tensor


def factorise(S: torch.Tensor, rel_cut: float = DEFAULT_RELATIVE_CUT, ridge: float = 0.0,
              spectrum: Callable[[torch.Tensor], Spectrum] = Spectrum.of) -> Cholesky | Spectrum:
    """The Cholesky factor of ridged(S) where no eigenvalue is under ``rel_cut`` times the largest, else the
    ``Spectrum`` of S (which applies the cut and the ridge itself), from ``spectrum`` (e.g. a cache)."""
    L = uncut_cholesky(ridged(S, ridge), rel_cut)
    return Cholesky(L) if L is not None else spectrum(S)


def _eigen(S: torch.Tensor | Spectrum, rel_cut: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma^(-1/2) with 1/0 := 0 below the cut, O) from ridged(S) = O diag(sigma) O^T."""
    spectrum = S if isinstance(S, Spectrum) else Spectrum.of(S)
    sigma, O = spectrum.sigma, spectrum.O
    if ridge != 0.0:
        sigma = sigma + ridge * sigma.mean()
    tiny = torch.finfo(sigma.dtype).tiny
    keep = sigma > rel_cut * sigma.max().clamp_min(tiny)
    inv_sqrt = torch.where(keep, sigma.clamp_min(tiny).rsqrt(), torch.zeros_like(sigma))
    return inv_sqrt, O


def psd_inverse_sqrt(S: torch.Tensor | Spectrum, rel_cut: float = DEFAULT_RELATIVE_CUT,
                     ridge: float = 0.0) -> torch.Tensor:
    """S^(-1/2) = O diag(sigma)^(-1/2) O^T from S = O diag(sigma) O^T (or its ``Spectrum``), with 1/0 := 0.

    Eigenvalues below ``rel_cut * max(sigma)`` are cut (treated as 0), which keeps the result
    finite when S is singular (e.g. a constant input feature, or n < d). ``ridge`` > 0 inverts
    ``ridged(S, ridge)`` instead: directions of S far below its mean eigenvalue, which a finite
    estimation batch measures poorly (App. E.1: the variance grows as 1 / (n sigma_min)), are damped.
    """
    inv_sqrt, O = _eigen(S, rel_cut, ridge)
    return (O * inv_sqrt) @ O.T


def psd_pinv(S: torch.Tensor | Spectrum, rel_cut: float = DEFAULT_RELATIVE_CUT, ridge: float = 0.0) -> torch.Tensor:
    """S^+, the pseudo-inverse of a symmetric PSD matrix with the same relative eigenvalue cut (and ridge)."""
    inv_sqrt, O = _eigen(S, rel_cut, ridge)
    return (O * inv_sqrt.square()) @ O.T


def psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    """A square root L of a symmetric PSD matrix (L L^T = S), negative round-off clipped to 0."""
    sigma, O = torch.linalg.eigh(S)
    return O * sigma.clamp_min(0).sqrt()


def psd_factor(S: torch.Tensor) -> torch.Tensor:
    """A square root C of a symmetric PSD matrix (C C^T = S up to rounding), for drawing Gaussians of
    covariance S: the Cholesky factor of S + j I with j = 16 d eps max(diag S), a jitter at the level of
    S's own rounding that keeps singular S (dead units, n < d) factorable. Unique and continuous in S,
    and 20x cheaper than an eigendecomposition (``psd_sqrt``, the fallback should Cholesky still fail)."""
    d = S.shape[0]
    jitter = 16 * d * torch.finfo(S.dtype).eps * float(S.diagonal().abs().max()) if d else 0.0
    factor, info = torch.linalg.cholesky_ex(S + (jitter + torch.finfo(S.dtype).tiny) * torch.eye(
        d, dtype=S.dtype, device=S.device))
    return factor if int(info) == 0 else psd_sqrt(S)


def best_update(S_h: torch.Tensor | Spectrum | Cholesky, N_h: torch.Tensor, rel_cut: float = DEFAULT_RELATIVE_CUT,
                ridge: float = 0.0) -> torch.Tensor:
    """Prop. 3.1: dW* = N_h^T S_h^+, the best move of the existing weights of the next layer.

    S_h = B_h B_h^T / n is (h+1, h+1) and N_h = B_h V_goal^T / n is (h+1, o); dW* is (o, h+1) and its
    activity update dW* B_h is the projection of V_goal onto the row space of B_h (with ``ridge`` > 0:
    the ridge regression of V_goal on B_h, see ``ridged``). S_h may come as its ``Spectrum``, or as the
    ``Cholesky`` factor of ridged(S_h, ridge) (solved, the cut and ridge already settled); a matrix is
    ``factorise``d first.
    """
    if isinstance(S_h, torch.Tensor):
        S_h = factorise(S_h, rel_cut, ridge)
    if isinstance(S_h, Cholesky):
        return torch.cholesky_solve(N_h, S_h.L).T
    return N_h.T @ psd_pinv(S_h, rel_cut, ridge)


def whitening(S: Spectrum | Cholesky, rel_cut: float = DEFAULT_RELATIVE_CUT, ridge: float = 0.0) -> torch.Tensor:
    """W with W^T W = S^+ on the directions the cut keeps, the whitening of Prop. 3.2: S^(-1/2)
    (``psd_inverse_sqrt``) from a ``Spectrum``, L^(-1) from a ``Cholesky`` factor. W = Q S^(-1/2) for an
    orthogonal Q, so W N has the singular values of S^(-1/2) N and ``new_neurons`` gives the same neurons."""
    if isinstance(S, Cholesky):
        eye = torch.eye(S.L.shape[0], dtype=S.L.dtype, device=S.L.device)
        return torch.linalg.solve_triangular(S.L, eye, upper=False)
    return psd_inverse_sqrt(S, rel_cut, ridge)


def uncut_cholesky(S: torch.Tensor, rel_cut: float) -> torch.Tensor | None:
    """The Cholesky factor of S when no eigenvalue of S is below ``rel_cut`` times the largest (then
    S^+ = S^(-1), and solving with the factor costs a fraction of an eigendecomposition); else None.

    The test is sufficient, not exact: S - tau I is positive definite (it factors) with
    tau = rel_cut * max_i sum_j |S_ij| >= rel_cut * sigma_max (the row-sum norm bounds every eigenvalue),
    so sigma_min > tau >= rel_cut * sigma_max. Matrices near the cut fall back to the eigendecomposition."""
    if S.shape[0] == 0:
        return None
    tau = rel_cut * float(S.abs().sum(1).max())
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    if int(torch.linalg.cholesky_ex(S - tau * eye)[1]):  # S = 0, NaN or inf entries fail here too
        return None
    return torch.linalg.cholesky_ex(S)[0]  # S = (S - tau I) + tau I, tau >= 0, factors when S - tau I does


def bottleneck(v_sq_norm: torch.Tensor, S_h: torch.Tensor, N_h: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """Psi = ||V_goal - dW B_h||_F^2 / n from moments (Eq. 4 with the best update of Prop. 3.1).

    ``v_sq_norm`` is ||V_goal||_F^2 / n. Expanding the square: Psi = |V|^2/n - 2 tr(dW N_h) + tr(dW S_h dW^T).
    """
    return v_sq_norm - 2 * torch.trace(dW @ N_h) + torch.trace(dW @ S_h @ dW.T)


def projected_cross_moment(N_prev_v: torch.Tensor, S_prev_h: torch.Tensor, dW: torch.Tensor,
                           taps: int = 1) -> torch.Tensor:
    """N = B_prev V_goal_proj^T / n with V_goal_proj = V_goal - dW* B_h.

    ``N_prev_v`` = B_prev V_goal^T / n is (d+1, o) and ``S_prev_h`` = B_prev B_h^T / n is (d+1, h+1).
    With ``taps`` > 1 (a consumer window of several taps, App. C.2.2) N_v is (D, o * taps) and S_ph
    (D, (h+1) * taps), columns ordered (output or input m, tap p), and N[:, (m, p)] = N_v[:, (m, p)] -
    sum_h dW*[m, h] S_ph[:, (h, p)].
    """
    if taps == 1:
        return N_prev_v - S_prev_h @ dW.T
    D = S_prev_h.shape[0]
    moved = torch.einsum("dhp,mh->dmp", S_prev_h.reshape(D, dW.shape[1], taps), dW)
    return N_prev_v - moved.reshape(D, -1)


def projected_covariance(
    VV: torch.Tensor, S_h: torch.Tensor, N_h: torch.Tensor, dW: torch.Tensor
) -> torch.Tensor:
    """V_goal_proj V_goal_proj^T / n (o, o) from moments, with VV = V_goal V_goal^T / n."""
    cross = dW @ N_h
    return VV - cross - cross.T + dW @ S_h @ dW.T


@dataclass(frozen=True)
class NewNeurons:
    """Prop. 3.2: K neurons (alpha_k, omega_k) and their singular values lambda_k (decreasing).

    ``alpha`` is (K, d+1): fan-in weights with the bias last; ``omega`` is (o, K): fan-out weights.
    """

    alpha: torch.Tensor
    omega: torch.Tensor
    lambdas: torch.Tensor

    def first(self, k: int) -> "NewNeurons":
        """The k neurons with the largest lambda."""
        return NewNeurons(self.alpha[:k], self.omega[:, :k], self.lambdas[:k])


def new_neurons(S_inv_sqrt: torch.Tensor, N: torch.Tensor, rel_cut: float = DEFAULT_RELATIVE_CUT) -> NewNeurons:
    """Prop. 3.2: SVD S^(-1/2) N = sum_k lambda_k u_k q_k^T, alpha_k = sqrt(lambda_k) S^(-1/2) u_k,
    omega_k = sqrt(lambda_k) q_k.

    ``S_inv_sqrt`` = S^(-1/2) (``psd_inverse_sqrt``) with S = B_prev B_prev^T / n, (d+1, d+1), or any
    ``whitening`` W = Q S^(-1/2) (Q orthogonal): W N = Q S^(-1/2) N has the same lambda_k and q_k, its
    u'_k = Q u_k, and W^T u'_k = S^(-1/2) u_k, so alpha_k is the same;
    N = B_prev V_goal_proj^T / n is (d+1, o). Adding the first K neurons lowers the bottleneck by
    exactly sum_{k<=K} lambda_k^2 (Eq. 9, linearised effect). Only the R = rank(S^(-1/2) N) <= min(d+1, o)
    non-zero directions are returned.
    """
    U, lambdas, Qt = torch.linalg.svd(S_inv_sqrt @ N, full_matrices=False)
    tiny = torch.finfo(N.dtype).tiny
    rank = int((lambdas > rel_cut * lambdas.max().clamp_min(tiny)).sum()) if lambdas.numel() else 0
    U, lambdas, Qt = U[:, :rank], lambdas[:rank], Qt[:rank]
    root = lambdas.sqrt()
    alpha = (S_inv_sqrt.T @ U * root).T
    omega = Qt.T * root
    return NewNeurons(alpha=alpha, omega=omega, lambdas=lambdas)


def null_threshold(S_inv_sqrt: torch.Tensor, N_null: torch.Tensor) -> torch.Tensor:
    """lambda_-: the largest singular value of S^(-1/2) N_null (earlier appendix, D.3).

    N_null = B_prev V_gauss^T / n where V_gauss has the covariance of V_goal_proj but is independent of
    B_prev: singular values of S^(-1/2) N below lambda_- are indistinguishable from noise.

    Computed as the square root of the largest eigenvalue of the smaller Gram matrix of M = S^(-1/2) N_null
    (M^T M or M M^T): the largest eigenvalue is accurate to the dtype's relative precision, and eigvalsh
    is 1.3-1.9x faster than the SVD behind ``matrix_norm(M, 2)`` at d = 65..577 on CPU
    (``benchmarks/linalg_timing.py``).
    """
    M = S_inv_sqrt @ N_null
    gram = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


def gradmax_fan_out(N_tilde: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GradMax (App. B.1): fan-out Omega* = the top-k eigenvectors of N~^T N~ with N~ = B_prev V_goal^T / n
    (unprojected). Returns (omega (o, k) with unit columns, eigenvalues (k,) = squared fan-in gradient norms)."""
    eigenvalues, vectors = torch.linalg.eigh(N_tilde.T @ N_tilde)
    order = torch.argsort(eigenvalues, descending=True)[:k]
    return vectors[:, order], eigenvalues[order].clamp_min(0)
