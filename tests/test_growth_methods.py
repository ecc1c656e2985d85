"""The growth methods of the papers (TINY, GradMax, NORTH-pre, Growing by Folding, Random) against the
properties their papers state: function preservation, GradMax's trainable fan-in, NORTH's
orthogonal pre-activations, Folding's fold point and typical instance; and linear-region counts."""

from __future__ import annotations

import math

import pytest
import torch
from growth_fixtures import explicit_activities, moments_for, small_problem
from torch import nn

from tinydeploy.growth import candidates, folding, gradmax, north
from tinydeploy.growth.candidates import Context
from tinydeploy.growth.statistics import with_ones
from tinydeploy.growth.surgery import add_neurons
from tinydeploy.model.build import FUNCTION_MIN_VALUES, ReLU
from tinydeploy.model.regions import count_linear_regions, count_patterns

#: The amplitude each method's neurons are added with when the function is unchanged: its paper's.
AT_INSERTION = {"tiny": 0.0, "random": 0.0, "gradmax": 1.0, "north": 1.0, "folding": 1.0}


def _shallow(n: int = 400, seed: int = 0):
    """A float64 Linear - ReLU - Linear classifier (the only kind Folding grows) on the fixture's problem."""
    return small_problem(widths=(4,), n=n, seed=seed)


def _propose(method: str, model, X, y, loss_fn, layer: int = 0, k: int = 3):
    m = moments_for(model, X, y, loss_fn, layer)
    return candidates.propose(method, m, k, torch.Generator().manual_seed(3), context=Context(model, X, y, loss_fn))


@pytest.mark.parametrize("method", candidates.METHODS)
def test_every_method_leaves_the_function_unchanged_where_its_paper_says(method):
    _, model, X, y, loss_fn = _shallow()
    cand = _propose(method, model, X, y, loss_fn)
    assert cand.n_neurons > 0 and cand.method == method
    grown = add_neurons(model, cand, AT_INSERTION[method])
    assert grown[0].out_features == model[0].out_features + cand.n_neurons
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=0)
    if method in ("gradmax", "north", "folding"):  # and at any amplitude: one side of each neuron is 0
        torch.testing.assert_close(add_neurons(model, cand, 3.7)(X), model(X), rtol=0, atol=0)


def test_relu_has_derivative_one_at_zero_and_traces_to_a_plain_relu():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    y = ReLU()(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 0.0, 2.0] and x.grad.tolist() == [0.0, 1.0, 1.0]
    # a batch large enough for the autograd Function: the same values and gradients
    big = torch.tensor([-1.0, 0.0, 2.0]).repeat(FUNCTION_MIN_VALUES // 3 + 1).requires_grad_()
    out = ReLU()(big)
    assert out.grad_fn is not None and "RightDerivative" in type(out.grad_fn).__name__
    (out * torch.arange(big.numel())).sum().backward()
    assert torch.equal(out, torch.relu(big.detach()))
    assert torch.equal(big.grad, torch.arange(big.numel()) * (big.detach() >= 0))
    traced = torch.jit.trace(nn.Sequential(nn.Linear(2, 2), ReLU()).eval().requires_grad_(False), torch.ones(1, 2))
    assert "aten::relu" in str(traced.inlined_graph) and "aten::where" not in str(traced.inlined_graph)


# ----- GradMax -----------------------------------------------------------------------------------------
def _sgd(model, X, y, loss_fn, steps: int, lr: float) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(X), y).mean().backward()
        optimizer.step()
    with torch.no_grad():
        return float(loss_fn(model(X), y).mean())


def test_gradmax_fan_in_gets_the_gradient_it_maximised():
    _, model, X, y, loss_fn = small_problem()
    m = moments_for(model, X, y, loss_fn, 2)
    cand = gradmax.gradmax(m, 3)
    grown = add_neurons(model, cand, 1.0)
    loss_fn(grown(X), y).sum().backward()
    new_rows = torch.cat([grown[2].weight.grad, grown[2].bias.grad[:, None]], dim=1)[model[2].out_features:]
    expected = -X.shape[0] * (m.N_v @ cand.omega).T  # d(sum l)/d alpha_k = -n sigma'(0) N~ omega_k
    torch.testing.assert_close(new_rows, expected, rtol=1e-9, atol=1e-12)
    assert new_rows.abs().min() > 0


