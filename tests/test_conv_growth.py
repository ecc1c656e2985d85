"""TINY for convolutions on real small networks of every pair kind: Lemma C.3 / Eq. 71, Prop. 3.1 on
unfolded inputs, function preservation at gamma = 0, surgery against a net built at the final widths,
the fast line-search forward, BatchNorm, Adam state and the MAC budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conv_fixtures import KINDS, Case, all_neurons, brute_force, build, consumer_index, explicit, one_thread  # noqa: F401
from torch import nn

from tinydeploy.growth import candidates, linalg
from tinydeploy.growth.costs import count_macs, output_shapes
from tinydeploy.growth.gradmax import gradmax
from tinydeploy.growth.policy import GrowthSettings, neuron_budget
from tinydeploy.growth.statistics import gather_moments
from tinydeploy.growth.surgery import add_neurons, carry_optimizer_state, grown_output, widen_between
from tinydeploy.model.build import GlobalAvgPool, build_model, spec_from_model
from tinydeploy.model.losses import per_sample_loss
from tinydeploy.model.spec import ArchSpec, ConvBlock

pytestmark = pytest.mark.usefixtures("one_thread")
LOSS = per_sample_loss("classification")

#: Every pair kind in 1-d and 2-d, plus 1x1 consumers (the linear case of Lemma C.3) and strided ones.
CASES = [Case(dims=d, kind=k, size=(11 if d == 1 else 7) * (2 if "pool" in k else 1)) for d in (1, 2) for k in KINDS]
CASES += [Case(dims=d, next_kernel=1, next_padding=0, size=11 if d == 1 else 7) for d in (1, 2)]
CASES += [Case(dims=2, kernel=5, stride=2, padding=0, next_kernel=3, next_stride=2, next_padding=1, size=13)]


def _moments(model, X, y):
    return gather_moments(model, [0], X, y, LOSS, chunk_size=7, generator=torch.Generator().manual_seed(0))[0]


def _gradmax_all(m) -> candidates.Candidate:
    """GradMax's candidate without its significance cut: fan-in 0, fan-out from the top eigenvectors."""
    cand = gradmax(m, 3)
    omega, _ = linalg.gradmax_fan_out(m.N_v, 3)
    return replace(cand, alpha=torch.zeros(3, m.S.shape[0], dtype=m.S.dtype),
                   omega=candidates.fan_out(omega * 1e-3, m), lambdas=[0.0] * 3)


def _linear_map(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s linear map with other weights, by torch's own convolution (no unfolding)."""
    if isinstance(module, nn.Linear):
        return F.linear(x.flatten(1), weight.reshape(weight.shape[0], -1), bias)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x, weight, bias, stride=module.stride, padding=module.padding)


