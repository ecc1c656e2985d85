"""The small helpers under the growth math, each against its formula: psd_factor, ridged, rank_cut,
best_update with a ridge, the per-neuron cost, and GradMax's first-step signs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from growth_fixtures import moments_for, small_problem
from torch import nn

from tinydeploy.growth import linalg
from tinydeploy.growth.costs import neuron_cost, output_shapes
from tinydeploy.growth.gradmax import first_step_signs, gradmax

F64 = torch.float64


def test_psd_factor_is_the_cholesky_factor_of_s_plus_its_jitter() -> None:
    """C is lower triangular with C C^T = S + j I, j = 16 d eps max(diag S) (here d = 8, S diagonal, so
    the only rounding is that of the square roots, about eps max(diag S), against j = 128 eps max)."""
    S = torch.diag(torch.arange(1.0, 9.0, dtype=F64))
    C = linalg.psd_factor(S)
    assert torch.equal(C, C.tril())
    jitter = 16 * 8 * torch.finfo(F64).eps * 8.0
    added = C @ C.T - S
    torch.testing.assert_close(added.diagonal(), torch.full((8,), jitter, dtype=F64), rtol=0.03, atol=0)
    assert float((added - torch.diag(added.diagonal())).abs().max()) == 0.0


def test_psd_factor_of_a_singular_s_is_still_a_triangular_factor() -> None:
    """Rank 3 of 6 (dead units, n < d): the jitter keeps the Cholesky factorisation defined."""
    B = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    S = B.T @ B / 3
    C = linalg.psd_factor(S)
    assert torch.equal(C, C.tril())
    torch.testing.assert_close(C @ C.T, S, rtol=0, atol=1e-12 * float(S.diagonal().max()))


def test_ridged_adds_ridge_times_the_mean_eigenvalue() -> None:
    B = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    S = B.T @ B
    assert linalg.ridged(S, 0.0) is S
    for ridge in (0.1, 1.0):
        expected = S + ridge * float(torch.trace(S)) / 4 * torch.eye(4, dtype=F64)
        torch.testing.assert_close(linalg.ridged(S, ridge), expected, rtol=1e-15, atol=0)


def test_rank_cut_follows_the_sample_count_and_the_dtype() -> None:
    eps = torch.finfo(torch.float32).eps
    assert linalg.rank_cut(3200, 10, eps) == pytest.approx(1 / 3200, rel=1e-12)  # sampling: 1 / n
    assert linalg.rank_cut(10**5, 10, eps) == pytest.approx((10**5 * eps) ** 2, rel=1e-12)  # rounding
    assert linalg.rank_cut(10**4, 10**5, eps) == pytest.approx((10**5 * eps) ** 2, rel=1e-12)
    assert linalg.rank_cut(10**11, 3, 0.0) == linalg.DEFAULT_RELATIVE_CUT


def test_rank_cut_keeps_fan_in_off_a_direction_the_samples_cannot_resolve() -> None:
    """A feature with 1e-6 of the others' variance (a near-constant pixel), n = 2,000: above the rounding
    cut, below the sampling one (1 / n). With the rank cut the new neurons leave it alone (fan-in ~0 on
    it, moderate weights); with the rounding cut alone they put weights ~ sigma^(-1/2) times the goal's
    chance correlation with it (thousands of times larger) on its noise."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    B = torch.randn(n, 3, dtype=F64, generator=g) * torch.tensor([1.0, 1.0, 1e-3], dtype=F64)
    B = torch.cat([B, torch.ones(n, 1, dtype=F64)], dim=1)
    V = torch.stack([B[:, 0] - B[:, 1], B[:, 1]], dim=1) + 0.5 * torch.randn(n, 2, dtype=F64, generator=g)
    S, N = B.T @ B / n, B.T @ V / n
    eps = torch.finfo(torch.float32).eps
    cut = linalg.rank_cut(n, 4, eps)
    kept = linalg.new_neurons(linalg.psd_inverse_sqrt(S, cut), N)
    assert kept.alpha[:, 2].abs().max() < 1e-3
    assert kept.alpha.abs().max() < 10
    fitted = linalg.new_neurons(linalg.psd_inverse_sqrt(S, (n * eps) ** 2), N)
    assert fitted.alpha[:, 2].abs().max() > 1