def test_gradmax_neurons_train_and_lower_the_loss_faster_than_without_them():
    _, model, X, y, loss_fn = small_problem(widths=(2, 2), n=600)
    cand = gradmax.gradmax(moments_for(model, X, y, loss_fn, 2), 4)
    grown = add_neurons(model, cand, 1.0)
    k = cand.n_neurons
    assert k > 0 and torch.count_nonzero(grown[2].weight[-k:]) == 0
    plain = _sgd(model, X, y, loss_fn, steps=20, lr=0.3)
    with_new = _sgd(grown, X, y, loss_fn, steps=20, lr=0.3)
    fan_in = torch.cat([grown[2].weight[-k:], grown[2].bias[-k:, None]], dim=1)
    assert (fan_in.abs().sum(dim=1) > 1e-8).all()  # every new neuron left 0
    assert with_new < plain


def test_gradmax_conv_kernels_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), ReLU(), nn.AvgPool2d(2), nn.Conv2d(2, 3, 3), ReLU(),
                          nn.Flatten(), nn.Linear(3, 4)).double()
    X = torch.randn(64, 1, 6, 6, dtype=torch.float64)
    y = (X[:, 0, :3].sum((1, 2)) > 0).long() + 2 * (X[:, 0, :, :3].sum((1, 2)) > 0).long()
    per_sample = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    m = moments_for_conv(model, X, y, per_sample)
    cand = gradmax.gradmax(m, 2)
    grown = add_neurons(model, cand, 1.0)
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=1e-14)  # extra zero channels: summation order
    _sgd(grown, X, y, per_sample, steps=3, lr=0.5)
    assert cand.n_neurons > 0 and (grown[0].weight[2:].abs().flatten(1).sum(dim=1) > 0).all()


def moments_for_conv(model, X, y, loss_fn):
    from tinydeploy.growth.statistics import gather_moments

    return gather_moments(model, [0], X, y, loss_fn, chunk_size=16, generator=torch.Generator().manual_seed(0))[0]


# ----- NORTH-pre ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 2])
def test_north_pre_activations_are_orthogonal_to_the_existing_ones_on_the_estimation_batch(layer):
    _, model, X, y, loss_fn = small_problem(widths=(3, 2))  # layer 2: 2 neurons on 3 inputs + bias
    m = moments_for(model, X, y, loss_fn, layer)
    out_index = layer + 2
    B_prev, _, _ = explicit_activities(model, X, y, loss_fn, layer, out_index)
    W = north.fan_in_matrix(model[layer])
    U = torch.randn(B_prev.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha = north.kernel_fan_in(m.S, W, m.S @ U)
    assert alpha.shape[0] == 2
    existing, new = W @ B_prev, alpha @ B_prev
    torch.testing.assert_close(existing, model[layer](with_ones(B_prev[:-1].T)[:, :-1]).T.detach())
    cosines = (existing / existing.norm(dim=1, keepdim=True)) @ (new / new.norm(dim=1, keepdim=True)).T
    assert cosines.abs().max() < 1e-10
    assert abs(float(new[0] @ new[1])) < 1e-10 * float(new[0].norm() * new[1].norm())  # and to each other
    assert new.norm(dim=1).min() > 1e-3 * existing.norm(dim=1).max()


def test_north_candidate_scales_to_the_existing_pre_activations_and_stops_when_the_kernel_is_exhausted():
    _, model, X, y, loss_fn = small_problem(widths=(3, 4))
    context = Context(model, X, y, loss_fn)
    m = moments_for(model, X, y, loss_fn, 2)
    cand = north.north(m, 16, context, torch.Generator().manual_seed(0))
    assert cand.details["trigger"] == north.trigger(cand.details["effective_dimension"], 4)
    W = north.fan_in_matrix(model[2])
    rms = lambda A: torch.einsum("kd,de,ke->k", A, m.S, A).sqrt()
    torch.testing.assert_close(rms(cand.alpha), rms(W).mean().expand(cand.n_neurons), rtol=1e-9, atol=0)
    assert torch.count_nonzero(cand.omega) == 0
    # the layer's 4 pre-activations are linear in its 3 inputs + bias: 4 = D directions, none is left
    full = north.kernel_fan_in(m.S, W, m.S @ torch.randn(4, 3, dtype=torch.float64))
    assert full.shape[0] == 0


@pytest.mark.parametrize(("count", "width", "expected"), [(1, 1, 1), (2, 2, 1), (9, 10, 0), (10, 10, 1), (19, 20, 1),
                                                          (18, 20, 0), (100, 100, 10), (0, 3, 0)])
def test_north_trigger(count, width, expected):
    assert north.trigger(count, width) == expected


def test_north_effective_dimension_counts_singular_values_above_epsilon():
    H = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.001, 0.0, 0.0]], dtype=torch.float64)
    H[2] = H[1] * 2  # linearly dependent: two directions
    assert north.effective_dimension(H @ H.T / 4) == 2
    assert north.effective_dimension(torch.diag(torch.tensor([1.0, 1e-5], dtype=torch.float64))) == 1


