"""Each decision of a growth step checked for its direction and sign on real networks, against brute
force: which neurons TINY proposes and keeps, GradMax's fan-out and gradient, the amplitude search,
the layer picked, the budget, the estimation sample, and the surgery's exact weights."""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import replace

import conv_fixtures
import pytest
import torch
from growth_fixtures import explicit_activities, moments_for, small_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tinydeploy.growth import candidates, gradmax, linalg, policy, statistics
from tinydeploy.growth.amplitude import line_search, pointwise
from tinydeploy.growth.candidates import Context
from tinydeploy.growth.costs import count_macs, neuron_cost, output_shapes
from tinydeploy.growth.policy import (
    Batch,
    GrowthSettings,
    count_params,
    estimation_batch_size,
    growth_step,
    neuron_budget,
)
from tinydeploy.growth.statistics import LayerMoments, gather_bottlenecks, gather_moments, gather_round, layer_pairs
from tinydeploy.growth.surgery import add_neurons, carry_optimizer_state, grown_output
from tinydeploy.model.build import ResidualBlock, build_model
from tinydeploy.model.losses import per_sample_loss
from tinydeploy.model.spec import ArchSpec

F64 = torch.float64


def _metric(out: torch.Tensor, target: torch.Tensor) -> float:
    return float((out.argmax(1) == target).double().mean())


def _inverse_sqrt(S: torch.Tensor) -> torch.Tensor:
    """Brute-force S^(-1/2) (eigenvalues under 1e-10 x the largest dropped), independent of linalg."""
    sigma, O = torch.linalg.eigh(S)
    inv = torch.zeros_like(sigma)
    keep = sigma > 1e-10 * sigma.max()
    inv[keep] = sigma[keep] ** -0.5
    return O @ torch.diag(inv) @ O.T


def _rich_problem(activation: str = "relu"):
    """A problem where TINY finds 4 directions at the second hidden layer, of which 2 are significant."""
    return small_problem(activation, widths=(6, 6), n=2000)


def _brute_force(model, X, y, loss_fn, i_in: int, i_out: int):
    """From explicit activities: B_prev, V_goal_proj (with dW* by torch.linalg.pinv), S^(-1/2), the singular
    values of S^(-1/2) N for the projected and the unprojected goal, and dW* B_h."""
    B_prev, B_h, V = explicit_activities(model, X, y, loss_fn, i_in, i_out)
    n = X.shape[0]
    dW = (B_h @ V.T / n).T @ torch.linalg.pinv(B_h @ B_h.T / n, hermitian=True)
    V_proj = V - dW @ B_h
    S_inv_sqrt = _inverse_sqrt(B_prev @ B_prev.T / n)
    projected = torch.linalg.svdvals(S_inv_sqrt @ B_prev @ V_proj.T / n)
    unprojected = torch.linalg.svdvals(S_inv_sqrt @ B_prev @ V.T / n)
    return B_prev, V_proj, projected, unprojected, dW @ B_h


# ----- candidates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_tiny_neurons_solve_the_projected_problem(activation):
    """TINY's lambdas are the singular values of S^(-1/2) N with N from V_goal_proj (not V_goal), its neurons
    lower the bottleneck by exactly their sum of squares (Eq. 9), and gain = sum lambda^2 + Delta_dW*."""
    spec, model, X, y, loss_fn = _rich_problem(activation)
    cand = candidates.tiny(moments_for(model, X, y, loss_fn, 2), max_neurons=100)
    B_prev, V_proj, projected, unprojected, moved = _brute_force(model, X, y, loss_fn, 2, 4)
    n, K = X.shape[0], cand.n_neurons
    assert K >= 1 and (projected[:K] - unprojected[:K]).abs().max() > 1e-3 * projected[0]  # the two differ here
    torch.testing.assert_close(torch.tensor(cand.lambdas, dtype=F64), projected[:K], rtol=1e-9, atol=0)
    psi = float(V_proj.pow(2).sum() / n)
    assert cand.psi == pytest.approx(psi, rel=1e-9)
    after = float((V_proj - cand.omega @ cand.alpha @ B_prev).pow(2).sum() / n)
    assert after == pytest.approx(psi - sum(lam**2 for lam in cand.lambdas), rel=0, abs=1e-10 * psi)
    delta_dw = float(moved.pow(2).sum() / n)  # Eq. 12: <V_goal, dW* B_h> / n = ||dW* B_h||^2 / n >= 0
    assert cand.gain == pytest.approx(sum(lam**2 for lam in cand.lambdas) + delta_dw, rel=1e-9)
    assert cand.signed_amplitude is False and cand.searches_amplitude is True and cand.method == "tiny"


def test_tiny_keeps_every_significant_neuron_and_only_those_up_to_the_cap():
    spec, model, X, y, loss_fn = _rich_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    everything = candidates.tiny(m, max_neurons=100)
    _, _, projected, _, _ = _brute_force(model, X, y, loss_fn, 2, 4)
    significant = int((projected > everything.lambda_null).sum())
    assert 2 <= significant < int((projected > 1e-9 * projected[0]).sum())  # the threshold cuts something here
    assert everything.n_neurons == significant
    for cap in range(1, significant + 1):
        capped = candidates.tiny(m, max_neurons=cap)
        assert capped.n_neurons == cap and capped.lambdas == everything.lambdas[:cap]
        assert capped.alpha.shape == (cap, m.S.shape[0]) and capped.omega.shape == (m.N_v.shape[1], cap)


def _isotropic_goal_moments(c: float, seed: int = 0) -> tuple[LayerMoments, torch.Tensor, torch.Tensor]:
    """Moments whose projected goal has covariance exactly c^2 I, while V_goal itself has a large part in the
    row space of B_h: the significance threshold must come from the projected covariance."""
    gen = torch.Generator().manual_seed(seed)
    n, d1, h1, o = 300, 6, 4, 3
    B_prev = torch.randn(d1, n, dtype=F64, generator=gen)
    B_h = torch.randn(h1, n, dtype=F64, generator=gen)
    complement = torch.eye(n, dtype=F64) - B_h.T @ torch.linalg.solve(B_h @ B_h.T, B_h)
    Q, _ = torch.linalg.qr(complement @ torch.randn(n, o, dtype=F64, generator=gen))
    V = c * (math.sqrt(n) * Q.T + 3.0 * torch.randn(o, h1, dtype=F64, generator=gen) @ B_h)
    Z = torch.randn(o, n, dtype=F64, generator=gen)
    m = LayerMoments(0, 2, n, S=B_prev @ B_prev.T / n, N_v=B_prev @ V.T / n, S_ph=B_prev @ B_h.T / n,
                     S_h=B_h @ B_h.T / n, N_h=B_h @ V.T / n, VV=V @ V.T / n, N_z=B_prev @ Z.T / n)
    return m, B_prev, Z


@pytest.mark.parametrize("c", [0.01, 1.0, 30.0])
def test_tiny_threshold_comes_from_the_projected_goals_covariance(c):
    """Earlier appendix D.3: lambda_- = ||S^(-1/2) B_prev V_gauss^T / n||_2 with V_gauss ~ N(0, Cov(V_goal_proj));
    here Cov = c^2 I, so lambda_- = c ||S^(-1/2) B_prev Z^T / n||_2 whatever square root is taken."""
    m, B_prev, Z = _isotropic_goal_moments(c)
    expected = c * float(torch.linalg.svdvals(_inverse_sqrt(m.S) @ B_prev @ Z.T / m.n)[0])
    cand = candidates.tiny(m, max_neurons=10)
    assert cand.lambda_null == pytest.approx(expected, rel=1e-8)
    with_raw_goal = float(linalg.null_threshold(_inverse_sqrt(m.S), m.N_z @ linalg.psd_sqrt(m.VV).T))
    assert with_raw_goal > 2 * expected  # the unprojected covariance would give a very different threshold