def _linearised_effect(model: nn.Sequential, x: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """V(A, Omega): the new channels' pre-activations (no activation: the linearised effect) passed through
    the pools / flatten / global pooling between producer and consumer, then the consumer's map with Omega."""
    producer, out = model[0], consumer_index(model)
    weight = alpha[:, :-1].reshape(alpha.shape[0], *producer.weight.shape[1:])
    h = _linear_map(producer, x, weight, alpha[:, -1])
    for module in model[1:out]:
        if not isinstance(module, (nn.ReLU, nn.Tanh, nn.BatchNorm2d)):  # a new channel's BatchNorm: the identity
            h = module(h)
    return _linear_map(model[out], h, omega, None)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_eq_71_bottleneck_after_k_kernels_is_at_most_psi_minus_sum_of_squared_lambdas(case: Case) -> None:
    model, X, y = build(case)
    m = _moments(model, X, y)
    cand = all_neurons(m)
    x_in, b_h, V = explicit(model, X, y, consumer_index(model))
    consumer = model[consumer_index(model)]
    V_proj = V - _linear_map(consumer, b_h, cand.dW[:, :-1].reshape(consumer.weight.shape), cand.dW[:, -1])
    n = X.shape[0]
    psi = float(V_proj.pow(2).sum()) / n
    assert psi == pytest.approx(cand.psi, rel=1e-8)
    lambdas = torch.tensor(cand.lambdas, dtype=torch.float64)
    assert len(lambdas) >= 2 and lambdas[0] > 0
    for k in range(1, len(lambdas) + 1):
        effect = _linearised_effect(model, x_in, cand.alpha[:k], cand.omega[:, :k])
        after = float((V_proj - effect).pow(2).sum()) / n
        bound = psi - float(lambdas[:k].pow(2).sum())
        assert after <= bound + 1e-9 * psi, (k, after, bound)
        if m.taps == 1:  # a 1x1 consumer (or a vector): the linear case, equality
            assert after == pytest.approx(bound, abs=1e-9 * psi)
    if m.taps > 1:
        assert after < psi  # the kernels do lower the bottleneck


@pytest.mark.parametrize("case", [c for c in CASES if c.kind.endswith("conv")], ids=str)
def test_prop_3_1_projected_goal_is_orthogonal_to_the_unfolded_consumer_inputs(case: Case) -> None:
    model, X, y = build(case)
    m = _moments(model, X, y)
    reference = brute_force(model, X, y)
    dW = linalg.best_update(m.S_h, m.N_h)
    V, Bh = reference["V"], reference["Bh"]  # per output position: (n, o) and (n, C_h * taps + 1)
    residual = [v - b @ dW.T for v, b in zip(V, Bh)]
    assert sum(float(r.pow(2).sum()) for r in residual) > 1e-4 * sum(float(v.pow(2).sum()) for v in V)
    products = sum(r.T @ b for r, b in zip(residual, Bh))
    scale = (sum(float(v.pow(2).sum()) for v in V) * sum(float(b.pow(2).sum()) for b in Bh)) ** 0.5
    assert float(products.abs().max()) < 1e-10 * scale


@pytest.mark.parametrize("method", [m for m in candidates.METHODS if m != "folding"])  # folding: shallow MLPs
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gamma_zero_leaves_the_function_unchanged_for_every_pair_kind(case: Case, method: str) -> None:
    model, X, y = build(case)
    m = _moments(model, X, y)
    made = {"tiny": all_neurons, "gradmax": _gradmax_all,
            "random": lambda m: candidates.random(m, 3, torch.Generator().manual_seed(1)),
            "north": lambda m: candidates.propose("north", m, 3, torch.Generator().manual_seed(1),
                                                  context=candidates.Context(model, X, y, LOSS))}
    cand = made[method](m)
    assert cand.n_neurons > 0
    grown = add_neurons(model, cand, 0.0)
    assert grown[0].weight.shape[0] == model[0].weight.shape[0] + cand.n_neurons
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=1e-13)
    if method in ("gradmax", "north"):  # one side 0: unchanged at insertion, at the amplitude it is added with
        torch.testing.assert_close(add_neurons(model, cand, 1.0)(X), model(X), rtol=0, atol=1e-13)


@pytest.mark.parametrize("gamma", [0.4, -1.3])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_line_search_forward_equals_the_grown_model(case: Case, gamma: float) -> None:
    """grown_output computes the new channels on their own (through the same pools / flatten) and the
    consumer's map on them alone, so it checks that surgery puts the new inputs in the right positions."""
    model, X, y = build(case)
    cand = all_neurons(_moments(model, X, y))
    expected = add_neurons(model, cand, gamma)(X).detach()
    torch.testing.assert_close(grown_output(model, cand, X)(gamma), expected, rtol=1e-12, atol=1e-12)