# ----- Growing by Folding ------------------------------------------------------------------------------
def test_folding_neuron_folds_at_x_f_with_x_t_on_its_active_side():
    _, model, X, y, loss_fn = _shallow()
    cand = _propose("folding", model, X, y, loss_fn)
    assert cand.n_neurons == 1 and torch.count_nonzero(cand.omega) == 0
    x_t, x_f = (torch.tensor(cand.details[k], dtype=torch.float64) for k in ("x_t", "x_f"))
    w, b = cand.alpha[0, :-1], cand.alpha[0, -1]
    assert abs(float(w @ x_f + b)) < 1e-12 * float(w.norm() * (x_f.norm() + 1))
    assert float(w @ x_t + b) > 1e-3 * float(w.norm() * (x_t - x_f).norm())
    assert math.isclose(float(w.norm()), float(model[0].weight.detach().norm(dim=1).mean()), rel_tol=1e-9)
    # x_t is a sample of the batch, and x_f lies on the boundary between its class and the rival class
    label, rival = cand.details["label"], cand.details["rival"]
    assert float((X - x_t).norm(dim=1).min()) == 0.0 and label == int(y[(X - x_t).norm(dim=1).argmin()])
    if cand.details["fold"] in ("segment", "boundary"):
        with torch.no_grad():
            out = model(x_f[None])[0]
        assert abs(float(out[label] - out[rival])) < 1e-9


def test_kmeans_step_picks_the_planted_high_loss_cluster():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0], [3.0, 12.0]], dtype=torch.float64)
    X = torch.cat([c + 0.5 * torch.randn(40, 2, dtype=torch.float64, generator=generator) for c in centres])
    losses = torch.full((200,), 0.1, dtype=torch.float64)
    planted = slice(120, 160)  # the blob at (6, 6)
    losses[planted] = 2.0
    losses[0] = 3.0  # one noisy high-loss point elsewhere does not make a kind of mistake
    typical = folding.typical_instance(X, losses, k=5, generator=torch.Generator().manual_seed(1))
    members = torch.zeros(200, dtype=torch.bool)
    members[planted] = True
    assert torch.equal(typical.cluster, members) and typical.mean_loss == pytest.approx(2.0)
    blob = X[planted]
    assert typical.index == 120 + int((blob - blob.mean(dim=0)).norm(dim=1).argmin())


def test_weighted_kmeans_centroids_are_weighted_means():
    X = torch.tensor([[0.0], [1.0], [10.0], [11.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    centroids, labels = folding.weighted_kmeans(X, w, 2, torch.Generator().manual_seed(0))
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.75, 10.5])
    assert labels[0] == labels[1] != labels[2] == labels[3]


def _fold_net(second_unit_weight: float) -> nn.Sequential:
    """2-D inputs, hidden units relu(x1 + x2) and relu(x1 - 0.5); logits (0, h1 + c h2 - 1): class 1's margin
    over class 0 is h1 + c h2 - 1."""
    net = nn.Sequential(nn.Linear(2, 2), ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
        net[0].bias.copy_(torch.tensor([0.0, -0.5], dtype=torch.float64))
        net[2].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, second_unit_weight]], dtype=torch.float64))
        net[2].bias.copy_(torch.tensor([0.0, -1.0], dtype=torch.float64))
    return net


