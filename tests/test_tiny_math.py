"""The paper's identities (Prop. 3.1, 3.2, 3.4, Eq. 9, 10) checked on real networks' statistics."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from growth_fixtures import explicit_activities, moments_for, small_problem
from tinydeploy.growth import candidates, linalg
from tinydeploy.growth.surgery import add_neurons


@pytest.mark.parametrize("layer", [0, 2])
def test_streamed_moments_equal_full_batch_products(layer):
    spec, model, X, y, loss_fn = small_problem()
    i_out = spec.linear_indices[spec.linear_indices.index(layer) + 1]
    B_prev, B_h, V = explicit_activities(model, X, y, loss_fn, layer, i_out)
    n = X.shape[0]
    m = moments_for(model, X, y, loss_fn, layer, chunk_size=37)
    for name, expected in {"S": B_prev @ B_prev.T, "N_v": B_prev @ V.T, "S_ph": B_prev @ B_h.T,
                           "S_h": B_h @ B_h.T, "N_h": B_h @ V.T, "VV": V @ V.T}.items():
        torch.testing.assert_close(getattr(m, name), expected / n, rtol=1e-10, atol=1e-12, msg=name)


def test_prop_3_1_residual_is_orthogonal_to_B_h():
    spec, model, X, y, loss_fn = small_problem()
    B_prev, B_h, V = explicit_activities(model, X, y, loss_fn, 2, 4)
    m = moments_for(model, X, y, loss_fn, 2)
    dW = linalg.best_update(m.S_h, m.N_h)
    residual = V - dW @ B_h
    assert residual.norm() > 1e-3 * V.norm()  # there is a bottleneck to speak of
    assert (residual @ B_h.T).abs().max() < 1e-9 * V.norm() * B_h.norm()
    psi = linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW)
    assert psi == pytest.approx(float(residual.pow(2).sum() / X.shape[0]), rel=1e-9)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_eq_9_bottleneck_drops_by_sum_of_squared_lambdas(activation):
    spec, model, X, y, loss_fn = small_problem(activation)
    B_prev, B_h, V = explicit_activities(model, X, y, loss_fn, 2, 4)
    m = moments_for(model, X, y, loss_fn, 2)
    dW = linalg.best_update(m.S_h, m.N_h)
    psi = float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW))
    V_proj = V - dW @ B_h
    neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), m.projected_cross_moment(dW))
    assert len(neurons.lambdas) >= 2
    for k in range(1, len(neurons.lambdas) + 1):
        first = neurons.first(k)
        linearised = first.omega @ first.alpha @ B_prev  # V(theta_K) = Omega A^T B_prev
        psi_after = float((V_proj - linearised).pow(2).sum() / X.shape[0])
        expected = psi - float(first.lambdas.pow(2).sum())
        assert abs(psi_after - expected) / psi < 1e-10  # exact in float64; the last lambda_k^2 is >= 3e-8 psi here


def test_new_neurons_pre_activation_variations_are_orthogonal():
    spec, model, X, y, loss_fn = small_problem()
    B_prev, _, _ = explicit_activities(model, X, y, loss_fn, 2, 4)
    m = moments_for(model, X, y, loss_fn, 2)
    dW = linalg.best_update(m.S_h, m.N_h)
    neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), m.projected_cross_moment(dW))
    variations = [torch.outer(neurons.omega[:, k], neurons.alpha[k] @ B_prev) for k in range(len(neurons.lambdas))]
    gram = torch.tensor([[float((a * b).sum()) for b in variations] for a in variations], dtype=torch.float64)
    off_diagonal = gram - torch.diag(torch.diag(gram))
    assert off_diagonal.abs().max() < 1e-9 * torch.diag(gram).max()
    # and each neuron's variation has squared norm n * lambda_k^2 (unit-norm u_k, q_k)
    torch.testing.assert_close(torch.diag(gram) / X.shape[0], neurons.lambdas**2, rtol=1e-9, atol=0)


def test_prop_3_4_alphas_solve_the_generalised_eigenproblem():
    spec, model, X, y, loss_fn = small_problem()
    m = moments_for(model, X, y, loss_fn, 0)  # inputs are Gaussian: S is positive definite
    assert torch.linalg.eigvalsh(m.S).min() > 1e-3
    dW = linalg.best_update(m.S_h, m.N_h)
    N = m.projected_cross_moment(dW)
    neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), N)
    for k, lam in enumerate(neurons.lambdas):
        alpha = neurons.alpha[k]
        torch.testing.assert_close(N @ N.T @ alpha, lam**2 * (m.S @ alpha), rtol=1e-8, atol=1e-12)
        # omega_k is proportional to N^T alpha_k (Prop. 3.4: omega = N alpha up to the sqrt(lambda) scaling)
        torch.testing.assert_close(N.T @ alpha, lam * neurons.omega[:, k], rtol=1e-8, atol=1e-12)


def test_eq_10_first_order_loss_decrease_term_by_term():
    """Eq. 10-12 with a linear activation (sigma'(0) = 1): adding the first K neurons at amplitude g lowers the
    mean loss by g sum_{k<=K} lambda_k^2 (Eq. 11) at first order, applying g dW* by g Delta_dW* = g tr(dW* N_h)
    (Eq. 12), both together by the sum. The next layer is narrower than the grown layer's input, so the
    projected goal is not zero and both terms are large; the derivative is measured by Richardson
    extrapolation of two finite differences (error O(g^2), about 1e-9 relative here)."""
    spec, model, X, y, loss_fn = small_problem("identity", widths=(5, 2))
    m = moments_for(model, X, y, loss_fn, 2)
    parts = _all_neurons(m)
    template = candidates.tiny(m, max_neurons=10)
    loss = lambda net: float(loss_fn(net(X), y).mean().detach())  # noqa: E731
    base = loss(model)

    def first_order(cand, gamma: float = 1e-3) -> float:
        slope = lambda g: (base - loss(add_neurons(model, cand, g))) / g  # noqa: E731
        return 2 * slope(gamma / 2) - slope(gamma)

    delta_dw = float(torch.trace(parts["dW"] @ m.N_h))
    assert delta_dw > 0.05 and len(parts["lambdas"]) == 3 and parts["lambdas"][-1] > 0.005
    move_only = replace(template, alpha=parts["alpha"][:0], omega=parts["omega"][:, :0], lambdas=[], dW=parts["dW"])
    assert first_order(move_only) == pytest.approx(delta_dw, rel=1e-6)
    for k in range(1, 4):
        neurons = {"alpha": parts["alpha"][:k], "omega": parts["omega"][:, :k], "lambdas": parts["lambdas"][:k]}
        gain = sum(lam**2 for lam in parts["lambdas"][:k])
        assert first_order(replace(template, **neurons, dW=None)) == pytest.approx(gain, rel=1e-6)
        assert first_order(replace(template, **neurons, dW=parts["dW"])) == pytest.approx(gain + delta_dw, rel=1e-6)


def _all_neurons(m):
    dW = linalg.best_update(m.S_h, m.N_h)
    neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), m.projected_cross_moment(dW))
    return {"alpha": neurons.alpha, "omega": neurons.omega, "lambdas": [float(v) for v in neurons.lambdas], "dW": dW}


def test_null_threshold_separates_signal_from_noise():
    """D.3: with V_goal independent of B_prev, no lambda clears lambda_-; a planted direction does."""
    torch.manual_seed(1)
    n, d, o = 2000, 20, 6
    B = torch.cat([torch.randn(d, n, dtype=torch.float64), torch.ones(1, n, dtype=torch.float64)])
    S = B @ B.T / n
    noise = torch.randn(o, n, dtype=torch.float64)
    Z = torch.randn(o, n, dtype=torch.float64)
    null = linalg.null_threshold(linalg.psd_inverse_sqrt(S), B @ Z.T / n)
    lambdas_noise = linalg.new_neurons(linalg.psd_inverse_sqrt(S), B @ noise.T / n).lambdas
    assert (lambdas_noise > null).sum() <= 1
    planted = noise + 0.5 * torch.outer(torch.randn(o, dtype=torch.float64), B[0])
    lambdas_signal = linalg.new_neurons(linalg.psd_inverse_sqrt(S), B @ planted.T / n).lambdas
    assert lambdas_signal[0] > 3 * null
    assert (lambdas_signal > null).sum() <= 2


def test_neuron_count_is_the_rank_bounded_by_fan_in_and_next_width():
    """R = rank(S^(-1/2) N) <= min(d+1, o): zero singular values never become neurons."""
    spec, model, X, y, loss_fn = small_problem(widths=(1, 1))
    for layer, bound in ((0, 1), (2, 2)):  # next layer has 1 output; fan-in 1 (+ bias) with 5 outputs after
        m = moments_for(model, X, y, loss_fn, layer)
        dW = linalg.best_update(m.S_h, m.N_h)
        S_inv_sqrt, N = linalg.psd_inverse_sqrt(m.S), m.projected_cross_moment(dW)
        singular = torch.linalg.svdvals(S_inv_sqrt @ N)
        assert len(singular) == bound
        assert len(linalg.new_neurons(S_inv_sqrt, N).lambdas) == int((singular > 1e-8 * singular[0]).sum()) >= 1


def test_psd_inverse_sqrt_cuts_null_directions():
    S = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    expected = torch.diag(torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(linalg.psd_inverse_sqrt(S), expected)