def test_new_columns_after_flatten_hold_each_new_channel_s_h_w_block() -> None:
    model, X, y = build(Case(dims=2, kind="flatten-linear", size=7))
    cand = all_neurons(_moments(model, X, y))
    gamma, out = 0.25, consumer_index(model)
    grown = add_neurons(model, cand, gamma)
    old, new = model[out].weight.detach(), grown[out].weight.detach()
    k, positions = cand.n_neurons, 49
    assert new.shape == (old.shape[0], old.shape[1] + k * positions)
    torch.testing.assert_close(new[:, : old.shape[1]], old + gamma * cand.dW[:, :-1])
    for channel in range(k):  # channel c of the grown producer -> columns [c * H * W, (c + 1) * H * W)
        block = new[:, old.shape[1] + channel * positions : old.shape[1] + (channel + 1) * positions]
        torch.testing.assert_close(block, gamma**0.5 * cand.omega[:, channel])


@pytest.mark.parametrize(("input_shape", "transition", "blocks"), [
    ((2, 12, 12), "flatten", [ConvBlock(pool=2), ConvBlock(kernel=5, stride=2, padding=1)]),
    ((1, 20), "global_avgpool", [ConvBlock(kernel=5, pool=2), ConvBlock(kernel=3, stride=2)]),
])
def test_grown_cnn_equals_a_net_built_at_the_final_widths_with_the_same_weights(input_shape, transition,
                                                                               blocks) -> None:
    torch.manual_seed(0)
    spec = ArchSpec.cnn(task="classification", input_shape=input_shape, blocks=blocks, conv_widths=[2, 3],
                        hidden_widths=[4], n_outputs=3, transition=transition)
    model = build_model(spec).double()
    X = torch.randn(40, *input_shape, dtype=torch.float64)
    y = (X.flatten(1)[:, :5].sum(1) > 0).long() + (X.flatten(1)[:, 5] > 1).long()
    grown = model
    for layer in spec.growable_indices:
        m = gather_moments(grown, [layer], X, y, LOSS, generator=torch.Generator().manual_seed(0))[0]
        cand = all_neurons(m)
        grown = add_neurons(grown, replace(cand, alpha=cand.alpha[:2], omega=cand.omega[:, :2],
                                           lambdas=cand.lambdas[:2]), 0.6)
    final = spec_from_model(grown, spec)
    assert final.hidden_widths == [4, 5, 6]
    reference = build_model(final).double()
    reference.load_state_dict(grown.state_dict(), strict=True)
    assert final.n_params() == sum(p.numel() for p in grown.parameters())
    torch.testing.assert_close(reference(X), grown(X), rtol=0, atol=0)


@pytest.mark.parametrize("next_kernel", [1, 3])
def test_batchnorm_between_producer_and_consumer_gains_identity_channels(next_kernel: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, eps=0.5), nn.ReLU(),
                          nn.Conv2d(3, 4, next_kernel), nn.Tanh(), GlobalAvgPool(), nn.Linear(4, 3)).double()
    X = torch.randn(30, 2, 6, 6, dtype=torch.float64)
    y = torch.arange(30) % 3
    model.train()
    for _ in range(3):  # non-trivial running statistics and affine parameters
        model(X)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-0.5, 0.5)
    model.eval()
    cand = all_neurons(_moments(model, X, y))
    for sample in (None, X):
        grown = add_neurons(model, cand, 0.0, sample).eval()
        assert grown[1].num_features == 3 + cand.n_neurons
        torch.testing.assert_close(grown(X), model(X), rtol=0, atol=1e-13)
        torch.testing.assert_close(grown_output(model, cand, X)(0.8),
                                   add_neurons(model, cand, 0.8, sample).eval()(X).detach(), rtol=1e-12, atol=1e-12)
    # the new channels' BatchNorm holds their own statistics at the chosen amplitude: identity in eval
    # mode, and (nearly) the identity in train mode on a batch like X, instead of re-normalising them
    grown = add_neurons(model, cand, 0.8, X)
    new = slice(3, 3 + cand.n_neurons)
    a_new = F.conv2d(X, 0.8**0.5 * cand.alpha[:, :-1].reshape(-1, 2, 3, 3), 0.8**0.5 * cand.alpha[:, -1], padding=1)
    torch.testing.assert_close(grown[1].running_mean[new], a_new.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grown[1].running_var[new], a_new.var(dim=(0, 2, 3), unbiased=False), rtol=1e-12, atol=0)
    torch.testing.assert_close(grown[1].weight[new], (a_new.var(dim=(0, 2, 3), unbiased=False) + 0.5).sqrt())
    torch.testing.assert_close(grown[1].train()(grown[0](X))[:, new], a_new, rtol=1e-12, atol=1e-12)
    # Eq. 71 through the new channels' BatchNorm (eval mode), equality for the 1x1 consumer
    x_in, b_h, V = explicit(model, X, y, 3)
    V_proj = V - F.conv2d(b_h, cand.dW[:, :-1].reshape(model[3].weight.shape), cand.dW[:, -1])
    psi = float(V_proj.pow(2).sum()) / X.shape[0]
    after = float((V_proj - _linearised_effect(model, x_in, cand.alpha, cand.omega)).pow(2).sum()) / X.shape[0]
    bound = psi - sum(v * v for v in cand.lambdas)
    assert after <= bound + 1e-9 * psi
    if next_kernel == 1:
        assert after == pytest.approx(bound, abs=1e-9 * psi)