def test_gradmax_fan_out_maximises_the_fan_in_gradient():
    """App. B.1 through the real model: with fan-in 0, the gradient of the mean loss with respect to new neuron
    k's fan-in (weights and bias) is -N~ omega_k (sigma'(0) = 1 for tanh), with N~ = B_prev V_goal^T / n
    unprojected; its squared norm is the eigenvalue of N~^T N~ times the fan-out scale squared, the
    largest that any fan-out of that norm can get."""
    spec, model, X, y, loss_fn = small_problem("tanh")
    m = moments_for(model, X, y, loss_fn, 2)
    cand = gradmax.gradmax(m, max_neurons=3)
    K = cand.n_neurons
    assert K >= 1 and cand.searches_amplitude is False and torch.count_nonzero(cand.alpha) == 0
    B_prev, B_h, V = explicit_activities(model, X, y, loss_fn, 2, 4)
    N_tilde = B_prev @ V.T / X.shape[0]
    eigenvalues = torch.linalg.svdvals(N_tilde) ** 2
    grown = add_neurons(model, cand, 1.0)
    grown.zero_grad()
    loss_fn(grown(X), y).mean().backward()
    old = model[2].out_features
    gradient = torch.cat([grown[2].weight.grad[old:], grown[2].bias.grad[old:, None]], dim=1)  # (K, d+1)
    torch.testing.assert_close(gradient, -(N_tilde @ cand.omega).T, rtol=1e-7, atol=1e-15)
    scale = gradmax.FAN_OUT_RMS * math.sqrt(cand.omega.shape[0])  # unit columns rescaled to RMS 1e-3
    torch.testing.assert_close(gradient.pow(2).sum(1), scale**2 * eigenvalues[:K], rtol=1e-7, atol=0)
    torch.testing.assert_close(torch.tensor(cand.lambdas, dtype=F64), eigenvalues[:K].sqrt(), rtol=1e-7, atol=0)
    probes = torch.randn(cand.omega.shape[0], 100, dtype=F64, generator=torch.Generator().manual_seed(0))
    probes = scale * probes / probes.norm(dim=0)
    assert float((N_tilde @ probes).pow(2).sum(0).max()) <= float(gradient.pow(2).sum(1)[0]) * (1 + 1e-9)
    null = float(linalg.null_threshold(torch.eye(m.S.shape[0], dtype=F64), m.N_z @ linalg.psd_factor(m.VV).T))
    assert cand.lambda_null == pytest.approx(null, rel=1e-9)
    assert K == min(3, int((eigenvalues.sqrt() > null).sum()))
    assert cand.gain == pytest.approx(float(eigenvalues[:K].sum()), rel=1e-7)  # ranks layers: no line search here
    assert cand.method == "gradmax" and cand.dW is None and cand.signed_amplitude is False
    assert cand.alpha.dtype == F64 and cand.alpha.shape == (K, m.S.shape[0])
    assert cand.psi == pytest.approx(candidates.tiny(m, 3).psi, rel=1e-12)
    assert K >= 2 and gradmax.gradmax(m, max_neurons=1).n_neurons == 1  # the cap holds below the significant count


def test_random_candidate_is_a_reproducible_unit_rms_gaussian_searched_over_both_signs():
    spec, model, X, y, loss_fn = small_problem()
    first = moments_for(model, X, y, loss_fn, 0)  # fan-in 6 + 1, next layer 4: rank bound 4
    assert candidates.random(first, 10, torch.Generator().manual_seed(1)).n_neurons == 4
    m = moments_for(model, X, y, loss_fn, 2)  # fan-in 3 + 1, next layer 5: rank bound 4
    draw = lambda seed, k=10: candidates.random(m, k, torch.Generator().manual_seed(seed))
    a, b, other = draw(1), draw(1), draw(2)
    assert a.n_neurons == 4 and draw(1, k=2).n_neurons == 2
    assert a.alpha.shape == (4, 4) and a.omega.shape == (5, 4) and a.alpha.dtype == a.omega.dtype == F64
    assert a.method == "random" and a.lambdas == [] and a.gain == 0.0 and a.lambda_null is None
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.omega, b.omega) and not torch.equal(a.alpha, other.alpha)
    for tensor in (a.alpha, a.omega):
        assert float(tensor.pow(2).mean()) == pytest.approx(1.0, rel=1e-12)
    assert a.signed_amplitude is True and a.searches_amplitude is True and a.dW is None
    assert a.psi == pytest.approx(candidates.tiny(m, 10).psi, rel=1e-12)


def test_propose_dispatches_by_name_and_names_the_choices():
    spec, model, X, y, loss_fn = small_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    assert candidates.propose("tiny", m, 3).lambdas == candidates.tiny(m, 3).lambdas
    assert candidates.propose("gradmax", m, 3).lambdas == gradmax.gradmax(m, 3).lambdas
    drawn = candidates.propose("random", m, 3, torch.Generator().manual_seed(4))
    assert torch.equal(drawn.alpha, candidates.random(m, 3, torch.Generator().manual_seed(4)).alpha)
    with pytest.raises(ValueError, match="^unknown growth method 'magic': use one of tiny, gradmax, north, folding, random$"):
        candidates.propose("magic", m, 3)


# ----- amplitude search ---------------------------------------------------------------------------------
def test_line_search_finds_a_minimum_anywhere_on_the_grid_to_within_its_precision():
    """Grid 2^-12..2^6, then three rounds of 5 points between the best point's neighbours (spacing 1/3, 1/9,
    1/27 in log2): on a smooth loss the result is within 1/54 (in log2) of the minimum wherever it lies,
    which fewer points or rounds would miss; four calls of ``losses_at`` in all."""
    for log2_gamma in torch.linspace(-12.0, 6.0, 361).tolist():
        loss = lambda g, t=log2_gamma: (math.log2(g) - t) ** 2 - 1.0 if g > 0 else 0.0
        calls = []
        gamma, value = line_search(lambda gs, f=pointwise(loss): calls.append(len(gs)) or f(gs))
        assert abs(math.log2(gamma) - log2_gamma) <= 1 / 54 + 1e-12, log2_gamma
        assert value == loss(gamma) and value < -0.99
        assert calls == [20, 5, 5, 5]



