"""Property tests of the closed forms in ``tinydeploy.growth.linalg`` on random matrices of random shapes
and ranks, in float64, against brute-force computations: Prop. 3.1 (orthogonality, least squares),
Prop. 3.2 (optimality against perturbations), Eq. 9 for every K, the relative eigenvalue cut, the
significance threshold's norm and scale invariance, and GradMax's closed form (App. B.1).

Hypothesis draws shapes, ranks and seeds; ``derandomize`` keeps CI deterministic. Singular values are
drawn in a bounded range so every tolerance below holds with a wide margin in float64, while a wrong
term (a sign, a missing projection, a different norm) is off by orders of magnitude more.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinydeploy.growth import linalg

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=gen))
    return q


def _spectrum(k: int, gen: torch.Generator) -> torch.Tensor:
    """k singular values in [0.3, 3] (condition number <= 10)."""
    return 0.3 + 2.7 * torch.rand(k, dtype=F64, generator=gen)


@dataclass
class Activities:
    """B_prev (d1, n) of rank r, B_h (h1, n) of rank r_h sharing part of B_prev's row space, V (o, n)."""

    B_prev: torch.Tensor
    B_h: torch.Tensor
    V: torch.Tensor
    gen: torch.Generator

    @property
    def n(self) -> int:
        return self.V.shape[1]

    def moments(self) -> dict[str, torch.Tensor]:
        n, Bp, Bh, V = self.n, self.B_prev, self.B_h, self.V
        return {"S": Bp @ Bp.T / n, "N_v": Bp @ V.T / n, "S_ph": Bp @ Bh.T / n, "S_h": Bh @ Bh.T / n,
                "N_h": Bh @ V.T / n, "VV": V @ V.T / n}