def test_best_update_with_a_ridge_inverts_the_ridged_s_h() -> None:
    g = torch.Generator().manual_seed(2)
    B = torch.randn(20, 5, dtype=F64, generator=g)
    S_h, N_h = B.T @ B / 20, torch.randn(5, 3, dtype=F64, generator=g)
    ridged = S_h + 0.1 * float(torch.trace(S_h)) / 5 * torch.eye(5, dtype=F64)
    torch.testing.assert_close(linalg.best_update(S_h, N_h, ridge=0.1), N_h.T @ torch.linalg.inv(ridged),
                               rtol=1e-10, atol=1e-12)


def test_neuron_cost_counts_fan_in_bias_batchnorm_and_fan_out() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    shapes = output_shapes(model.eval(), torch.zeros(2, 4))
    assert neuron_cost(model, 0) == (4 + 1 + 2 + 3, None)  # BatchNorm: weight and bias per channel
    assert neuron_cost(model, 0, 3, shapes) == (10, 4 + 3)  # a vector layer has one output position
    with pytest.raises(ValueError, match=r"^module 0's consumer is in module 3, not 2$"):
        neuron_cost(model, 0, 2)


def test_gradmax_signs_make_the_first_step_turn_each_new_neuron_on() -> None:
    """After one gradient step on the fan-in (gradient -N~ omega_k), neuron k's mean pre-activation is
    lr E[[x 1]] . N~ omega_k = lr S[:, -1] N~ omega_k: the sign chosen makes it positive for every k."""
    _, model, X, y, loss_fn = small_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    unsigned, _ = linalg.gradmax_fan_out(m.N_v, 4)
    signed = unsigned * first_step_signs(m, unsigned)
    assert bool((m.S[:, -1] @ m.N_v @ signed > 0).all())
    assert bool((m.S[:, -1] @ m.N_v @ unsigned < 0).any())  # the choice matters on this instance
    cand = gradmax(m, max_neurons=4)
    assert cand.n_neurons >= 1 and (cand.in_index, cand.out_index) == (m.in_index, m.out_index)
    assert bool((m.S[:, -1] @ m.N_v @ cand.omega > 0).all())


def test_psd_factor_falls_back_to_the_symmetric_square_root_where_cholesky_fails() -> None:
    """An indefinite S (rounding gone wrong): the eigenvalue square root with negative eigenvalues at 0."""
    S = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    torch.testing.assert_close(linalg.psd_factor(S), linalg.psd_sqrt(S), rtol=0, atol=0)


def test_uncut_cholesky_factors_only_where_no_eigenvalue_is_cut() -> None:
    """diag(1, s) with the cut 1e-10: tau = 1e-10 (the row-sum bound is exact here), so s = 2e-10 is kept
    (the factor of S itself), s = 0.5e-10 would be cut (None), as would a dead unit (s = 0) or S = 0."""
    for s, factors in ((2e-10, True), (0.5e-10, False), (0.0, False)):
        S = torch.diag(torch.tensor([1.0, s], dtype=F64))
        factor = linalg.uncut_cholesky(S, 1e-10)
        assert (factor is not None) == factors, s
        if factors:
            torch.testing.assert_close(factor @ factor.T, S, rtol=1e-15, atol=0)
    assert linalg.uncut_cholesky(torch.zeros(3, 3, dtype=F64), 1e-10) is None
    assert linalg.uncut_cholesky(torch.zeros(0, 0, dtype=F64), 1e-10) is None
    assert linalg.uncut_cholesky(torch.full((2, 2), float("nan"), dtype=F64), 1e-10) is None
    assert linalg.uncut_cholesky(torch.diag(torch.tensor([1.0, 1e-20], dtype=F64)), 0.0) is not None  # no cut
    # tau in float64: an eigenvalue 5e-19 above it is kept (tau rounded to float32 would exceed it)
    assert linalg.uncut_cholesky(torch.diag(torch.tensor([1.0, 1.000000005e-10], dtype=F64)), 1e-10) is not None
    # the bound is the largest row sum (1 here), not the sum of all entries (4)
    assert linalg.uncut_cholesky(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 3e-10], dtype=F64)), 1e-10) is not None
    # the bound is the largest absolute row sum, 2 + 5 = 7 against sigma_max = 3 + 2 sqrt(2) = 5.83: an
    # eigenvalue of 6.5e-10 is kept by the cut (> 5.83e-10) but not proven kept by the test (< tau = 7e-10)
    S = torch.tensor([[1.0, 2.0, 0.0], [2.0, 5.0, 0.0], [0.0, 0.0, 6.5e-10]], dtype=F64)
    assert float(torch.linalg.eigvalsh(S).min()) > 1e-10 * float(torch.linalg.eigvalsh(S).max())
    assert linalg.uncut_cholesky(S, 1e-10) is None  # sufficient, not exact: decomposed instead
    assert linalg.uncut_cholesky(S, 1e-11) is not None