def _point(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_fold_point_is_the_talk_closed_form_inside_the_segment():
    # at x_t = (0, 0.2) unit 2 is off: the segment's boundary is x1 + x2 = 1, closest point (0.4, 0.6), still there
    x_f, how = folding.fold_point(_fold_net(3.0), _point(0.0, 0.2), 1, 0)
    assert how == "segment"
    torch.testing.assert_close(x_f, _point(0.4, 0.6))
    assert folding.fold_point(_fold_net(3.0), _point(-1.0, -1.0), 1, 0) is None  # every unit off: no boundary


def test_fold_point_outside_the_segment_moves_to_the_network_s_boundary():
    # from x_t = (0.3, 0.1) the segment's closest boundary point (0.6, 0.4) has x1 > 0.5, where unit 2 is on;
    # with its weight 3 the real margin h1 + 3 h2 - 1 reaches 0 on the way, at (0.54, 0.34)
    net = _fold_net(3.0)
    x_f, how = folding.fold_point(net, _point(0.3, 0.1), 1, 0)
    assert how == "boundary"
    torch.testing.assert_close(x_f, _point(0.54, 0.34), rtol=0, atol=1e-12)
    with torch.no_grad():
        out = net(x_f[None])[0]
    assert abs(float(out[1] - out[0])) < 1e-12
    # with weight -3 the margin falls again past x1 = 0.5 and never reaches 0: the talk's point is kept
    x_f, how = folding.fold_point(_fold_net(-3.0), _point(0.3, 0.1), 1, 0)
    assert how == "extension"
    torch.testing.assert_close(x_f, _point(0.6, 0.4))


def _far_boundary_problem(extra_unit: bool):
    """Three classes on [-1, 1]^2 with logits (0, x1 - 10, x2) (hidden units on everywhere in the box): the
    boundary of class 1 against class 0 is x1 = 10, far outside the data, that of class 2 against class 0
    is x2 = 0. Planted losses: a cluster of class 1 at (0.5, -0.5) (loss 3, its fold point (10, -0.5)),
    a cluster of class 2 at (-0.5, -0.5) (loss 2, fold point (-0.5, 0)), the rest class 0 (loss 0.01,
    away from both).
    ``extra_unit``: one more hidden unit relu(x2) with fan-out 0, already folding on x2 = 0."""
    width = 3 if extra_unit else 2
    net = nn.Sequential(nn.Linear(2, width), ReLU(), nn.Linear(width, 3)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]][:width], dtype=torch.float64))
        net[0].bias.copy_(torch.tensor([10.0, 10.0, 0.0][:width], dtype=torch.float64))
        net[2].weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)[:, :width])
        net[2].bias.copy_(torch.tensor([0.0, -20.0, -10.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    background = torch.rand(600, 2, dtype=torch.float64, generator=g) * 2 - 1
    away = ((background - _point(0.5, -0.5)).norm(dim=1) > 0.3) & ((background - _point(-0.5, -0.5)).norm(dim=1) > 0.3)
    background = background[away][:300]
    far = _point(0.5, -0.5) + 0.05 * torch.randn(30, 2, dtype=torch.float64, generator=g)
    near = _point(-0.5, -0.5) + 0.05 * torch.randn(30, 2, dtype=torch.float64, generator=g)
    X = torch.cat([background, far, near])
    y = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(30, dtype=torch.long), torch.full((30,), 2)])
    losses = torch.cat([torch.full((300,), 0.01), torch.full((30,), 3.0), torch.full((30,), 2.0)]).double()
    with torch.no_grad():
        logits = net(X)
    return net, X, y, logits, losses


def test_folding_takes_the_highest_loss_cluster_whose_fold_point_lies_in_the_data_and_is_not_folded_yet():
    net, X, y, logits, losses = _far_boundary_problem(extra_unit=False)
    # the talk's pick, the highest-loss cluster, folds at x1 = 10: outside the data's box
    top = folding.typical_instance(X, losses, folding.CLUSTERS, torch.Generator().manual_seed(1))
    assert int(y[top.index]) == 1 and folding.fold_point(net, X[top.index], 1, 0)[0][0] == pytest.approx(10.0)
    fold = folding.choose_fold(net, X, y, logits, losses, torch.Generator().manual_seed(1))
    assert fold is not None and fold.rank >= 1 and fold.label == 2 and fold.rival == 0  # the far blob may split
    assert folding.in_domain(fold.x_f, X) and fold.x_f[1] == pytest.approx(0.0, abs=1e-12)
    assert fold.passed
    # with a unit already folding on x2 = 0 that fold point is taken, and every other cluster folds there or at
    # x1 = 10: no cluster passes, and the talk's own pick, the highest-loss cluster, is folded
    net, X, y, logits, losses = _far_boundary_problem(extra_unit=True)
    fold = folding.choose_fold(net, X, y, logits, losses, torch.Generator().manual_seed(1))
    assert not fold.passed and fold.rank == 0 and fold.label == 1 and fold.x_f[0] == pytest.approx(10.0)


def test_folding_refuses_deep_or_regression_networks_in_one_line():
    from tinydeploy.errors import TinyDeployError

    _, deep, _, _, _ = small_problem(widths=(3, 4))
    with pytest.raises(TinyDeployError) as error:
        candidates.check_method("folding", deep, [0, 2], "classification")
    assert str(error.value) == ("--method folding grows shallow ReLU MLPs with one hidden layer, this network is "
                                "Linear - ReLU - Linear - ReLU - Linear: pass --arch mlp --activation relu and one "
                                "initial width, e.g. --init-widths 2")
    _, shallow, _, _, _ = _shallow()
    with pytest.raises(TinyDeployError) as error:
        candidates.check_method("folding", shallow, [0], "regression")
    assert str(error.value) == ("--method folding folds decision boundaries and needs a classification dataset: "
                                "use another --method for regression")
    candidates.check_method("folding", shallow, [0], "classification")
    candidates.check_method("tiny", deep, [0, 2], "regression")


# ----- linear regions ----------------------------------------------------------------------------------
def test_region_count_of_three_lines_in_general_position_is_seven():
    net = nn.Sequential(nn.Linear(2, 3), ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():  # lines x1 = 0, x2 = 0, x1 + x2 = 0.5 all cross inside [-1, 1]^2
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, -0.5], dtype=torch.float64))
    assert count_linear_regions(net, (-1.0, -1.0), (1.0, 1.0)) == 7
    assert count_linear_regions(net, (0.6, 0.6), (1.0, 1.0)) == 1  # a box where every unit is on
    deep = nn.Sequential(nn.Linear(2, 1), ReLU(), nn.Linear(1, 1), ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():  # h2 = relu(relu(x1) - 0.5): a second kink at x1 = 0.5
        deep[0].weight.copy_(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
        deep[0].bias.zero_()
        deep[2].weight.fill_(1.0)
        deep[2].bias.fill_(-0.5)
    assert count_linear_regions(deep, (-1.0, -1.0), (1.0, 1.0)) == 3


def test_pattern_count_on_samples_counts_only_the_regions_that_hold_data():
    net = nn.Sequential(nn.Linear(2, 3), ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():  # the seven regions of the lines x1 = 0, x2 = 0, x1 + x2 = 0.5
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, -0.5], dtype=torch.float64))
    # samples in three of them: (-, -, -), (+, -, -), (+, +, +) twice
    X = torch.tensor([[-0.5, -0.5], [0.2, -0.5], [0.8, 0.8], [0.9, 0.7]], dtype=torch.float64)
    assert count_patterns(net, X) == 3
    assert count_patterns(net, X[:1]) == 1