def test_adam_state_of_old_conv_parameters_survives_growth() -> None:
    model, X, y = build(Case(dims=2, kind="pool-flatten-linear", size=14))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        LOSS(model(X), y).mean().backward()
        optimizer.step()
    grown = add_neurons(model, all_neurons(_moments(model, X, y)), 0.5)
    carried = carry_optimizer_state(optimizer, model, grown)
    old = dict(model.named_parameters())
    for name, param in grown.named_parameters():
        state, previous = carried.state[param], optimizer.state[old[name]]
        corner = tuple(slice(0, s) for s in old[name].shape)
        assert torch.equal(state["exp_avg_sq"][corner], previous["exp_avg_sq"])
        assert int(torch.count_nonzero(state["exp_avg"])) == int(torch.count_nonzero(previous["exp_avg"]))
    carried.zero_grad()
    LOSS(grown(X), y).mean().backward()
    carried.step()


def test_mac_budget_counts_each_channel_s_positions() -> None:
    model, X, _ = build(Case(dims=2, kind="pool-conv", size=14))  # producer 3 ch at 14x14 -> pool 7x7 -> conv 3x3
    shapes = output_shapes(model, X)
    macs = count_macs(model, shapes)
    producer, consumer = model[0], model[consumer_index(model)]
    per_channel = producer.weight[0].numel() * 14 * 14 + consumer.weight[:, 0].numel() * 7 * 7
    assert macs == producer.weight.numel() * 196 + consumer.weight.numel() * 49 + model[-1].weight.numel()
    settings = GrowthSettings(neurons_per_step=16, max_macs=macs + 3 * per_channel + per_channel // 2)
    assert neuron_budget(model, 0, consumer_index(model), settings, X[:1]) == 3
    with pytest.raises(ValueError, match="sample"):
        neuron_budget(model, 0, consumer_index(model), settings)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_balance_equalises_relative_sizes_and_keeps_each_neuron_s_product(case: Case) -> None:
    """candidates.balance: (c_k alpha_k, omega_k / c_k) with RMS(c alpha_k) / producer_rms = RMS(omega_k / c_k) /
    consumer_rms; omega_k alpha_k^T unchanged; a neuron with a zero fan-in is left as it is."""
    model, X, y = build(case)
    cand = all_neurons(_moments(model, X, y))
    k = cand.n_neurons
    alpha = cand.alpha.clone()
    alpha[-1] = 0.0  # a GradMax-like neuron
    cand = replace(cand, alpha=alpha)
    balanced = candidates.balance(cand, 0.5, 3.0)
    fan_out = balanced.omega.transpose(0, 1).reshape(k, -1)
    a_rms, o_rms = balanced.alpha.pow(2).mean(1).sqrt(), fan_out.pow(2).mean(1).sqrt()
    torch.testing.assert_close(a_rms[:-1] / 0.5, o_rms[:-1] / 3.0, rtol=1e-10, atol=0)
    before = torch.einsum("ko,kd->kod", cand.omega.transpose(0, 1).reshape(k, -1), cand.alpha)
    after = torch.einsum("ko,kd->kod", fan_out, balanced.alpha)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-300)
    assert torch.equal(balanced.omega[:, -1], cand.omega[:, -1]) and k >= 2