def test_stacked_losses_of_a_regression_with_several_outputs_are_each_copys_mean_squared_error():
    """``_Evaluator.losses`` on G stacked outputs (G, n, d) of a d-output regression: copy k's loss is the mean
    over its n rows of each row's mean squared error (the targets repeated for every copy, rows kept whole)."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    outs = torch.randn(4, 6, 3, dtype=torch.float64, generator=generator)
    evaluator = policy._Evaluator(Batch(torch.zeros(6, 2, dtype=torch.float64), y), per_sample_loss("regression"),
                                  lambda out, target: 0.0)
    assert evaluator.losses(outs) == pytest.approx([float(((o - y) ** 2).mean()) for o in outs], rel=1e-12)

def test_line_search_for_tiny_never_goes_negative_and_random_searches_both_signs():
    worse_for_positive = lambda g: (g + 1.0) ** 2
    assert line_search(pointwise(worse_for_positive)) == (0.0, 1.0)
    gamma, value = line_search(pointwise(worse_for_positive), signed=True)
    assert gamma == pytest.approx(-1.0, rel=0.02) and value < 1e-3
    two_wells = lambda g: min((g - 0.5) ** 2 + 0.1, (g + 2.0) ** 2)
    assert line_search(pointwise(two_wells), signed=True)[0] == pytest.approx(-2.0, rel=0.02)
    assert line_search(pointwise(two_wells))[0] == pytest.approx(0.5, rel=0.02)
    assert line_search(pointwise(lambda g: (g - 3.0) ** 2), signed=True)[0] == pytest.approx(3.0, rel=0.02)
    assert line_search(pointwise(lambda g: 1.0), signed=True) == (0.0, 1.0)  # flat: no change wins
    assert line_search(pointwise(lambda g: g), signed=True) == (-64.0, -64.0)  # both signs: same grid 2^-12..2^6
    assert line_search(pointwise(lambda g: -g), signed=True) == (64.0, -64.0)


def test_line_search_stays_within_the_grid_and_returns_the_loss_it_found():
    calls = []

    def decreasing(g: float) -> float:
        calls.append(g)
        return -g

    gamma, value = line_search(pointwise(decreasing))
    assert gamma == 64.0 and value == -64.0 and max(calls) == 64.0 and min(calls) == 0.0


# ----- policy: sample, budget, layer pick, sign ----------------------------------------------------------
def test_batch_take_is_a_random_sample_of_aligned_rows():
    X = torch.arange(200, dtype=F64).reshape(100, 2)
    batch = Batch(X, torch.arange(100))
    first = batch.take(10, torch.Generator().manual_seed(0))
    assert first.X.shape == (10, 2) and torch.equal(first.X[:, 0], 2.0 * first.y)  # rows stay with their labels
    assert len(set(first.y.tolist())) == 10 and first.y.tolist() != list(range(10))
    again = batch.take(10, torch.Generator().manual_seed(0))
    assert torch.equal(again.y, first.y) and not torch.equal(batch.take(10, torch.Generator().manual_seed(1)).y, first.y)
    seen = set()
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        seen |= set(batch.take(10, gen).y.tolist())
    assert len(seen) > 90  # every part of the data gets drawn
    assert batch.take(100, None) is batch and batch.take(500, None) is batch
    torch.manual_seed(0)
    unseeded = batch.take(10, None)  # no generator: torch's global one
    assert len(set(unseeded.y.tolist())) == 10 and torch.equal(unseeded.X[:, 0], 2.0 * unseeded.y)


def test_estimation_batch_follows_app_e1_within_its_floor_and_caps():
    """n = max(scale (d+1)^2, floor (d+1), minimum), then capped by the data and by the maximum."""
    s = GrowthSettings(estimation_scale=0.1, estimation_floor=16, min_estimation_batch=1, max_estimation_batch=1000)
    assert estimation_batch_size(9, 10**6, s) == 160  # the floor term: 16 x 10 > 0.1 x 100
    assert estimation_batch_size(199, 10**6, s) == 1000  # 0.1 x 200^2 = 4000, capped by the maximum
    assert estimation_batch_size(199, 700, s) == 700  # capped by the data
    assert estimation_batch_size(39, 10**6, s) == 640  # floor 16 x 40 beats 0.1 x 40^2 = 160


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(-3, 40), st.integers(1, 16), st.none() | st.integers(1, 12))
def test_neuron_budget_is_exact(w1, w2, spare, per_step, max_width):
    spec, model, X, y, loss_fn = small_problem(widths=(w1, w2), n=8)
    per_neuron = model[0].in_features + 1 + model[2].out_features
    max_params = count_params(model) + spare
    s = GrowthSettings(neurons_per_step=per_step, max_params=max_params, max_width=max_width)
    k = neuron_budget(model, 0, 2, s)
    room = [per_step, max(spare, 0) // per_neuron] + ([max_width - w1] if max_width is not None else [])
    assert k == max(min(room), 0)
    assert count_params(model) + k * per_neuron <= max(max_params, count_params(model))


@pytest.mark.parametrize(("spare", "added"), [(-1, 0), (0, 1), (11, 1), (12, 2)])
def test_growth_step_never_exceeds_the_parameter_budget_by_one(spare, added):
    """Two significant neurons on offer at 12 parameters each; room for one plus ``spare`` parameters."""
    spec, model, X, y, loss_fn = _rich_problem()
    per_neuron = model[2].in_features + 1 + model[4].out_features
    assert per_neuron == 12 and candidates.tiny(moments_for(model, X, y, loss_fn, 2), 100).n_neurons == 2
    s = GrowthSettings(max_params=count_params(model) + per_neuron + spare, min_estimation_batch=4096)
    grown, growths, _ = growth_step(model, [2], Batch(X, y), Batch(X[:500], y[:500]), loss_fn, _metric, s,
                                    torch.Generator().manual_seed(0))
    assert count_params(grown) <= s.max_params
    assert sum(g.candidate.n_neurons for g in growths) == added


@pytest.mark.parametrize("order", [[0, 2], [2, 0]])
def test_growth_step_picks_the_layer_with_the_largest_loss_decrease(order):
    """Brute force with the same public pieces: every layer's candidate sized by line search on the held-out
    loss; the step must grow the one whose loss ends lowest (the two differ clearly here), whichever layer
    it evaluates first."""
    spec, model, X, y, loss_fn = small_problem(widths=(3, 3), seed=1)  # both layers have a significant neuron
    train, held = Batch(X[:250], y[:250]), Batch(X[250:], y[250:])  # 250 < the estimation batch: no subsampling
    s = GrowthSettings(layers_per_step=1)
    gen = torch.Generator().manual_seed(5)
    after, proposed = {}, {}
    for m in gather_moments(model, order, train.X, train.y, loss_fn, chunk_size=s.chunk_size, generator=gen):
        cand = proposed[m.in_index] = candidates.propose(s.method, m, neuron_budget(model, m.in_index, m.out_index, s), gen)
        assert cand.n_neurons >= 1
        output = grown_output(model, cand, held.X)
        after[m.in_index] = line_search(pointwise(lambda g, out=output: float(loss_fn(out(g), held.y).mean())))[1]
    best = min(after, key=after.get)
    with torch.no_grad():
        loss_0 = float(loss_fn(model(held.X), held.y).mean())
    assert abs(after[0] - after[2]) > 0.01 and max(after.values()) < loss_0
    _, growths, _ = growth_step(model, order, train, held, loss_fn, _metric, s, torch.Generator().manual_seed(5))
    assert [g.candidate.in_index for g in growths] == [best]
    assert torch.equal(growths[0].candidate.alpha, proposed[best].alpha)  # as proposed: no balancing by default
    assert growths[0].loss_after == pytest.approx(after[best], rel=1e-9) and growths[0].gamma > 0


def test_growth_step_grows_each_layer_at_most_once_and_records_what_it_did():
    spec, model, X, y, loss_fn = small_problem()
    train, held = Batch(X[:250], y[:250]), Batch(X[250:], y[250:])
    grown, growths, final = growth_step(model, [0, 2], train, held, loss_fn, _metric, GrowthSettings(),
                                        torch.Generator().manual_seed(5))
    assert sorted(g.candidate.in_index for g in growths) == [0, 2]  # both layers have a significant neuron here
    psi = gather_bottlenecks(grown, [0, 2], train.X, train.y, loss_fn)  # all 250 samples: <= the estimation batch
    assert final == psi and sorted(psi) == [0, 2]
    net = model
    for g in growths:
        with torch.no_grad():
            before = net(held.X)
            net = add_neurons(net, g.candidate, g.gamma)
            after = net(held.X)
        assert g.loss_before == pytest.approx(float(loss_fn(before, held.y).mean()), rel=1e-12)
        assert g.loss_after == pytest.approx(float(loss_fn(after, held.y).mean()), rel=1e-12) and g.loss_after < g.loss_before
        assert (g.metric_before, g.metric_after) == (_metric(before, held.y), _metric(after, held.y))
        assert g.widths_after == [net[0].out_features, net[2].out_features]
        assert g.psi_after == psi[g.candidate.in_index]
    torch.testing.assert_close(net(X), grown(X), rtol=0, atol=0)


def test_no_growth_when_no_candidate_lowers_the_held_out_loss():
    spec, model, X, y, loss_fn = small_problem()
    misleading = Batch(X[250:], (y[250:] + 3) % 5)  # held-out labels that the training goal does not predict
    grown, growths, _ = growth_step(model, [0, 2], Batch(X[:250], y[:250]), misleading, loss_fn, _metric,
                                    GrowthSettings(), torch.Generator().manual_seed(5))
    assert growths == [] and count_params(grown) == count_params(model)


def _training_passes(step) -> tuple[tuple, list[int]]:
    """``step()``'s result and the batch size of every forward pass through a first layer (6 inputs)."""
    seen = []

    def first_layer(module, args):
        if isinstance(module, nn.Linear) and module.in_features == 6:
            seen.append(args[0].shape[0])

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_layer)
    try:
        return step(), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("seed, held_labels, grew", [(1, "true", [0]), (0, "misleading", [])])
def test_a_round_that_adds_nothing_gives_the_bottlenecks_after_the_step_without_another_pass(seed, held_labels, grew):
    """Layer 0 grows, then the round over layer 2 finds nothing to add (true labels); or nothing grows at all
    (misleading held-out labels). That last round ran on the final model, the grown layer's consumer side
    included, so Psi after the step comes from it: one pass over the estimation batch per round, none more."""
    _, model, X, y, loss_fn = small_problem(seed=seed)
    train = Batch(X[:250], y[:250])
    held = Batch(X[250:], y[250:] if held_labels == "true" else (y[250:] + 3) % 5)
    (grown, growths, psi), passes = _training_passes(lambda: growth_step(
        model, [0, 2], train, held, loss_fn, _metric, GrowthSettings(), torch.Generator().manual_seed(5)))
    assert [g.candidate.in_index for g in growths] == grew
    assert passes.count(250) == len(grew) + 1  # one round per growth and the round that found nothing
    expected = gather_bottlenecks(grown, [0, 2], train.X, train.y, loss_fn)
    assert psi.keys() == expected.keys() and all(psi[i] == pytest.approx(expected[i], rel=1e-10) for i in psi)
    assert [g.psi_after for g in growths] == [psi[i] for i in grew]