@st.composite
def activities(draw) -> Activities:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    d1, h1, o = draw(st.integers(1, 7)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    r, r_h = draw(st.integers(1, d1)), draw(st.integers(1, h1))
    n = draw(st.integers(r + r_h, r + r_h + 25))  # n < d1 happens: more features than samples
    basis = _orthonormal(n, r + r_h, gen)  # row spaces: B_prev uses the first r directions
    root_n = n**0.5
    B_prev = root_n * _orthonormal(d1, r, gen) @ torch.diag(_spectrum(r, gen)) @ basis[:, :r].T
    mixed = basis @ _orthonormal(r + r_h, r_h, gen)  # overlaps B_prev's row space and leaves it
    B_h = root_n * _orthonormal(h1, r_h, gen) @ torch.diag(_spectrum(r_h, gen)) @ mixed.T
    V = torch.randn(o, n, dtype=F64, generator=gen)
    return Activities(B_prev, B_h, V, gen)


def _psi(residual: torch.Tensor) -> float:
    return float(residual.pow(2).sum() / residual.shape[1])


def _solution(a: Activities):
    """dW*, V_goal_proj, S^(-1/2), projected N and the new neurons, all from the moments."""
    m = a.moments()
    dW = linalg.best_update(m["S_h"], m["N_h"])
    V_proj = a.V - dW @ a.B_h
    S_inv_sqrt = linalg.psd_inverse_sqrt(m["S"])
    N = linalg.projected_cross_moment(m["N_v"], m["S_ph"], dW)
    return m, dW, V_proj, S_inv_sqrt, N, linalg.new_neurons(S_inv_sqrt, N)


@PROPERTY
@given(activities())
def test_prop_3_1_best_update_is_the_least_squares_move(a: Activities) -> None:
    m, dW, V_proj, *_ = _solution(a)
    scale = float(a.V.norm() * a.B_h.norm())
    assert float((V_proj @ a.B_h.T).abs().max()) <= 1e-10 * scale  # residual orthogonal to B_h
    psi = _psi(V_proj)
    assert float(linalg.bottleneck(torch.trace(m["VV"]), m["S_h"], m["N_h"], dW)) == pytest.approx(psi, rel=1e-9, abs=1e-12)
    # Pythagoras: any other move E of the next layer's weights adds exactly ||E B_h||^2
    for step in (1e-4, 1.0):
        E = step * torch.randn(dW.shape, dtype=F64, generator=a.gen)
        other = _psi(a.V - (dW + E) @ a.B_h)
        assert other == pytest.approx(psi + _psi(E @ a.B_h), rel=1e-9, abs=1e-12)
        assert other >= psi


@PROPERTY
@given(activities())
def test_projected_moments_equal_the_explicit_products(a: Activities) -> None:
    m, dW, V_proj, _, N, _ = _solution(a)
    n = a.n
    torch.testing.assert_close(N, a.B_prev @ V_proj.T / n, rtol=0, atol=1e-11 * float(a.V.norm() * a.B_prev.norm()) / n)
    covariance = linalg.projected_covariance(m["VV"], m["S_h"], m["N_h"], dW)
    torch.testing.assert_close(covariance, V_proj @ V_proj.T / n, rtol=0, atol=1e-11 * float(a.V.norm()) ** 2 / n)


@PROPERTY
@given(activities())
def test_prop_3_2_eq_9_every_k_and_optimality_against_perturbations(a: Activities) -> None:
    m, dW, V_proj, S_inv_sqrt, N, neurons = _solution(a)
    psi = _psi(V_proj)
    singular = torch.linalg.svdvals(S_inv_sqrt @ N)
    assert len(neurons.lambdas) == int((singular > 1e-8 * singular.max()).sum())  # R = rank(S^(-1/2) N)
    assert len(neurons.lambdas) <= min(torch.linalg.matrix_rank(a.B_prev), a.V.shape[0])
    assert torch.all(neurons.lambdas[:-1] >= neurons.lambdas[1:])
    for k in range(len(neurons.lambdas) + 1):
        first = neurons.first(k)
        residual = _psi(V_proj - first.omega @ first.alpha @ a.B_prev)
        assert residual == pytest.approx(psi - float(first.lambdas.pow(2).sum()), rel=0, abs=1e-10 * psi)  # Eq. 9
        if k == 0:
            continue
        for step in (1e-3, 1e-1, 10.0):  # any other K neurons do no better (Eckart-Young in the whitened space)
            alpha = first.alpha + step * torch.randn(first.alpha.shape, dtype=F64, generator=a.gen)
            omega = first.omega + step * torch.randn(first.omega.shape, dtype=F64, generator=a.gen)
            assert _psi(V_proj - omega @ alpha @ a.B_prev) >= residual - 1e-10 * psi


@PROPERTY
@given(activities())
def test_new_neurons_variations_are_orthogonal_with_norm_n_lambda_squared(a: Activities) -> None:
    *_, neurons = _solution(a)
    variations = [torch.outer(neurons.omega[:, k], neurons.alpha[k] @ a.B_prev) for k in range(len(neurons.lambdas))]
    if not variations:
        return
    flat = torch.stack([v.flatten() for v in variations])
    gram = flat @ flat.T / a.n
    torch.testing.assert_close(gram, torch.diag(neurons.lambdas**2), rtol=0, atol=1e-10 * float(neurons.lambdas[0]) ** 2)


@PROPERTY
@given(activities(), st.sampled_from([1e-3, 1e3]))
def test_scaling_the_inputs_or_the_goal_keeps_every_decision(a: Activities, c: float) -> None:
    """B_prev -> c B_prev leaves S^(-1/2) N, the lambdas and the threshold unchanged (alpha -> alpha/c);
    V -> c V scales the lambdas and the threshold by c, so the significance test decides the same."""
    _, dW, _, S_inv_sqrt, N, neurons = _solution(a)
    m = a.moments()
    Z = torch.randn(a.V.shape, dtype=F64, generator=a.gen)
    N_z = a.B_prev @ Z.T / a.n
    threshold = linalg.null_threshold(S_inv_sqrt, N_z)
    scaled = linalg.new_neurons(linalg.psd_inverse_sqrt(c * c * m["S"]), c * N)
    assert len(scaled.lambdas) == len(neurons.lambdas)
    torch.testing.assert_close(scaled.lambdas, neurons.lambdas, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(scaled.omega @ scaled.alpha * c, neurons.omega @ neurons.alpha, rtol=1e-7, atol=1e-9)
    scaled_threshold = linalg.null_threshold(linalg.psd_inverse_sqrt(c * c * m["S"]), c * N_z)
    assert float(scaled_threshold) == pytest.approx(float(threshold), rel=1e-8)
    goal = linalg.new_neurons(S_inv_sqrt, c * N)
    torch.testing.assert_close(goal.lambdas, c * neurons.lambdas, rtol=1e-8, atol=1e-12 * c)
    covariance = linalg.projected_covariance(m["VV"], m["S_h"], m["N_h"], dW)
    null = linalg.null_threshold(S_inv_sqrt, N_z @ linalg.psd_sqrt(covariance).T)
    null_scaled = linalg.null_threshold(S_inv_sqrt, N_z @ linalg.psd_sqrt(c * c * covariance).T)
    assert float(null_scaled) == pytest.approx(c * float(null), rel=1e-7)
    assert int((goal.lambdas > null_scaled).sum()) == int((neurons.lambdas > null).sum())


@PROPERTY
@given(activities(), st.sampled_from([1e-6, 1.0, 1e6]))
def test_psd_functions_against_brute_force(a: Activities, c: float) -> None:
    """S^(-1/2), S^+ and a square root of a (possibly singular) S at any scale, against the definitions."""
    S = c * a.moments()["S"]
    rank = int(torch.linalg.matrix_rank(a.B_prev))
    inv_sqrt = linalg.psd_inverse_sqrt(S)
    assert torch.isfinite(inv_sqrt).all()
    projector = inv_sqrt @ S @ inv_sqrt  # identity on the range of S, zero on its null space
    assert round(float(torch.trace(projector))) == rank
    torch.testing.assert_close(projector @ projector, projector, rtol=0, atol=1e-9)
    torch.testing.assert_close(inv_sqrt * c**0.5, linalg.psd_inverse_sqrt(a.moments()["S"]), rtol=1e-7, atol=1e-9)
    pinv = linalg.psd_pinv(S)
    torch.testing.assert_close(pinv, torch.linalg.pinv(S, hermitian=True, rtol=1e-8), rtol=1e-7, atol=1e-9 / c)
    torch.testing.assert_close(S @ pinv @ S, S, rtol=0, atol=1e-9 * c)
    root = linalg.psd_sqrt(S)
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root.T, S, rtol=0, atol=1e-10 * float(S.diagonal().max()))


def test_psd_sqrt_clips_negative_round_off() -> None:
    S = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64) - 1e-15 * torch.eye(2, dtype=F64)  # eigenvalues 2, -1e-15
    root = linalg.psd_sqrt(S)
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root.T, torch.ones(2, 2, dtype=F64), rtol=0, atol=1e-12)