# ----- Growing by Folding: each step against brute force ------------------------------------------------
def _goal_by_hand(model, X, y, loss_fn):
    """Per-sample losses and V = -dl_i/d outputs, one explicit autograd pass."""
    out = model(X).detach().requires_grad_(True)
    losses = loss_fn(out, y)
    losses.sum().backward()
    return losses.detach(), -out.grad


def test_folding_candidate_is_the_fold_with_its_gain_and_norms_by_brute_force():
    _, model, X, y, loss_fn = _shallow()
    m = moments_for(model, X, y, loss_fn, 0)
    torch.manual_seed(0)
    cand = folding.folding(m, 3, Context(model, X, y, loss_fn), torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the generator draws the cone, not the global RNG: the same fold
    assert torch.equal(folding.folding(m, 3, Context(model, X, y, loss_fn), torch.Generator().manual_seed(3)).alpha,
                       cand.alpha)
    assert (cand.method, cand.in_index, cand.out_index, cand.dW, cand.lambda_null) == ("folding", 0, 2, None, None)
    assert cand.alpha.shape == (1, X.shape[1] + 1) and cand.alpha.dtype == m.S.dtype
    assert torch.equal(cand.omega, torch.zeros(5, 1, dtype=torch.float64))
    assert (cand.signed_amplitude, cand.searches_amplitude) == (False, False)
    assert cand.psi == candidates.bottleneck(m)
    losses, V = _goal_by_hand(model, X, y, loss_fn)
    x_f = torch.tensor(cand.details["x_f"], dtype=torch.float64)
    a = cand.alpha[0, :-1]
    G = sum(V[i] * torch.relu(a @ (X[i] - x_f)) for i in range(X.shape[0])) / X.shape[0]  # gradient of the fan-out
    assert cand.gain == pytest.approx(float(G @ G), rel=1e-9)
    assert cand.lambdas == [pytest.approx(float(G.norm()), rel=1e-9)]
    typical = folding.typical_instance(X, losses, folding.CLUSTERS, torch.Generator().manual_seed(3))
    assert cand.details["cluster_size"] == int(typical.cluster.sum()) > 0
    assert cand.details["cluster_mean_loss"] == pytest.approx(float(losses[typical.cluster].mean()), rel=1e-12)
    assert cand.details["x_t"] == X[typical.index].tolist() and cand.details["fold"] in ("segment", "boundary", "extension")


def _dead(X: torch.Tensor) -> nn.Sequential:
    """A shallow net whose hidden units are off on every sample: its segments have no boundary."""
    net = nn.Sequential(nn.Linear(X.shape[1], 3), ReLU(), nn.Linear(3, 3)).double()
    with torch.no_grad():
        net[0].weight.fill_(0.1)
        net[0].bias.fill_(-100.0)
        net[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    return net


def test_folding_in_a_dead_region_folds_halfway_to_the_samples_outside_the_cluster():
    generator = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(30, 2, dtype=torch.float64, generator=generator) + 5 * c for c in range(3)])
    y = torch.arange(90) // 30  # class 0 is always predicted: classes 1 and 2 are wrong
    model, loss_fn = _dead(X), nn.CrossEntropyLoss(reduction="none")
    m = moments_for(model, X, y, loss_fn, 0)
    cand = folding.folding(m, 1, Context(model, X, y, loss_fn), torch.Generator().manual_seed(3))
    typical = folding.typical_instance(X, loss_fn(model(X), y).detach(), folding.CLUSTERS,
                                       torch.Generator().manual_seed(3))
    x_t = X[typical.index]
    expected = (x_t + X[~typical.cluster].mean(dim=0)) / 2
    assert cand.details["fold"] == "dead-region" and cand.n_neurons == 1
    torch.testing.assert_close(torch.tensor(cand.details["x_f"], dtype=torch.float64), expected, rtol=1e-15, atol=0)