def test_best_update_solves_a_well_conditioned_s_h_and_decomposes_the_others() -> None:
    """The Cholesky solve and the eigendecomposition give the same dW* (= N_h^T S_h^(-1)) where no
    direction is cut; with a dead unit (a zero row and column) dW* is the pseudo-inverse's, finite,
    with a column of rounding for the dead unit, and equal to the Spectrum path's."""
    g = torch.Generator().manual_seed(3)
    B = torch.randn(50, 6, dtype=F64, generator=g)
    S_h, N_h = B.T @ B / 50, torch.randn(6, 4, dtype=F64, generator=g)
    assert linalg.uncut_cholesky(S_h, linalg.DEFAULT_RELATIVE_CUT) is not None
    solved = linalg.best_update(S_h, N_h)
    torch.testing.assert_close(solved, N_h.T @ torch.linalg.inv(S_h), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(solved, linalg.best_update(linalg.Spectrum.of(S_h), N_h), rtol=1e-12, atol=1e-14)
    for ridge in (0.0, 0.3):
        dead = B.clone()
        dead[:, 2] = 0.0
        S_dead = dead.T @ dead / 50
        assert linalg.uncut_cholesky(linalg.ridged(S_dead, ridge), linalg.DEFAULT_RELATIVE_CUT) is None or ridge
        dW = linalg.best_update(S_dead, N_h, ridge=ridge)
        torch.testing.assert_close(dW, linalg.best_update(linalg.Spectrum.of(S_dead), N_h, ridge=ridge),
                                   rtol=1e-12, atol=1e-14)
        if ridge == 0.0:
            assert float(dW[:, 2].abs().max()) < 1e-14 and bool(dW.isfinite().all())
            torch.testing.assert_close(dW, N_h.T @ torch.linalg.pinv(S_dead, hermitian=True), rtol=1e-10, atol=1e-12)


def test_cholesky_whitening_gives_the_same_neurons_as_s_inverse_square_root() -> None:
    """Prop. 3.2 with W = L^(-1) (S = L L^T) instead of S^(-1/2): the same lambdas, and the same neurons
    (each alpha_k omega_k^T, the product being free of the SVD's signs), and the same null threshold."""
    g = torch.Generator().manual_seed(4)
    B = torch.cat([torch.randn(200, 5, dtype=F64, generator=g), torch.ones(200, 1, dtype=F64)], dim=1)
    S, N = B.T @ B / 200, torch.randn(6, 3, dtype=F64, generator=g)
    N_null = torch.randn(6, 3, dtype=F64, generator=g)
    factor = linalg.factorise(S)
    assert isinstance(factor, linalg.Cholesky)
    W, S_inv_sqrt = linalg.whitening(factor), linalg.whitening(linalg.Spectrum.of(S))
    assert torch.equal(W, W.tril()) and not torch.allclose(W, S_inv_sqrt)
    torch.testing.assert_close(S_inv_sqrt, linalg.psd_inverse_sqrt(S), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(W.T @ W, torch.linalg.inv(S), rtol=1e-10, atol=1e-12)
    ours, paper = linalg.new_neurons(W, N), linalg.new_neurons(S_inv_sqrt, N)
    torch.testing.assert_close(ours.lambdas, paper.lambdas, rtol=1e-12, atol=0)
    for k in range(3):
        torch.testing.assert_close(torch.outer(ours.omega[:, k], ours.alpha[k]),
                                   torch.outer(paper.omega[:, k], paper.alpha[k]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linalg.null_threshold(W, N_null), linalg.null_threshold(S_inv_sqrt, N_null),
                               rtol=1e-12, atol=0)


def test_factorise_falls_back_to_the_spectrum_where_the_cut_drops_a_direction() -> None:
    """A dead unit (zero row and column) or an eigenvalue under the cut: the Spectrum, whose whitening and
    pseudo-inverse apply the cut; a ridge lifts the dead direction, so the ridged matrix factors."""
    S = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=F64))
    assert isinstance(linalg.factorise(S), linalg.Spectrum)
    torch.testing.assert_close(linalg.whitening(linalg.factorise(S)), torch.diag(torch.tensor([0.5, 1.0, 0.0],
                                                                                               dtype=F64)))
    ridged = linalg.factorise(S, ridge=0.3)
    assert isinstance(ridged, linalg.Cholesky)
    torch.testing.assert_close(ridged.L @ ridged.L.T, linalg.ridged(S, 0.3), rtol=1e-15, atol=1e-15)
    N = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(linalg.best_update(ridged, N, ridge=0.3),
                               N.T @ torch.linalg.inv(linalg.ridged(S, 0.3)), rtol=1e-12, atol=1e-14)
    assert isinstance(linalg.factorise(torch.diag(torch.tensor([1.0, 1e-5], dtype=F64)), rel_cut=1e-4),
                      linalg.Spectrum)
    assert isinstance(linalg.factorise(torch.diag(torch.tensor([1.0, 1e-3], dtype=F64)), rel_cut=1e-4),
                      linalg.Cholesky)


def test_layer_moments_factor_and_best_update_pass_the_cut_and_the_ridge_on() -> None:
    """``LayerMoments.factor``: the Cholesky factor for a well-conditioned moment, its Spectrum otherwise.
    ``best_update(ridge)`` on an S_h that stays under the cut even ridged (a dead unit, ridge 1e-10): the
    ridged pseudo-inverse (the ridge moves the 1e-4 eigenvalues' components by ~1e-6), not the plain one."""
    _, model, X, y, loss_fn = small_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    g = torch.Generator().manual_seed(6)
    O, _ = torch.linalg.qr(torch.randn(50, 50, dtype=F64, generator=g))
    sigma = torch.cat([torch.zeros(1, dtype=F64), torch.full((10,), 1e-4, dtype=F64), torch.ones(39, dtype=F64)])
    S_h, N_h = (O * sigma) @ O.T, torch.randn(50, 3, dtype=F64, generator=g)
    m = replace(m, S_h=S_h, N_h=N_h, dW=None, spectra={})
    assert isinstance(m.factor(S_h + 1e-3 * torch.eye(50, dtype=F64), 1e-10, 0.0), linalg.Cholesky)
    assert isinstance(m.factor(S_h + 1e-3 * torch.eye(50, dtype=F64), 1e-2, 0.0), linalg.Spectrum)  # its cut
    ridge = 1e-10
    assert isinstance(m.factor(S_h, linalg.DEFAULT_RELATIVE_CUT, ridge), linalg.Spectrum)
    ridged, plain = m.best_update(ridge), N_h.T @ linalg.psd_pinv(S_h)
    torch.testing.assert_close(ridged, N_h.T @ linalg.psd_pinv(S_h, ridge=ridge), rtol=1e-10, atol=1e-12)
    assert float((ridged - plain).abs().max()) > 1e-8 * float(plain.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("classes", [2, 10, 37])
def test_scoring_cross_entropy_has_torchs_values(dtype, classes) -> None:
    """The line search's and held-out scores' cross-entropy (logsumexp - the target's logit) is torch's to
    float rounding: both subtract logits, so they agree to a few eps times the largest logit of the row
    (logits up to 400 here); squared error and other losses score as themselves."""
    from tinydeploy.model import losses

    gen = torch.Generator().manual_seed(0)
    out = (torch.randn(500, classes, generator=gen) * torch.logspace(-2, 2, 500)[:, None]).to(dtype)
    y = torch.randint(0, classes, (500,), generator=gen)
    value = losses.scoring_loss(losses.per_sample_loss("classification"))(out, y)
    expected = torch.nn.functional.cross_entropy(out, y, reduction="none")
    bound = 4 * torch.finfo(dtype).eps * (1 + out.abs().amax(1))
    assert bool(((value - expected).abs() <= bound).all()) and bound.max() < 1e-3
    assert value.dtype == dtype and value.shape == (500,)
    assert losses.scoring_loss(losses.cross_entropy) is losses.cross_entropy_value
    regression = losses.per_sample_loss("regression")
    assert losses.scoring_loss(regression) is regression is losses.squared_error
    def other(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return o.sum(1)

    assert losses.scoring_loss(other) is other


def test_task_metric_is_accuracy_or_mean_squared_error() -> None:
    """Accuracy: the share of rows whose largest output is the label; regression: the mean of (out - y)^2."""
    from tinydeploy.model.losses import task_metric

    out = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 3.0], [0.5, 0.2, 0.1], [0.0, 0.0, 1.0]])
    assert task_metric("classification", out, torch.tensor([1, 2, 1, 2])) == 0.75
    predicted, target = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert task_metric("regression", predicted, target) == pytest.approx((1 + 0 + 4 + 4) / 4)