def test_relative_cut_keeps_small_eigenvalues_above_it_and_drops_those_below_at_any_scale() -> None:
    """DEFAULT_RELATIVE_CUT = 1e-10: an eigenvalue 1e-8 x the largest is inverted, 1e-12 x the largest is not."""
    O = _orthonormal(4, 4, torch.Generator().manual_seed(0))
    for scale in (1e-6, 1.0, 1e6):
        sigma = scale * torch.tensor([1.0, 1e-2, 1e-8, 1e-12], dtype=F64)
        expected = (O * torch.tensor([1.0, 10.0, 1e4, 0.0], dtype=F64) / scale**0.5) @ O.T
        torch.testing.assert_close(linalg.psd_inverse_sqrt((O * sigma) @ O.T), expected, rtol=1e-5, atol=1e-6 / scale**0.5)


def test_an_explicit_cut_reaches_every_function_that_takes_one() -> None:
    S = torch.diag(torch.tensor([1.0, 1e-3], dtype=F64))
    kept_one = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(linalg.psd_pinv(S, rel_cut=1e-2), kept_one)
    torch.testing.assert_close(linalg.psd_pinv(S, rel_cut=1e-4), torch.diag(torch.tensor([1.0, 1e3], dtype=F64)))
    N_h = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    torch.testing.assert_close(linalg.best_update(S, N_h, rel_cut=1e-2), N_h.T @ kept_one)
    N = torch.diag(torch.tensor([1.0, 1e-3], dtype=F64))
    assert len(linalg.new_neurons(torch.eye(2, dtype=F64), N, rel_cut=1e-2).lambdas) == 1
    assert len(linalg.new_neurons(torch.eye(2, dtype=F64), N, rel_cut=1e-4).lambdas) == 2