def test_folding_proposes_no_neuron_without_room_without_mistakes_or_without_a_fold():
    _, model, X, y, loss_fn = _shallow()
    m = moments_for(model, X, y, loss_fn, 0)

    def check_empty(cand, m):
        assert (cand.method, cand.in_index, cand.out_index, cand.n_neurons) == ("folding", m.in_index, m.out_index, 0)
        assert cand.alpha.shape == (0, X.shape[1] + 1) and cand.omega.shape == (5, 0) and cand.dW is None
        assert (cand.lambdas, cand.lambda_null, cand.gain, cand.psi) == ([], None, 0.0, candidates.bottleneck(m))
        assert (cand.signed_amplitude, cand.searches_amplitude) == (False, False)

    check_empty(folding.folding(m, 0, Context(model, X, y, loss_fn)), m)
    with torch.no_grad():
        right = model(X).argmax(dim=1)
    check_empty(folding.folding(m, 3, Context(model, X, right, loss_fn)), m)  # every sample predicted right
    # every sample at one point, every unit off: the dead-region fold point is x_t itself
    same = X[:1].repeat(12, 1)
    labels = torch.arange(12) % 3
    dead = _dead(same)
    m_dead = moments_for(dead, same, labels, loss_fn, 0)
    cand = folding.folding(m_dead, 3, Context(dead, same, labels, loss_fn), torch.Generator().manual_seed(0))
    assert cand.n_neurons == 0 and cand.omega.shape == (3, 0)


def test_fan_out_gradient_is_the_squared_norm_of_the_mean_fan_out_gradient():
    generator = torch.Generator().manual_seed(0)
    X, V = torch.randn(7, 3, dtype=torch.float64, generator=generator), torch.randn(7, 2, dtype=torch.float64, generator=generator)
    x_f, A = torch.randn(3, dtype=torch.float64, generator=generator), torch.randn(4, 3, dtype=torch.float64, generator=generator)
    expected = [float(sum(V[i] * max(float(a @ (X[i] - x_f)), 0.0) for i in range(7)).div(7).pow(2).sum()) for a in A]
    assert folding.fan_out_gradient(X, V, x_f, A).tolist() == pytest.approx(expected, rel=1e-12)


