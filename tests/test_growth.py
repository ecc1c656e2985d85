"""Growth as a function (model, statistics) -> wider model: function preservation, optimizer state,
amplitude search, and TINY against its baselines on a real dataset."""

from __future__ import annotations

import math

import pytest
import torch

from growth_fixtures import moments_for, small_problem
from tinydeploy.growth import candidates, gradmax
from tinydeploy.growth.amplitude import line_search, pointwise
from tinydeploy.growth.policy import Batch, GrowthSettings, estimation_batch_size, growth_step, neuron_budget
from tinydeploy.growth.surgery import add_neurons, carry_optimizer_state, grown_output


def _candidates(model, X, y, loss_fn, layer=2):
    m = moments_for(model, X, y, loss_fn, layer)
    gen = torch.Generator().manual_seed(3)
    return {
        "tiny": candidates.tiny(m, 3),
        "gradmax": gradmax.gradmax(m, 3),
        "random": candidates.random(m, 3, gen),
    }


@pytest.mark.parametrize("method", ["tiny", "gradmax", "random"])
def test_gamma_zero_leaves_the_function_unchanged(method):
    spec, model, X, y, loss_fn = small_problem()
    cand = _candidates(model, X, y, loss_fn)[method]
    assert cand.n_neurons > 0
    grown = add_neurons(model, cand, 0.0)
    assert grown[2].out_features == model[2].out_features + cand.n_neurons
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=0)


def test_gradmax_is_function_preserving_at_insertion():
    spec, model, X, y, loss_fn = small_problem()
    cand = _candidates(model, X, y, loss_fn)["gradmax"]
    assert torch.count_nonzero(cand.alpha) == 0 and cand.omega.abs().max() > 0
    grown = add_neurons(model, cand, 1.0)
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=0)
    rms = float(grown[4].weight.detach()[:, model[4].in_features:].pow(2).mean().sqrt())
    assert rms == pytest.approx(gradmax.FAN_OUT_RMS, rel=1e-6)


@pytest.mark.parametrize("method", ["tiny", "gradmax", "random"])
@pytest.mark.parametrize("gamma", [0.3, -0.7, 2.0])
def test_fast_line_search_forward_equals_the_grown_model(method, gamma):
    spec, model, X, y, loss_fn = small_problem()
    cand = _candidates(model, X, y, loss_fn)[method]
    torch.testing.assert_close(grown_output(model, cand, X)(gamma), add_neurons(model, cand, gamma)(X).detach(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["tiny", "random"])
@pytest.mark.parametrize("activation, linear", [("relu", True), ("identity", True), ("tanh", False), ("gelu", False)])
def test_stacked_amplitudes_of_both_signs_are_each_grown_model(activation, linear, method):
    """Several amplitudes of both signs in one stacked evaluation: each copy is the grown model's output
    (with TINY's best update g dW* and without it). Through a positively homogeneous activation the
    consumer's output is base + g C_s (one multiply-add per sign of g); through the others the new channels
    are recomputed at each amplitude."""
    _, model, X, y, loss_fn = small_problem(activation)
    cand = _candidates(model, X, y, loss_fn)[method]
    assert (cand.dW is not None) == (method == "tiny")
    output = grown_output(model, cand, X)
    assert output.linear is linear
    gammas = [-1.3, 0.0, 0.4, 2.0, -0.2]
    expected = torch.stack([add_neurons(model, cand, g)(X).detach() for g in gammas])
    torch.testing.assert_close(output.stacked(gammas), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output.stacked([0.0]), model(X).detach()[None], rtol=0, atol=1e-15)
    torch.testing.assert_close(output(1.0), add_neurons(model, cand, 1.0)(X).detach(), rtol=1e-12, atol=1e-12)
    negative = [-0.5, -2.0]  # one sign only
    torch.testing.assert_close(output.stacked(negative), torch.stack([add_neurons(model, cand, g)(X).detach()
                                                                      for g in negative]), rtol=1e-12, atol=1e-12)


def test_adam_state_of_old_parameters_survives_growth():
    spec, model, X, y, loss_fn = small_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(X), y).mean().backward()
        optimizer.step()
    cand = _candidates(model, X, y, loss_fn)["tiny"]
    grown = add_neurons(model, cand, 0.5)
    new_optimizer = carry_optimizer_state(optimizer, model, grown)
    old_params = dict(model.named_parameters())
    for name, param in grown.named_parameters():
        old_state, new_state = optimizer.state[old_params[name]], new_optimizer.state[param]
        assert new_state["step"] == old_state["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            corner = tuple(slice(0, s) for s in old_params[name].shape)
            assert torch.equal(new_state[key][corner], old_state[key])
            padding = new_state[key].clone()
            padding[corner] = 0
            assert torch.count_nonzero(padding) == 0
    assert new_optimizer.param_groups[0]["lr"] == 1e-3
    new_optimizer.zero_grad()
    loss_fn(grown(X), y).mean().backward()
    new_optimizer.step()  # shapes line up: training goes on
    assert all(torch.isfinite(p).all() for p in grown.parameters())


def test_line_search_finds_the_minimum_of_a_smooth_loss():
    gamma, loss = line_search(pointwise(lambda g: (math.log(g) - math.log(0.3)) ** 2 if g > 0 else 5.0))
    assert gamma == pytest.approx(0.3, rel=0.02) and loss < 1e-3
    gamma, loss = line_search(pointwise(lambda g: 1.0 + g * g), signed=True)  # nothing beats no change
    assert gamma == 0.0 and loss == 1.0
    gamma, _ = line_search(pointwise(lambda g: (g + 2.0) ** 2), signed=True)
    assert gamma == pytest.approx(-2.0, rel=0.02)


def test_budget_limits_neurons_and_estimation_batch_rule():
    spec, model, X, y, loss_fn = small_problem(widths=(3, 4))
    s = GrowthSettings(neurons_per_step=16, max_params=None, max_width=5)
    assert neuron_budget(model, 0, 2, s) == 2
    params = sum(p.numel() for p in model.parameters())
    s = GrowthSettings(neurons_per_step=16, max_params=params + 2 * (6 + 1 + 4) + 1)
    assert neuron_budget(model, 0, 2, s) == 2
    rule = GrowthSettings(estimation_scale=1.0, estimation_floor=16, min_estimation_batch=256)
    assert estimation_batch_size(64, 100_000, rule) == 65 * 65
    assert estimation_batch_size(3, 100_000, rule) == 256
    assert estimation_batch_size(64, 1000, rule) == 1000


def test_growth_step_adds_significant_neurons_and_lowers_held_out_loss():
    spec, model, X, y, loss_fn = small_problem(widths=(2, 2), n=1200)
    train, held_out = Batch(X[:900], y[:900]), Batch(X[900:], y[900:])
    metric = lambda out, t: float((out.argmax(1) == t).double().mean())  # noqa: E731
    grown, growths, moments = growth_step(model, [0, 2], train, held_out, loss_fn, metric, GrowthSettings(),
                                          torch.Generator().manual_seed(0))
    assert growths, "a width-2 net on this problem has a significant bottleneck"
    for g in growths:
        assert g.loss_after < g.loss_before and g.gamma > 0
        assert all(lam > g.candidate.lambda_null for lam in g.candidate.lambdas)
    added = sum(g.candidate.n_neurons for g in growths)
    assert sum(grown[i].out_features for i in (0, 2)) == 4 + added
    assert len(moments) == 2