def test_only_non_zero_directions_become_neurons() -> None:
    """A rank-1 projected goal yields exactly one neuron, however many outputs; no outputs, none."""
    gen = torch.Generator().manual_seed(1)
    u, q = torch.randn(5, 1, dtype=F64, generator=gen), torch.randn(4, 1, dtype=F64, generator=gen)
    neurons = linalg.new_neurons(torch.eye(5, dtype=F64), u @ q.T)
    assert len(neurons.lambdas) == 1 and neurons.alpha.shape == (1, 5) and neurons.omega.shape == (4, 1)
    assert float(neurons.lambdas[0]) == pytest.approx(float(u.norm() * q.norm()), rel=1e-12)
    empty = linalg.new_neurons(torch.eye(5, dtype=F64), torch.zeros(5, 0, dtype=F64))
    assert empty.alpha.shape == (0, 5) and empty.omega.shape == (0, 0) and empty.lambdas.numel() == 0


@PROPERTY
@given(activities())
def test_null_threshold_is_the_spectral_norm(a: Activities) -> None:
    m = a.moments()
    S_inv_sqrt = linalg.psd_inverse_sqrt(m["S"])
    N_null = a.B_prev @ torch.randn(a.V.shape, dtype=F64, generator=a.gen).T / a.n
    expected = torch.linalg.svdvals(S_inv_sqrt @ N_null)[0]
    assert float(linalg.null_threshold(S_inv_sqrt, N_null)) == pytest.approx(float(expected), rel=1e-12)


@PROPERTY
@given(activities(), st.sampled_from([1e-3, 1.0, 1e3]))
def test_gradmax_fan_out_is_the_top_eigenvectors_of_n_tilde(a: Activities, c: float) -> None:
    """App. B.1: Omega* = top-k eigenvectors of N~^T N~, eigenvalues = squared singular values of N~, and no
    unit fan-out gets a larger fan-in gradient norm ||N~ omega||^2 than the first."""
    N_tilde = c * a.moments()["N_v"]
    o = N_tilde.shape[1]
    squared = torch.zeros(o, dtype=F64)
    singular = torch.linalg.svdvals(N_tilde) ** 2
    squared[: len(singular)] = singular
    for k in range(1, o + 1):
        omega, eigenvalues = linalg.gradmax_fan_out(N_tilde, k)
        assert omega.shape == (o, k)
        torch.testing.assert_close(eigenvalues, squared[:k], rtol=1e-9, atol=1e-12 * float(squared[0]))
        torch.testing.assert_close(omega.T @ omega, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
        torch.testing.assert_close(N_tilde.T @ N_tilde @ omega, omega * eigenvalues, rtol=0, atol=1e-9 * float(squared[0]))
    top, first = linalg.gradmax_fan_out(N_tilde, 1)
    probes = torch.randn(o, 50, dtype=F64, generator=a.gen)
    probes = probes / probes.norm(dim=0)
    assert float((N_tilde @ probes).pow(2).sum(0).max()) <= float(first[0]) * (1 + 1e-9)
    assert float((N_tilde @ top).pow(2).sum()) == pytest.approx(float(first[0]), rel=1e-9, abs=1e-15)