def test_growth_step_streams_its_statistics_in_chunks():
    """The estimation batch (256 of 1000 samples) goes through the model ``chunk_size`` samples at a time."""
    spec, model, X, y, loss_fn = small_problem(n=1400)
    (_, growths, _), seen = _training_passes(lambda: growth_step(
        model, [0, 2], Batch(X[:1000], y[:1000]), Batch(X[1000:], y[1000:]), loss_fn, _metric,
        GrowthSettings(chunk_size=64), torch.Generator().manual_seed(0)))
    assert growths  # so the last pass runs on a grown model
    chunks = [n for n in seen if n != 400]  # 400: the held-out evaluations
    assert chunks and max(chunks) == 64 and sum(chunks) % 256 == 0


@pytest.mark.parametrize("method", ["tiny", "random"])
def test_growth_step_draws_every_random_number_from_its_generator(method):
    """Subsample, Gaussian null goal, random neurons, final statistics: the same generator seed gives the same
    step whatever the global torch RNG state; another seed gives another step."""
    spec, model, X, y, loss_fn = small_problem(n=1400)
    train, held = Batch(X[:1000], y[:1000]), Batch(X[1000:], y[1000:])  # 1000 > the estimation batch of 256

    def step(global_seed: int, seed: int):
        torch.manual_seed(global_seed)
        return growth_step(model, [0, 2], train, held, loss_fn, _metric, GrowthSettings(method=method),
                           torch.Generator().manual_seed(seed))

    (a, growths_a, final_a), (b, growths_b, final_b), (_, _, final_c) = step(1, 0), step(2, 0), step(1, 1)
    assert growths_a and [(g.gamma, g.candidate.lambda_null) for g in growths_a] == [
        (g.gamma, g.candidate.lambda_null) for g in growths_b]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert final_a == final_b  # Psi after the step, on the same subsample
    assert final_a != final_c  # another sample of the training set


def test_random_growth_uses_negative_amplitudes_and_every_growth_lowers_the_loss():
    spec, model, X, y, loss_fn = small_problem()
    train, held = Batch(X[:250], y[:250]), Batch(X[250:], y[250:])
    gammas = []
    for seed in range(8):
        _, growths, _ = growth_step(model, [0, 2], train, held, loss_fn, _metric,
                                    GrowthSettings(method="random", layers_per_step=1), torch.Generator().manual_seed(seed))
        for g in growths:
            assert g.loss_after < g.loss_before
            gammas.append(g.gamma)
    assert any(g < 0 for g in gammas) and any(g > 0 for g in gammas) and len(gammas) == 8


def test_gradmax_growth_is_applied_at_unit_amplitude_without_changing_the_loss():
    spec, model, X, y, loss_fn = small_problem()
    _, growths, _ = growth_step(model, [0, 2], Batch(X[:250], y[:250]), Batch(X[250:], y[250:]), loss_fn, _metric,
                                GrowthSettings(method="gradmax", layers_per_step=1), torch.Generator().manual_seed(0))
    assert len(growths) == 1 and growths[0].gamma == 1.0 and growths[0].candidate.gain > 0
    assert growths[0].loss_after == pytest.approx(growths[0].loss_before, rel=1e-12)


def test_no_room_means_no_growth_and_an_unchanged_model():
    spec, model, X, y, loss_fn = small_problem()
    s = GrowthSettings(max_params=count_params(model))
    grown, growths, final = growth_step(model, [0, 2], Batch(X[:250], y[:250]), Batch(X[250:], y[250:]), loss_fn,
                                        _metric, s, torch.Generator().manual_seed(0))
    assert growths == [] and count_params(grown) == count_params(model) and len(final) == 2
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=0)


# ----- surgery and statistics --------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.25, 1.0, -4.0])
def test_add_neurons_writes_exactly_the_scaled_weights(gamma):
    spec, model, X, y, loss_fn = small_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    cand = candidates.tiny(m, 100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = add_neurons(model, cand, gamma)
    root = math.copysign(math.sqrt(abs(gamma)), gamma)
    h, K = model[2].out_features, cand.n_neurons
    torch.testing.assert_close(grown[2].weight[:h], before["2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(grown[2].weight[h:], root * cand.alpha[:, :-1], rtol=1e-15, atol=0)
    torch.testing.assert_close(grown[2].bias[h:], root * cand.alpha[:, -1], rtol=1e-15, atol=0)
    torch.testing.assert_close(grown[4].weight[:, h:], root * cand.omega, rtol=1e-15, atol=0)
    torch.testing.assert_close(grown[4].weight[:, :h], before["4.weight"] + gamma * cand.dW[:, :-1], rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(grown[4].bias, before["4.bias"] + gamma * cand.dW[:, -1], rtol=1e-15, atol=1e-15)
    assert grown[2].weight.shape == (h + K, model[2].in_features) and grown[4].weight.shape == (5, h + K)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched


def test_gather_moments_draws_n_z_from_the_generator_with_the_right_variance():
    """N_z = B_prev Z^T / n with Z standard Gaussian: reproducible per seed, E||N_z||^2 = o tr(S) / n."""
    spec, model, X, y, loss_fn = small_problem(widths=(20, 10), n=3000, d=12)
    gather = lambda seed: moments_for(model, X, y, loss_fn, 0, seed=seed)
    a, b, other = gather(0), gather(0), gather(1)
    assert torch.equal(a.N_z, b.N_z) and not torch.equal(a.N_z, other.N_z)
    expected = a.N_z.shape[1] * float(torch.trace(a.S)) / a.n
    assert 0.6 < float(a.N_z.pow(2).sum()) / expected < 1.4


def test_gather_moments_leaves_the_model_as_it_found_it():
    spec, model, X, y, loss_fn = small_problem()
    assert layer_pairs(model, [0, 2]) == [(0, 2), (2, 4)]
    for training in (True, False):
        model.train(training)
        gather_moments(model, [0, 2], X, y, loss_fn, chunk_size=100)
        assert model.training is training
        assert all(not module._forward_hooks for module in model) and all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", candidates.METHODS)
def test_growth_step_and_optimizer_carry_over_stay_on_the_gpu(method):
    """Every tensor a growth step creates (samples, Gaussian draws, candidates, new weights, optimizer state)
    lives on the model's device; CPU runs cannot see a tensor created on the wrong one."""
    shallow = method == "folding"  # Growing by Folding is defined for one hidden layer
    spec, model, X, y, loss_fn = small_problem(widths=(6,) if shallow else (6, 6), n=2000)
    model, X, y = model.cuda(), X.cuda(), y.cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn(model(X), y).mean().backward()
    optimizer.step()
    s = GrowthSettings(method=method, min_estimation_batch=512)
    grown, growths, _ = growth_step(model, [0] if shallow else [0, 2], Batch(X[:1500], y[:1500]),
                                    Batch(X[1500:], y[1500:]), loss_fn,
                                    _metric, s, torch.Generator(device="cuda").manual_seed(0))
    assert growths and all(p.is_cuda for p in grown.parameters())
    for generator in (torch.Generator(), torch.Generator(device="cuda")):  # either generator samples CUDA data
        sample = Batch(X, y).take(10, generator)
        assert sample.X.is_cuda and len(set(sample.y.tolist())) <= 10 and sample.X.shape == (10, X.shape[1])
    carried = carry_optimizer_state(optimizer, model, grown)
    assert all(v.is_cuda for state in carried.state.values() for v in state.values() if torch.is_tensor(v) and v.dim())
    carried.zero_grad()
    loss_fn(grown(X), y).mean().backward()
    carried.step()


def test_optimizer_carry_over_keeps_hyper_parameters_and_skips_parameters_without_state():
    """Adam with non-default settings, its first layer frozen during training (so it has no state yet): the
    new optimizer has the same settings, no state for that layer, and the padded state of every other one."""
    spec, model, X, y, loss_fn = small_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.8, 0.9), weight_decay=0.1)
    model[0].requires_grad_(False)
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model(X), y).mean().backward()
        optimizer.step()
    model[0].requires_grad_(True)
    grown = add_neurons(model, candidates.tiny(moments_for(model, X, y, loss_fn, 2), 100), 0.5)
    carried = carry_optimizer_state(optimizer, model, grown)
    group = carried.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.02, (0.8, 0.9), 0.1)
    named = dict(grown.named_parameters())
    assert not carried.state.get(named["0.weight"]) and not carried.state.get(named["0.bias"])
    for name in ("2.weight", "2.bias", "4.weight", "4.bias"):
        old = optimizer.state[dict(model.named_parameters())[name]]
        new = carried.state[named[name]]
        assert new["step"] == old["step"] and new["exp_avg"].shape == named[name].shape
        corner = tuple(slice(0, s) for s in old["exp_avg"].shape)
        assert torch.equal(new["exp_avg"][corner], old["exp_avg"])