@pytest.mark.parametrize("affine", [True, False])
def test_a_widened_batchnorm_keeps_every_option_of_the_old_one(affine: bool) -> None:
    """eps, momentum, affine, running statistics and dtype carry over; the old channels keep their state,
    the new ones get the given mean and variance with weight sqrt(v + eps) and bias m (without an affine
    map: mean 0 and variance 1 - eps, the only identity)."""
    old = nn.BatchNorm2d(3, eps=1e-3, momentum=0.3, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        old.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        old.running_var.copy_(torch.tensor([4.0, 5.0, 6.0]))
        old.num_batches_tracked.fill_(17)
    grown = widen_between(old.eval(), 2, torch.tensor([7.0, 8.0]), torch.tensor([9.0, 10.0]))
    assert type(grown) is nn.BatchNorm2d and grown.num_features == 5 and not grown.training
    assert int(grown.num_batches_tracked) == 17 and widen_between(old.train(), 1).training
    assert (grown.eps, grown.momentum, grown.affine, grown.track_running_stats) == (1e-3, 0.3, affine, True)
    assert grown.running_mean.dtype == torch.float64
    if not affine:
        assert grown.running_mean.tolist() == [1, 2, 3, 0, 0] and grown.running_var.tolist() == [4, 5, 6, 0.999, 0.999]
        return
    assert grown.running_mean.tolist() == [1, 2, 3, 7, 8] and grown.running_var.tolist() == [4, 5, 6, 9, 10]
    torch.testing.assert_close(grown.weight[3:], torch.tensor([9.001, 10.001], dtype=torch.float64).sqrt())
    assert grown.bias[3:].tolist() == [7, 8]
    default = widen_between(old, 2)  # no data: mean 0, variance 1, weight sqrt(1 + eps), bias 0
    assert default.running_mean.tolist() == [1, 2, 3, 0, 0] and default.running_var.tolist() == [4, 5, 6, 1, 1]
    assert default.bias[3:].tolist() == [0, 0] and default.weight[3:].tolist() == [1.001**0.5] * 2


def test_growth_through_a_batchnorm_without_running_statistics_is_refused_in_one_line() -> None:
    norm = nn.BatchNorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError) as error:
        widen_between(norm, 2)
    assert str(error.value) == f"{norm}: growth through a BatchNorm needs running statistics (track_running_stats)"
    relu = nn.ReLU()
    assert widen_between(relu, 2) is relu


def test_a_single_output_consumer_gains_one_column_per_new_neuron() -> None:
    """A regression head with one output: the consumer's new columns are the fan-out of each new neuron."""
    from tinydeploy.growth.surgery import widen_consumer

    head = nn.Linear(3, 1).double()
    omega, dW = torch.tensor([[0.5, -2.0]], dtype=torch.float64), torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    grown = widen_consumer(head, omega, dW)
    assert grown.weight.shape == (1, 5)
    torch.testing.assert_close(grown.weight, torch.cat([head.weight + dW[:, :-1], omega], 1), rtol=0, atol=0)
    torch.testing.assert_close(grown.bias, head.bias + dW[:, -1], rtol=0, atol=0)


def test_has_batchnorm_finds_a_batchnorm_at_any_depth() -> None:
    from tinydeploy.growth.batchnorm import has_batchnorm

    assert not has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2))))