def test_cone_directions_rotate_u_by_the_drawn_angles_towards_the_drawn_directions():
    u = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    torch.manual_seed(1)
    D = folding.cone_directions(u, 500, 30.0, torch.Generator().manual_seed(4))
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(D, folding.cone_directions(u, 500, 30.0, torch.Generator().manual_seed(4)))
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(500, 3, dtype=torch.float64, generator=gen)
    angle = torch.rand(500, 1, dtype=torch.float64, generator=gen) * math.radians(30.0)
    r = r - (r @ u)[:, None] * u
    r = r / r.norm(dim=1, keepdim=True)
    assert torch.equal(D[0], u) and D.shape == (501, 3)
    torch.testing.assert_close(D[1:], torch.cos(angle) * u + torch.sin(angle) * r, rtol=0, atol=1e-15)
    degrees = torch.rad2deg(torch.acos((D @ u).clamp(-1, 1)))
    assert float(degrees.max()) <= 30.0 + 1e-9 and float(degrees.max()) > 29.0
    torch.testing.assert_close(D.norm(dim=1), torch.ones(501, dtype=torch.float64))


def test_fold_direction_maximises_the_gain_over_the_cone_and_is_x_t_minus_x_f_in_one_dimension():
    generator = torch.Generator().manual_seed(0)
    X, V = torch.randn(50, 2, dtype=torch.float64, generator=generator), torch.randn(50, 3, dtype=torch.float64, generator=generator)
    x_t, x_f = _point(1.0, 0.0), _point(0.0, 0.0)
    torch.manual_seed(5)
    a, gain = folding.fold_direction(X, V, x_t, x_f, torch.Generator().manual_seed(1))
    cone = folding.cone_directions(_point(1.0, 0.0), folding.DIRECTIONS, folding.CONE_DEGREES, torch.Generator().manual_seed(1))
    G = folding.fan_out_gradient(X, V, x_f, cone)
    assert gain == float(G.max()) > float(G[0]) and torch.equal(a, cone[int(G.argmax())])
    a1, gain1 = folding.fold_direction(X[:, :1], V, _point(-2.0), _point(1.0), torch.Generator().manual_seed(1))
    assert a1.tolist() == [-1.0] and gain1 == float(folding.fan_out_gradient(X[:, :1], V, _point(1.0), a1[None])[0])


def test_rival_class_is_the_prediction_when_wrong_else_the_runner_up():
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0])
    assert [folding.rival_class(logits, label) for label in range(4)] == [1, 2, 1, 1]


def test_typical_instance_can_be_a_lone_sample_and_its_cluster_mean_is_exact():
    X = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [20.0, 0.0]], dtype=torch.float64)
    losses = torch.tensor([0.2, 0.4, 0.6, 1.0, 1.4, 1.1], dtype=torch.float64)
    typical = folding.typical_instance(X, losses, 3, torch.Generator().manual_seed(0))
    # the loss-weighted centroid (5.058, 5) is nearer (5.1, 5) than (5, 5)
    assert (typical.index, typical.mean_loss) == (4, pytest.approx(1.2)) and typical.cluster.tolist() == [
        False, False, False, True, True, False]
    losses[5] = 1.3  # now the lone far sample is the cluster with the highest mean loss
    typical = folding.typical_instance(X, losses, 3, torch.Generator().manual_seed(0))
    assert (typical.index, typical.mean_loss, int(typical.cluster.sum())) == (5, pytest.approx(1.3), 1)