# ----- policy: processes, reused statistics, budgets cut short, estimation rows --------------------------------
class _Ranks:
    """``world`` in-process ranks (threads) that sum float64 tensors through a barrier: the DataParallel
    protocol of ``growth_step`` without processes (tests/test_distributed.py runs the real gloo group)."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def rank(self, rank: int):
        ranks = self

        class _Rank:
            world = ranks.world

            def sum(self, values: torch.Tensor) -> torch.Tensor:
                ranks.slots[self.rank] = values.clone()
                ranks.barrier.wait()
                total = sum(ranks.slots[1:], ranks.slots[0].clone())  # the same order on every rank
                ranks.barrier.wait()
                return total

        view = _Rank()
        view.rank = rank
        return view

    def run(self, work):
        """``work(rank_view)`` on every rank at once; the results in rank order (a failure is raised)."""
        results, errors = [None] * self.world, []

        def target(r):
            try:
                results[r] = work(self.rank(r))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def test_a_growth_step_shared_by_ranks_takes_the_one_process_decisions():
    """Two ranks, each on its half of the held-out rows and of every statistics chunk, summing through the
    group: the same layers, amplitudes, losses, metrics and final Psi as one process on the whole batches."""
    spec, model, X, y, loss_fn = small_problem(n=600)
    train, held = Batch(X[:400], y[:400]), Batch(X[400:], y[400:])
    s = GrowthSettings(min_estimation_batch=300)
    one, growths, psi = growth_step(model, [0, 2], train, held, loss_fn, _metric, s, torch.Generator().manual_seed(3))
    assert len(growths) == 2
    seen: list[tuple[int, int]] = []  # (thread, rows) reaching any first layer, the grown models' too

    def first_layer(module, args):
        if isinstance(module, nn.Linear) and module.in_features == 6:
            seen.append((threading.get_ident(), args[0].shape[0]))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_layer)
    try:
        growth_step(model, [0, 2], train, held, loss_fn, _metric, s, torch.Generator().manual_seed(3))
        alone = sum(rows for _, rows in seen)

        def shard(rank):
            result = growth_step(copy.deepcopy(model), [0, 2], train, held, loss_fn, _metric, s,
                                 torch.Generator().manual_seed(3), parallel=rank)
            return result, sum(rows for thread, rows in seen if thread == threading.get_ident())

        shared = _Ranks(2).run(shard)
    finally:
        hook.remove()
    # each rank does its half of every pass (1150 of 2100 rows here: new neurons' BatchNorm statistics are
    # taken on the whole held-out batch in every process)
    assert all(work < 0.56 * alone for _, work in shared)
    for (grown, growths_r, psi_r), _ in shared:
        assert [g.candidate.in_index for g in growths_r] == [g.candidate.in_index for g in growths]
        for a, b in zip(growths_r, growths):
            assert a.gamma == pytest.approx(b.gamma, rel=1e-6)
            for field in ("loss_before", "loss_after", "metric_before", "metric_after"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-9), field
        assert psi_r.keys() == psi.keys() and all(psi_r[k] == pytest.approx(psi[k], rel=1e-9) for k in psi)
        torch.testing.assert_close(grown(X), one(X), rtol=1e-6, atol=1e-9)


def test_ranks_score_the_whole_held_out_batch_even_with_a_rank_that_has_no_rows():
    """Three ranks share two held-out rows: the summed (mean loss, accuracy) is the whole batch's, and so
    are the mean losses of several outputs stacked (the line search's batched evaluation)."""
    spec, model, X, y, loss_fn = small_problem()
    batch = Batch(X[:2], y[:2])
    with torch.no_grad():
        out = model(X[:2])
        expected = (float(loss_fn(out, y[:2]).mean()), _metric(out, y[:2]))
        stacked = [float(loss_fn(k * out, y[:2]).mean()) for k in (1.0, -2.0, 0.5)]

    def score(rank):
        rows = policy._rows(batch, rank)
        evaluator = policy._Evaluator(rows, loss_fn, _metric, rank)
        with torch.no_grad():
            out = model(rows.X)
            return rows.X.shape[0], evaluator(out), evaluator.losses(torch.stack([out, -2.0 * out, 0.5 * out]))

    results = _Ranks(3).run(score)
    assert sorted(n for n, _, _ in results) == [0, 1, 1]
    for _, (loss, metric), losses in results:
        assert loss == pytest.approx(expected[0], rel=1e-12) and metric == pytest.approx(expected[1], rel=1e-12)
        assert losses == pytest.approx(stacked, rel=1e-12)
    one = policy._Evaluator(batch, loss_fn, _metric)
    with torch.no_grad():
        assert one.losses(torch.stack([out, -2.0 * out, 0.5 * out])) == pytest.approx(stacked, rel=1e-12)


def test_truncated_keeps_the_first_neurons_up_to_the_budget():
    spec, model, X, y, loss_fn = _rich_problem()
    cand = candidates.tiny(moments_for(model, X, y, loss_fn, 2), 100)
    assert cand.n_neurons == 2
    assert policy._truncated(cand, 2) is cand and policy._truncated(cand, 5) is cand
    one = policy._truncated(cand, 1)
    assert one.n_neurons == 1 and torch.equal(one.alpha, cand.alpha[:1]) and torch.equal(one.omega, cand.omega[:, :1])
    assert one.lambdas == cand.lambdas[:1] and torch.equal(one.dW, cand.dW) and one.in_index == cand.in_index
    for budget in (0, -3):
        none = policy._truncated(cand, budget)
        assert none.n_neurons == 0 and none.omega.shape == (cand.omega.shape[0], 0) and none.lambdas == []


@pytest.mark.parametrize("widths", [(1, 3), (3, 1)])
def test_a_candidate_fits_only_the_pair_it_was_computed_for(widths):
    """A candidate still fits when its producer's fan-in, its consumer's outputs and (TINY's dW) its consumer's
    fan-in are those it was computed for: growing layer 0 changes layer 2's fan-in, growing layer 2 changes
    layer 0's consumer outputs and layer 2's own consumer fan-in."""
    spec, model, X, y, loss_fn = small_problem(widths=widths)
    gen = torch.Generator().manual_seed(0)
    first = {m.in_index: candidates.random(m, 2, gen) for m in gather_moments(model, [0, 2], X, y, loss_fn)}
    tiny = conv_fixtures.all_neurons(moments_for(model, X, y, loss_fn, 2))
    assert tiny.dW is not None and first[0].dW is None and tiny.n_neurons > 0
    assert policy._fits(model, first[0]) and policy._fits(model, first[2]) and policy._fits(model, tiny)
    grown_0 = add_neurons(model, first[0], 0.5)
    assert policy._fits(grown_0, first[0])  # no dW: its own pair's shapes are unchanged
    assert not policy._fits(grown_0, first[2]) and not policy._fits(grown_0, tiny)  # producer fan-in changed
    grown_2 = add_neurons(model, tiny, 0.5)
    assert not policy._fits(grown_2, first[0])  # its consumer now has more outputs
    assert not policy._fits(grown_2, tiny) and policy._fits(grown_2, first[2])  # dW no longer matches
    head = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 1)).double()  # a one-output regression head
    target = X[:, :1].pow(2)
    regression = per_sample_loss("regression")
    one = conv_fixtures.all_neurons(moments_for(head, X, target, regression, 0))
    assert one.dW.shape == (1, 4) and policy._fits(head, one)


def _three_block_resnet() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    spec = ArchSpec.resnet(task="classification", input_shape=(1, 4, 4), stages=(2, 1), stream_widths=[2, 3],
                           mid_widths=[2, 2, 2], n_outputs=3)
    torch.manual_seed(0)
    model = build_model(spec).double().eval()
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(80, 1, 4, 4, dtype=F64, generator=generator)
    return model, X, (X[:, 0, :2, :2].sum((1, 2)) > 0).long() + (X[:, 0, 2:].mean((1, 2)) > 0).long()


_SEED = 2  # a seed where all three first-round candidates lower the loss (in the order 3, 5, 4)


def _first_round(model, blocks, train, held, loss_fn, s, seed=_SEED):
    """The first round's candidates of a step (same generator seed) and each one's held-out loss decrease."""
    first, _ = policy._propose(model, blocks, [], train, loss_fn, s, torch.Generator().manual_seed(seed), None)
    scores = policy._Evaluator(held, loss_fn, _metric)
    with torch.no_grad():
        loss_0 = scores(model(held.X))[0]
        return {c.in_index: c for c in first}, {
            c.in_index: loss_0 - policy._amplitude(model, c, held, scores)[1] for c in first}


def _reuse_problem():
    """The three-block ResNet with a reuse_statistics step's settings, its first round and their scores."""
    model, X, y = _three_block_resnet()
    blocks = [i for i, m in enumerate(model) if isinstance(m, ResidualBlock)]
    loss_fn = per_sample_loss("classification")
    train, held = Batch(X[:50], y[:50]), Batch(X[50:], y[50:])
    s = GrowthSettings(method="random", reuse_statistics=True, neurons_per_step=2)
    first, score = _first_round(model, blocks, train, held, loss_fn, s)
    return model, blocks, loss_fn, train, held, s, first, score


def test_reused_statistics_apply_the_first_rounds_candidates_in_the_order_of_their_scores():
    """ResNet blocks are independent pairs: with ``reuse_statistics`` one round of statistics serves the
    whole step, and the first round's candidates are applied as they were (only their amplitude searched
    again), best first."""
    model, blocks, loss_fn, train, held, s, first, score = _reuse_problem()
    order = sorted(score, key=score.get, reverse=True)
    assert len(blocks) == 3 and len(set(score.values())) == 3 and min(score.values()) > 0
    _, growths, _ = growth_step(model, blocks, train, held, loss_fn, _metric, s, torch.Generator().manual_seed(_SEED))
    assert len(growths) >= 2 and [g.candidate.in_index for g in growths] == order[:len(growths)]
    for g in growths:
        assert torch.equal(g.candidate.alpha, first[g.candidate.in_index].alpha)
        assert torch.equal(g.candidate.omega, first[g.candidate.in_index].omega)


@pytest.mark.parametrize(("seed", "fresh"), [(15, 0), (27, 0), (56, 1)])
def test_each_reused_round_applies_the_first_candidate_that_still_lowers_the_loss(seed, fresh):
    """After the first round's best, each round re-searches the amplitudes of the first round's other
    candidates in their score order and applies the first one that still lowers the held-out loss; the ones
    examined before it are not examined again, and once they are used up the layers left get fresh
    statistics (``fresh`` growths here). Seeds where a later candidate would gain more (15), where a
    candidate examined without gain would gain after another growth (27), and where the layer of such a
    candidate grows from fresh statistics (56)."""
    model, blocks, loss_fn, train, held, s, _, _ = _reuse_problem()
    first, score = _first_round(model, blocks, train, held, loss_fn, s, seed)
    order = sorted(score, key=score.get, reverse=True)
    scores = policy._Evaluator(held, loss_fn, _metric)
    net, expected = model, []
    while order:
        with torch.no_grad():
            loss_0 = scores(net.eval()(held.X))[0]
        for k, i in enumerate(order):
            gamma, loss = policy._amplitude(net, first[i], held, scores)
            if gamma != 0.0 and loss < loss_0:
                net, order = add_neurons(net, first[i], gamma, held.X), order[k + 1 :]
                expected.append(i)
                break
        else:
            break
    _, growths, _ = growth_step(model, blocks, train, held, loss_fn, _metric, s, torch.Generator().manual_seed(seed))
    assert [g.candidate.in_index for g in growths[: len(expected)]] == expected and len(expected) >= 2
    later = growths[len(expected) :]
    assert len(later) == fresh
    for g in later:  # from new statistics, on a layer not grown yet
        i = g.candidate.in_index
        assert i not in expected and not torch.equal(g.candidate.alpha, first[i].alpha)