def test_weighted_kmeans_ignores_negative_weights_uses_small_ones_and_stops_seeding_on_duplicates():
    X = torch.tensor([[0.0], [1.0], [10.0], [11.0]], dtype=torch.float64)
    small = torch.tensor([0.01, 0.03, 0.01, 0.01], dtype=torch.float64)  # weights summing to less than 1
    centroids, _ = folding.weighted_kmeans(X, small, 2, torch.Generator().manual_seed(0))
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.75, 10.5])
    negative = torch.tensor([1.0, 1.0, -5.0, 1.0], dtype=torch.float64)  # counts as 0: sample 2 does not pull
    centroids, labels = folding.weighted_kmeans(X, negative, 2, torch.Generator().manual_seed(0))
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.5, 11.0]) and labels[2] == labels[3]
    centroids, labels = folding.weighted_kmeans(X, torch.zeros(4, dtype=torch.float64), 2,
                                                torch.Generator().manual_seed(0))  # no weight: all count alike
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.5, 10.5])
    tiny = X * 1e-4  # squared distances far below 1 still seed every cluster
    centroids, _ = folding.weighted_kmeans(tiny, torch.ones(4, dtype=torch.float64), 2, torch.Generator().manual_seed(0))
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.5e-4, 10.5e-4])
    twice = torch.tensor([[1.0], [1.0], [3.0], [3.0]], dtype=torch.float64)  # 2 distinct points, 4 clusters asked
    centroids, labels = folding.weighted_kmeans(twice, torch.ones(4, dtype=torch.float64), 4,
                                                torch.Generator().manual_seed(0))
    assert sorted(centroids[:, 0].tolist()) == [1.0, 3.0] and labels[0] == labels[1] != labels[2] == labels[3]
    torch.manual_seed(0)
    a = folding.weighted_kmeans(X, small, 2, torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    assert all(torch.equal(p, q) for p, q in zip(a, folding.weighted_kmeans(X, small, 2, torch.Generator().manual_seed(7))))


def test_fold_point_evaluates_a_float32_network_in_its_own_dtype():
    net = _fold_net(3.0).float()
    x_f, how = folding.fold_point(net, _point(0.3, 0.1), 1, 0)
    assert how == "boundary"
    torch.testing.assert_close(x_f, _point(0.54, 0.34), rtol=0, atol=1e-6)


# ----- NORTH-pre: the candidate against brute force -----------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_north_candidate_fan_out_gradient_and_scale_by_brute_force(scale):
    """A layer of 3 on 6 inputs (one neuron asked by the trigger): the new pre-activation has the mean RMS of
    the existing ones, lambda_k = ||E[V_goal b^T] alpha_k||, the gain their sum of
    squares; fan-out 0, no amplitude search, the same neuron for the same seed whatever the global RNG."""
    _, model, X, y, loss_fn = small_problem(widths=(3, 4))
    with torch.no_grad():
        model[0].weight.mul_(scale)
        model[0].bias.mul_(scale)
    m = moments_for(model, X, y, loss_fn, 0)
    torch.manual_seed(0)
    cand = north.north(m, 16, Context(model, X, y, loss_fn), torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    again = north.north(m, 16, Context(model, X, y, loss_fn), torch.Generator().manual_seed(0))
    assert torch.equal(cand.alpha, again.alpha) and cand.n_neurons == 1
    B_prev, _, V = explicit_activities(model, X, y, loss_fn, 0, 2)
    n = X.shape[0]
    existing = (north.fan_in_matrix(model[0]) @ B_prev).pow(2).mean(dim=1).sqrt().mean()
    new = (cand.alpha @ B_prev).pow(2).mean(dim=1).sqrt()
    assert float(new[0]) == pytest.approx(float(existing), rel=1e-9)
    gradient = V @ B_prev.T @ cand.alpha.T / n  # (o, k): E[V_goal b^T] alpha_k
    assert cand.lambdas == pytest.approx(gradient.norm(dim=0).tolist(), rel=1e-9)
    assert cand.gain == pytest.approx(float(gradient.pow(2).sum()), rel=1e-9)
    assert (cand.method, cand.in_index, cand.out_index, cand.dW, cand.lambda_null) == ("north", 0, 2, None, None)
    assert (cand.signed_amplitude, cand.searches_amplitude, cand.psi) == (False, False, candidates.bottleneck(m))
    assert torch.equal(cand.omega, torch.zeros(4, 1, dtype=torch.float64))
    assert cand.details == {"effective_dimension": cand.details["effective_dimension"], "width": 3,
                            "trigger": north.trigger(cand.details["effective_dimension"], 3)}


def test_north_kernel_is_exhausted_at_a_relative_size_of_1e_6_whatever_the_scale():
    """W spans e1, e2 of R^3 (S = I): a draw keeping 1e-4 of its size off that span gives a neuron, one
    keeping 1e-7 does not (below 1e-6), at any scale of the draw; a zero draw gives none."""
    S, W = torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[:2]
    for size in (1e-6, 1.0, 1e6):
        kept = north.kernel_fan_in(S, W, size * _point(1.0, 1.0, 1e-4)[:, None])
        torch.testing.assert_close(kept, size * _point(0.0, 0.0, 1e-4)[None], rtol=1e-9, atol=0)
        assert north.kernel_fan_in(S, W, size * _point(1.0, 1.0, 1e-7)[:, None]).shape == (0, 3)
    assert north.kernel_fan_in(S, W, torch.zeros(3, 1, dtype=torch.float64)).shape == (0, 3)


def test_north_trigger_scales_with_the_initial_effective_dimension():
    """T_act = M (phi_a - gamma phi_a(f_0)): with phi_a(f_0) = 0.5, 5 of 10 directions ask for one neuron."""
    assert north.trigger(5, 10, phi_0=0.5) == 1 and north.trigger(4, 10, phi_0=0.5) == 0