def test_reused_candidates_are_cut_to_the_budget_left_by_the_growths_before_them():
    """A parameter budget with room for the best candidate and one channel of the next: the reused second
    candidate is cut to that one channel, the third gets none, and the budget holds to the parameter."""
    model, blocks, loss_fn, train, held, s, first, score = _reuse_problem()
    best, second = sorted(score, key=score.get, reverse=True)[:2]
    cost = {i: neuron_cost(model, i)[0] for i in blocks}
    assert first[second].n_neurons == 2
    s = replace(s, max_params=count_params(model) + first[best].n_neurons * cost[best] + cost[second])
    grown, growths, _ = growth_step(model, blocks, train, held, loss_fn, _metric, s, torch.Generator().manual_seed(_SEED))
    params = count_params(model)
    for g in growths:
        i = g.candidate.in_index
        assert g.candidate.n_neurons == min(first[i].n_neurons, (s.max_params - params) // cost[i])
        params += g.candidate.n_neurons * cost[i]
    assert [(g.candidate.in_index, g.candidate.n_neurons) for g in growths] == [(best, first[best].n_neurons), (second, 1)]
    assert count_params(grown) == params <= s.max_params


@pytest.mark.parametrize("widths", [(1, 3), (3, 1)])
def test_estimation_rows_of_a_dense_pair_are_the_larger_of_its_two_app_e1_sizes(widths):
    spec, model, X, y, loss_fn = small_problem(widths=widths, n=8)
    s = GrowthSettings(estimation_scale=1.0, estimation_floor=1, min_estimation_batch=1)
    train = Batch(torch.zeros(10**4, 6, dtype=F64), torch.zeros(10**4, dtype=torch.long))
    for i_in, i_out in ((0, 2), (2, 4)):
        fan_in, consumer_fan_in = model[i_in].in_features, model[i_out].in_features
        assert policy._estimation_rows(model, i_in, train, s) == max((fan_in + 1) ** 2, (consumer_fan_in + 1) ** 2)


@pytest.mark.parametrize(("kind", "channels", "width", "expected"), [
    ("pool-conv", 4, 2, 37 * 37 // 9),        # producer: 4 x 3 x 3 + 1 = 37 over the 3 x 3 pooled grid
    ("pool-conv", 2, 4, 37 * 37 // 9),        # consumer: 4 x 3 x 3 + 1 = 37 over its 3 x 3 outputs
    ("pool-flatten-linear", 5, 2, 46 * 46 // 9),  # the grid before the flatten: 3 x 3
    ("conv", 5, 2, 46 * 46 // 49),            # no pooling: 7 x 7
])
def test_estimation_rows_of_a_conv_pair_count_the_positions_of_its_grid(kind, channels, width, expected):
    model, X, y = conv_fixtures.build(conv_fixtures.Case(kind=kind, channels=channels, width=width, next_width=4))
    s = GrowthSettings(estimation_scale=1.0, estimation_floor=1, min_estimation_batch=1)
    train = Batch(X.repeat(100, 1, 1, 1), y.repeat(100))
    consumer = model[conv_fixtures.consumer_index(model)]
    if kind == "pool-flatten-linear":  # the consumer reads 2 x 3 x 3 flattened inputs: one position
        expected = max(expected, (consumer.in_features + 1) ** 2)
    assert policy._estimation_rows(model, 0, train, s) == expected


def test_a_rounds_costly_conv_pair_reads_the_rows_app_e1_asks():
    """In one round, a pair whose views exceed CHEAP_VIEWS values per sample reads only its App. E.1 rows
    of the estimation batch (85 here), while the batch holds what the other pair asks (all 600 samples)."""
    from tinydeploy.growth.pairs import pairs_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(256, 3))
    train, loss_fn = Batch(torch.randn(600, 3, 8, 8), torch.randint(0, 3, (600,))), per_sample_loss("classification")
    s = GrowthSettings(estimation_floor=1, min_estimation_batch=1)
    probe = statistics._probe(model, dict(enumerate(pairs_of(model, [0, 2]))), train.X, train.y, loss_fn, set())
    assert min(p.views for p in probe.values()) > statistics.CHEAP_VIEWS
    assert [policy._estimation_rows(model, i, train, s) for i in (0, 2)] == [4 * 37 * 37 // 64, 600]
    (moments, psi), batch = policy._moments(model, [0, 2], [], train, loss_fn, s, torch.Generator().manual_seed(0))
    assert batch.X.shape[0] == 600 and [m.n for m in moments] == [85, 600] and sorted(psi) == [0, 2]


def test_estimation_batch_size_divides_by_the_positions_in_whole_samples():
    """Per-position terms: (d+1)^2 / P and floor x (d+1) // P, whole samples."""
    floor = GrowthSettings(estimation_scale=1.0, estimation_floor=16, min_estimation_batch=1)
    scale = replace(floor, estimation_floor=1)
    assert [estimation_batch_size(9, 10**6, floor, positions=3)] == [53]  # 160 // 3 beats 100 / 3
    assert estimation_batch_size(9, 10**6, scale, positions=3) == 33  # int(100 / 3)
    assert all(type(estimation_batch_size(9, 10**6, t, positions=3)) is int for t in (floor, scale))


def test_growth_step_never_exceeds_a_mac_budget():
    """Room for one more neuron's MACs at layer 2 (its fan-in 6 and fan-out 5) and none at layer 0."""
    spec, model, X, y, loss_fn = _rich_problem()
    macs = count_macs(model, output_shapes(model, X[:1]))
    s = GrowthSettings(max_macs=macs + 6 + 5, min_estimation_batch=4096)
    grown, growths, _ = growth_step(model, [0, 2], Batch(X, y), Batch(X[:500], y[:500]), loss_fn, _metric, s,
                                    torch.Generator().manual_seed(0))
    assert [(g.candidate.in_index, g.candidate.n_neurons) for g in growths] == [(2, 1)]
    assert count_macs(grown, output_shapes(grown, X[:1])) == s.max_macs


@pytest.mark.parametrize("method", ["north", "folding"])
def test_growth_step_gives_the_model_and_estimation_batch_to_the_methods_that_need_them(method):
    spec, model, X, y, loss_fn = small_problem(widths=(3,))  # Folding grows the last hidden layer of an MLP
    grown, growths, _ = growth_step(model, [0], Batch(X[:250], y[:250]), Batch(X[250:], y[250:]), loss_fn,
                                    _metric, GrowthSettings(method=method), torch.Generator().manual_seed(0))
    assert [g.candidate.method for g in growths] == [method] and grown[0].out_features > 3


def test_balanced_growth_sizes_fan_in_and_fan_out_alike_relative_to_their_layers():
    """``balance``: RMS(alpha_k) / RMS(producer weights) = RMS(omega_k) / RMS(consumer weights) for every new
    neuron, with the same product omega_k alpha_k^T (so the same function for ReLU) as without it."""
    spec, model, X, y, loss_fn = _rich_problem()
    run = lambda balanced: growth_step(model, [2], Batch(X, y), Batch(X[:500], y[:500]), loss_fn, _metric,
                                       GrowthSettings(balance=balanced, min_estimation_batch=4096),
                                       torch.Generator().manual_seed(0))[1]
    (plain,), (balanced,) = run(False), run(True)
    a, b = plain.candidate, balanced.candidate
    assert a.n_neurons == b.n_neurons == 2 and not torch.allclose(a.alpha, b.alpha)
    torch.testing.assert_close(b.omega @ b.alpha, a.omega @ a.alpha, rtol=1e-12, atol=1e-15)
    rms = lambda w: w.pow(2).mean().sqrt()
    for k in range(2):
        torch.testing.assert_close(rms(b.alpha[k]) / rms(model[2].weight), rms(b.omega[:, k]) / rms(model[4].weight),
                                   rtol=1e-12, atol=0)
    assert balanced.loss_after == pytest.approx(plain.loss_after, rel=1e-9)


@pytest.mark.parametrize("world", [2, 3])
def test_statistics_on_shards_summed_over_ranks_equal_the_whole_batchs(world):
    """Every rank reads its rows of every chunk (7 rows a chunk, so later ranks start inside it) and the sums
    go over the ranks: each returns the one-process moments (the Gaussian goal too) and bottlenecks."""
    spec, model, X, y, loss_fn = small_problem(n=40)
    whole = gather_moments(model, [0, 2], X, y, loss_fn, chunk_size=7, generator=torch.Generator().manual_seed(1))
    psi = gather_bottlenecks(model, [0, 2], X, y, loss_fn, chunk_size=7)

    def shard(rank):
        moments = gather_moments(copy.deepcopy(model), [0, 2], X, y, loss_fn, chunk_size=7,
                                 generator=torch.Generator().manual_seed(1), shard=(rank.rank, world), total=rank.sum)
        return moments, gather_bottlenecks(copy.deepcopy(model), [0, 2], X, y, loss_fn, chunk_size=7,
                                           shard=(rank.rank, world), total=rank.sum)

    def round_on_shard(rank):
        return gather_round(copy.deepcopy(model), [2], [0], X, y, loss_fn, chunk_size=7,
                            generator=torch.Generator().manual_seed(1), shard=(rank.rank, world), total=rank.sum)

    for moments, psi_r in _Ranks(world).run(shard):
        assert psi_r.keys() == psi.keys() and all(psi_r[k] == pytest.approx(psi[k], rel=1e-10) for k in psi)
        for a, b in zip(moments, whole):
            assert a.n == b.n == 40
            for name in ("S", "N_v", "N_z", "S_h", "N_h", "VV"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-13, msg=name)
    for _, psi_r in _Ranks(world).run(round_on_shard):  # layer 0 consumer-side only, layer 2 in full
        assert psi_r.keys() == psi.keys() and all(psi_r[k] == pytest.approx(psi[k], rel=1e-10) for k in psi)


def test_statistics_on_a_shard_without_the_sum_over_processes_are_refused():
    spec, model, X, y, loss_fn = small_problem(n=20)
    message = "statistics on a shard of the batch need `total`, the sum over the processes"
    for gather in (gather_moments, gather_bottlenecks, lambda *args, **kw: gather_round(model, [0], [2], X, y, loss_fn, **kw)):
        with pytest.raises(ValueError) as error:
            gather(model, [0, 2], X, y, loss_fn, shard=(0, 2))
        assert str(error.value) == message


# ----- candidates: ridge, dispatch, balance, the Gaussian goal ------------------------------------------------
@pytest.mark.parametrize("ridge", [0.1, 1.0])
def test_tiny_with_a_ridge_ridges_s_and_s_h_and_reports_the_papers_bottleneck(ridge):
    """``ridge``: dW* is the ridge regression on B_h, S^(-1/2) inverts the ridged S (both change the
    neurons), and Psi stays the paper's (pseudo-inverse dW*), the same as without a ridge."""
    spec, model, X, y, loss_fn = _rich_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    plain, ridged = candidates.tiny(m, 100), candidates.propose("tiny", m, 100, ridge=ridge)
    assert ridged.psi == pytest.approx(candidates.bottleneck(m), rel=1e-12)
    assert plain.psi == pytest.approx(candidates.bottleneck(m), rel=1e-9)
    S_h = m.S_h + ridge * torch.trace(m.S_h) / m.S_h.shape[0] * torch.eye(m.S_h.shape[0], dtype=m.S_h.dtype)
    dW = m.N_h.T @ torch.linalg.inv(S_h)  # the ridge regression on B_h, written out
    torch.testing.assert_close(m.best_update(ridge), dW, rtol=1e-9, atol=1e-12)
    S_inv_sqrt = linalg.psd_inverse_sqrt(m.S, linalg.rank_cut(m.n, m.S.shape[0], m.eps), ridge=ridge)
    expected = linalg.new_neurons(S_inv_sqrt, m.projected_cross_moment(dW))
    assert ridged.n_neurons > 0
    torch.testing.assert_close(ridged.dW, dW, rtol=1e-9, atol=1e-12)
    assert ridged.lambdas == pytest.approx(expected.lambdas[: ridged.n_neurons].tolist(), rel=1e-12)
    assert ridged.lambdas != pytest.approx(plain.lambdas[: ridged.n_neurons], rel=1e-3)
    assert (ridged.in_index, ridged.out_index, plain.out_index) == (2, 4, 4)


def test_tiny_with_a_small_ridge_and_a_dead_input_whitens_through_the_ridged_spectrum():
    """A dead input feature (a zero row and column of S) and a ridge too small to lift it over the rank
    cut: S has no Cholesky whitening, and the neurons come from the ridged spectrum's S^(-1/2)."""
    spec, model, X, y, loss_fn = _rich_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    S = m.S.clone()
    S[0, :], S[:, 0] = 0.0, 0.0
    m, ridge = replace(m, S=S, spectra={}), 1e-3
    cut = linalg.rank_cut(m.n, S.shape[0], m.eps)
    assert isinstance(m.factor(S, cut, ridge), linalg.Spectrum)
    cand = candidates.tiny(m, 100, ridge)
    N = m.projected_cross_moment(m.best_update(ridge))
    expected = linalg.new_neurons(linalg.psd_inverse_sqrt(S, cut, ridge=ridge), N)
    unridged = linalg.new_neurons(linalg.psd_inverse_sqrt(S, cut), N)
    k = cand.n_neurons
    assert k > 0 and cand.lambdas == pytest.approx(expected.lambdas[:k].tolist(), rel=1e-10)
    assert cand.lambdas != pytest.approx(unridged.lambdas[:k].tolist(), rel=1e-6)
    torch.testing.assert_close(linalg.whitening(linalg.Spectrum.of(S), cut, ridge),
                               linalg.psd_inverse_sqrt(S, cut, ridge=ridge), rtol=1e-12, atol=1e-12)


def test_random_candidate_names_its_pair():
    spec, model, X, y, loss_fn = small_problem()
    cand = candidates.random(moments_for(model, X, y, loss_fn, 0), 2, torch.Generator().manual_seed(0))
    assert (cand.in_index, cand.out_index, cand.n_neurons) == (0, 2, 2)


@pytest.mark.parametrize("method", ["north", "folding"])
def test_propose_gives_north_and_folding_the_context_and_the_generator(method):
    spec, model, X, y, loss_fn = small_problem(widths=(4,))
    m = moments_for(model, X, y, loss_fn, 0)
    with pytest.raises(ValueError) as error:
        candidates.propose(method, m, 3)
    assert str(error.value) == f"growth method '{method}' needs the model and the estimation batch (context)"
    context = Context(model, X, y, loss_fn)
    torch.manual_seed(0)
    a = candidates.propose(method, m, 3, torch.Generator().manual_seed(5), context=context)
    torch.manual_seed(1)
    b = candidates.propose(method, m, 3, torch.Generator().manual_seed(5), context=context)
    assert a.method == method and a.n_neurons >= 1 and torch.equal(a.alpha, b.alpha)
    c = candidates.propose(method, m, 3, torch.Generator().manual_seed(6), context=context)
    assert not torch.equal(a.alpha, c.alpha)  # the generator, not the global RNG, draws


def test_balance_rescales_a_single_neuron_and_leaves_neurons_without_fan_out():
    spec, model, X, y, loss_fn = _rich_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    one = candidates.tiny(m, 1)
    scaled = candidates.balance(one, 0.2, 3.0)
    rms = lambda t: float(t.pow(2).mean().sqrt())
    assert rms(scaled.alpha) / 0.2 == pytest.approx(rms(scaled.omega) / 3.0, rel=1e-12)
    assert not torch.allclose(scaled.alpha, one.alpha)
    torch.testing.assert_close(scaled.omega @ scaled.alpha, one.omega @ one.alpha, rtol=1e-12, atol=1e-15)
    silent = replace(one, omega=torch.zeros_like(one.omega))  # fan-out 0 (NORTH, Folding): nothing to balance
    kept = candidates.balance(silent, 0.2, 3.0)
    assert torch.equal(kept.alpha, silent.alpha) and torch.equal(kept.omega, silent.omega)


@pytest.mark.parametrize("case", [conv_fixtures.Case(kind="conv"), conv_fixtures.Case(dims=1, next_kernel=2, next_padding=0),
                                  conv_fixtures.Case(kind="flatten-linear")], ids=str)
def test_gaussian_goal_with_the_covariance_of_a_unit_goal_per_position_is_n_z(case):
    """covariance / L = I (a standard Gaussian goal at each of the L output positions): N_null = N_z itself,
    for any number of taps."""
    model, X, y = conv_fixtures.build(case)
    m = gather_moments(model, [0], X, y, per_sample_loss("classification"), generator=torch.Generator().manual_seed(0))[0]
    assert m.out_positions > 1 or case.kind == "flatten-linear"
    covariance = m.out_positions * torch.eye(m.n_outputs, dtype=F64)
    torch.testing.assert_close(candidates.gaussian_like_goal(m, covariance), m.N_z, rtol=1e-12, atol=1e-15)


def test_growth_step_gathers_and_proposes_with_its_ridge():
    """``ridge``: the statistics' second pass (layer 0 here: 1 output after 8 neurons, so the projected N comes
    from a second pass) and TINY's S^(-1/2) use it; the applied neurons are the ridged ones."""
    _spec, model, X, y, loss_fn = small_problem(widths=(8, 1), n=2000)
    s = GrowthSettings(ridge=0.5, min_estimation_batch=4096)
    m = gather_moments(model, [0], X, y, loss_fn, chunk_size=s.chunk_size, generator=torch.Generator().manual_seed(0),
                       ridge=0.5)[0]
    expected = candidates.tiny(m, neuron_budget(model, 0, 2, s), ridge=0.5)
    _, growths, _ = growth_step(model, [0], Batch(X, y), Batch(X[:500], y[:500]), loss_fn, _metric, s,
                                torch.Generator().manual_seed(0))
    assert len(growths) == 1 and expected.n_neurons >= 1
    torch.testing.assert_close(growths[0].candidate.alpha, expected.alpha, rtol=1e-10, atol=1e-12)
    assert growths[0].candidate.lambdas == pytest.approx(expected.lambdas, rel=1e-10)
    unridged = gather_moments(model, [0], X, y, loss_fn, generator=torch.Generator().manual_seed(0))[0]
    assert candidates.tiny(unridged, 100, ridge=0.5).lambdas != pytest.approx(expected.lambdas, rel=1e-6)


def test_neuron_budget_reads_the_per_layer_caps_and_needs_a_sample_for_macs():
    _spec, model, X, y, loss_fn = small_problem(widths=(3, 4))
    s = GrowthSettings(neurons_per_step=16, layer_neurons={0: 2}, layer_max_width={2: 5})
    assert (neuron_budget(model, 0, 2, s), neuron_budget(model, 2, 4, s)) == (2, 1)  # 2 asked; 5 - 4 wide
    with pytest.raises(ValueError) as error:
        neuron_budget(model, 0, 2, GrowthSettings(max_macs=10**6))
    assert str(error.value) == "a MAC budget needs a sample input to measure output positions"


def test_reused_candidates_without_room_are_skipped_for_the_next_that_has_some():
    """After the best block grows, the budget has room for one channel of a stage-1 block (39 parameters) but
    none of the stage-2 block (48): the stage-2 candidate, next in the first round's order, is skipped and the
    stage-1 one after it is grown."""
    model, blocks, loss_fn, train, held, s, first, score = _reuse_problem()
    order = sorted(score, key=score.get, reverse=True)
    cost = {i: neuron_cost(model, i)[0] for i in blocks}
    assert order == [3, 5, 4] and (cost[3], cost[4], cost[5]) == (39, 39, 48)
    s = replace(s, max_params=count_params(model) + first[3].n_neurons * cost[3] + 40)
    grown, growths, _ = growth_step(model, blocks, train, held, loss_fn, _metric, s, torch.Generator().manual_seed(_SEED))
    assert [(g.candidate.in_index, g.candidate.n_neurons) for g in growths] == [(3, first[3].n_neurons), (4, 1)]
    # new channels' BatchNorm holds their statistics on the held-out batch (not the identity defaults)
    bn = grown[3].bn1
    assert not torch.equal(bn.running_var[2:], torch.ones_like(bn.running_var[2:]))



@pytest.mark.parametrize("keep", [True, False])
def test_conv_statistics_on_shards_summed_over_ranks_equal_the_whole_batchs(keep, monkeypatch):
    """A conv pair (unfolded in slices, the Gaussian goal drawn per chunk and sliced per rank): two ranks return
    the one-process moments, the projected N of the second pass too, whether that pass reads the kept
    tensors or (``KEEP_VALUES`` 0) runs each rank's rows through the model again."""
    if not keep:
        monkeypatch.setattr(statistics, "KEEP_VALUES", 0)
    model, X, y = conv_fixtures.build(conv_fixtures.Case(kind="pool-conv", n=20))
    loss_fn = per_sample_loss("classification")
    whole = gather_moments(model, [0], X, y, loss_fn, chunk_size=7, generator=torch.Generator().manual_seed(1))[0]
    assert whole.N is not None

    def shard(rank):
        return gather_moments(copy.deepcopy(model), [0], X, y, loss_fn, chunk_size=7, shard=(rank.rank, 2),
                              total=rank.sum, generator=torch.Generator().manual_seed(1))[0]

    for m in _Ranks(2).run(shard):
        for name in ("S", "N_v", "N_z", "S_h", "N_h", "VV", "N"):
            torch.testing.assert_close(getattr(m, name), getattr(whole, name), rtol=1e-10, atol=1e-13, msg=name)
