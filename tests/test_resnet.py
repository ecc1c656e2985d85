"""ResNets (issue 11): growing a residual block's middle channels through its BatchNorm (function
preservation at gamma = 0, the net built at the final widths, the first-order loss change against the
predicted gain), BatchNorm folding for export, and a ResNet grown through the real CLI and exported in
every format with parity."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from conv_fixtures import all_neurons
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.export.quantize import INT8_FILE, quantize_int8
from tinydeploy.growth import candidates, linalg, surgery
from tinydeploy.growth.statistics import gather_moments
from tinydeploy.growth.surgery import add_neurons, grown_output
from tinydeploy.model.build import ResidualBlock, build_model, spec_from_model
from tinydeploy.model.fold import fold_batchnorm
from tinydeploy.model.losses import per_sample_loss
from tinydeploy.model.spec import ArchSpec

LOSS = per_sample_loss("classification")
#: Module index of the block with the identity shortcut and of the strided one with a 1x1 projection.
IDENTITY_BLOCK, PROJECTION_BLOCK = 3, 4


def _randomise_batchnorm(model: nn.Module) -> None:
    """BatchNorms far from their initial state: affine parameters and running statistics drawn at random."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


def _resnet(activation: str = "relu", mids: tuple[int, int] = (2, 3)) -> tuple[ArchSpec, nn.Sequential]:
    """Stem conv + BN, a block with an identity shortcut (3 -> 3 channels), a strided block with a
    projection (3 -> 5), global pooling, linear head; float64, eval mode."""
    spec = ArchSpec.resnet(task="classification", input_shape=(2, 6, 6), stages=(1, 1), stream_widths=[3, 5],
                           mid_widths=list(mids), n_outputs=3, activation=activation)
    torch.manual_seed(0)
    model = build_model(spec).double()
    _randomise_batchnorm(model)
    return spec, model.eval()


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=generator), torch.arange(n) % 3


def _moments(model: nn.Sequential, block: int, X: torch.Tensor, y: torch.Tensor):
    return gather_moments(model, [block], X, y, LOSS, chunk_size=7, generator=torch.Generator().manual_seed(0))[0]


def _candidate(method: str, m) -> candidates.Candidate:
    if method == "tiny":
        return all_neurons(m)
    return candidates.random(m, 3, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("block", [IDENTITY_BLOCK, PROJECTION_BLOCK])
@pytest.mark.parametrize("method", ["tiny", "random"])
@pytest.mark.parametrize("with_data", [False, True])
def test_gamma_zero_leaves_the_resnet_unchanged_in_eval_mode(block: int, method: str, with_data: bool) -> None:
    _, model = _resnet()
    X, y = _data()
    cand = _candidate(method, _moments(model, block, X, y))
    assert cand.n_neurons > 0
    grown = add_neurons(model, cand, 0.0, X if with_data else None).eval()
    assert grown[block].conv1.out_channels == model[block].conv1.out_channels + cand.n_neurons
    assert grown[block].bn1.num_features == grown[block].conv2.in_channels == grown[block].conv1.out_channels
    torch.testing.assert_close(grown(X), model(X), rtol=0, atol=1e-13)


@pytest.mark.parametrize("block", [IDENTITY_BLOCK, PROJECTION_BLOCK])
def test_grown_block_equals_a_resnet_built_at_the_final_widths_with_the_same_weights(block: int) -> None:
    spec, model = _resnet()
    X, y = _data()
    cand = all_neurons(_moments(model, block, X, y))
    grown = add_neurons(model, cand, 0.7, X).eval()
    widths = spec.hidden_widths
    widths[spec.growable_indices.index(block)] += cand.n_neurons
    reference = build_model(spec.with_hidden_widths(widths)).double()
    reference.load_state_dict(grown.state_dict(), strict=True)
    reference.eval()
    assert spec_from_model(grown, spec).hidden_widths == widths
    torch.testing.assert_close(reference(X), grown(X), rtol=0, atol=0)
    assert not torch.allclose(grown(X), model(X))  # the amplitude did change the function
    # the line search's fast forward is the grown model (eval mode, BatchNorm with its statistics)
    torch.testing.assert_close(grown_output(model, cand, X)(0.7), grown(X).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [IDENTITY_BLOCK, PROJECTION_BLOCK])
def test_stacked_line_search_forward_equals_each_grown_model_in_any_grouping(block: int, monkeypatch) -> None:
    """Several amplitudes at once (the block's shortcut repeated for each copy of the batch), in one group
    or in groups of one and two copies (``surgery.STACK_VALUES``): each slice is that amplitude's model."""
    spec, model = _resnet()
    X, y = _data()
    cand = all_neurons(_moments(model, block, X, y))
    gammas = [0.7, 0.0, 2.5]
    expected = torch.stack([add_neurons(model, cand, g, X).eval()(X).detach() for g in gammas])
    output = grown_output(model, cand, X)
    per_copy = max(output.base.numel(), output.a_new.numel())
    for limit in (10**9, per_copy, 2 * per_copy):
        monkeypatch.setattr(surgery, "STACK_VALUES", limit)
        torch.testing.assert_close(grown_output(model, cand, X).stacked(gammas), expected, rtol=1e-12, atol=1e-12)


def test_new_channels_batchnorm_holds_their_statistics_so_train_mode_keeps_the_amplitude() -> None:
    _, model = _resnet()
    X, y = _data()
    cand = all_neurons(_moments(model, PROJECTION_BLOCK, X, y))
    grown = add_neurons(model, cand, 0.7, X)
    block, new = grown[PROJECTION_BLOCK], slice(3, 3 + cand.n_neurons)
    with torch.no_grad():
        pre = block.conv1(grown[:PROJECTION_BLOCK](X))[:, new]
        block.bn1.train()
        torch.testing.assert_close(block.bn1(block.conv1(grown[:PROJECTION_BLOCK](X)))[:, new], pre,
                                   rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.bn1.running_mean[new], pre.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [IDENTITY_BLOCK, PROJECTION_BLOCK])
def test_first_order_loss_change_through_batchnorm_matches_the_gain_predicted_from_the_moments(block: int) -> None:
    """Eq. 10-12 on a small ResNet with linear activations, the block's BatchNorm in between (eval mode):
    the loss decrease per unit gamma as gamma -> 0 is <V_goal, dA>/n as the statistics predict it, the new
    neurons' sum_k alpha_k^T N_v omega_k (unprojected goal) plus the best update's <dW*, N_h> (Delta_dW),
    and the new neurons' share against the projected goal is sum lambda_k^2 (Prop. 3.2)."""
    _, model = _resnet(activation="identity")
    X, y = _data(60)
    m = _moments(model, block, X, y)
    cand = all_neurons(m)
    dW = cand.dW
    N = m.projected_cross_moment(dW)
    neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), N)
    new_share = float(torch.einsum("kd,do,ok->", neurons.alpha, m.N_v, neurons.omega))
    delta_dw = float(torch.trace(dW @ m.N_h))
    projected_share = float(torch.einsum("kd,do,ok->", neurons.alpha, N, neurons.omega))
    assert projected_share == pytest.approx(sum(lam**2 for lam in cand.lambdas), rel=1e-9)
    assert new_share > 1e-7 and delta_dw > 1e-7

    def loss(net: nn.Module) -> float:
        with torch.no_grad():
            return float(LOSS(net.eval()(X), y).mean())

    base = loss(model)
    for gamma in (1e-5, 1e-6):
        measured = (base - loss(add_neurons(model, cand, gamma, X))) / gamma
        assert measured == pytest.approx(new_share + delta_dw, rel=1e-4)
        only_new = (base - loss(add_neurons(model, replace(cand, dW=None), gamma, X))) / gamma
        assert only_new == pytest.approx(new_share, rel=1e-3)


# ----- BatchNorm folding ---------------------------------------------------------------------------------
def _fold_cases() -> dict[str, nn.Module]:
    torch.manual_seed(3)
    _, resnet = _resnet()
    return {
        "conv-bn": nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        "linear-bn": nn.Sequential(nn.Flatten(), nn.Linear(72, 5), nn.BatchNorm1d(5)),
        "identity-block": ResidualBlock(2, 3, 2, stride=1),
        "projection-block": ResidualBlock(2, 3, 4, stride=2),
        "resnet": resnet.float(),
    }


@pytest.mark.parametrize("kind", list(_fold_cases()))
def test_folded_and_unfolded_models_agree_within_1e_5(kind: str) -> None:
    module = _fold_cases()[kind]
    _randomise_batchnorm(module)
    module.eval()
    folded = fold_batchnorm(module)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    assert any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in module.modules())  # the original is kept
    X = 3 * torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(folded(X), module(X), rtol=0, atol=1e-5)


def test_folded_resnet_has_the_spec_s_folded_parameter_count() -> None:
    spec, model = _resnet()
    folded = fold_batchnorm(model)
    assert sum(p.numel() for p in folded.parameters()) == spec.n_params(folded=True) < spec.n_params()
    assert {k: list(v.shape) for k, v in folded.named_parameters()} == spec.weight_shapes(folded=True)


def test_a_batchnorm_that_follows_no_conv_cannot_be_folded() -> None:
    with pytest.raises(ValueError, match=r"^1 BatchNorm module\(s\) do not follow a conv or linear layer"):
        fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


# ----- end to end through the CLI ------------------------------------------------------------------------
#: resnet10 (one block per stage) at a 1/16 stream (4/8/16/32) on the 8x8 digits, one growth step.
SMALL_RESNET = ["--dataset", "digits", "--arch", "resnet10", "--stream-width", "1/16", "--max-growth-epochs", "0.3",
                "--grow-every", "0.3", "--final-epochs", "0.2", "--seed", "1"]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_resnet_grows_through_the_cli_and_exports_folded_with_parity(tmp_path: Path) -> None:
    run = tmp_path / "run"
    grown = cli("grow", "--out", str(run), *SMALL_RESNET)
    assert grown.exit_code == 0, grown.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    arch = json.loads((run / "arch.json").read_text())
    assert metrics["arch"] == "resnet10" and metrics["initial_widths"] == [1, 1, 1, 1]
    assert sum(metrics["final_widths"]) > 4
    assert [layer["kind"] for layer in arch["layers"]] == ["conv", "batchnorm", "activation", *["resblock"] * 4,
                                                             "global_avgpool", "linear"]
    assert [layer["out_channels"] for layer in arch["layers"][3:7]] == [4, 8, 16, 32]
    exported = cli("export", str(run), "--onnx", "--torchscript", "--pt2")
    assert exported.exit_code == 0, exported.stderr + exported.stdout
    artifacts = run / "artifacts"
    parity = json.loads((artifacts / "parity.json").read_text())
    assert parity["passed"] and set(parity["formats"]) == {"safetensors", "onnx", "torchscript", "pt2"}
    for result in parity["formats"].values():
        assert result["passed"] and result["checks"]["test"]["argmax_agreement"] == 1.0
    graph = onnx.load(str(artifacts / "model.onnx")).graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    report = json.loads((artifacts / "width_report.json").read_text())
    assert report["checked_against"] == "model.onnx"
    assert [layer["kind"] for layer in report["layers"]] == ["conv2d", *["resblock"] * 4, "output"]
    assert report["latency"]["source"].startswith("onnxruntime profiler")
    for layer in report["layers"][:-1]:  # the output layer's Gemm on 32 features may round to 0 us
        assert set(layer["latency_us"]) == {"batch_1", "batch_32"} and layer["latency_us"]["batch_32"] > 0
    assert "Latency per layer" in (artifacts / "width_report.md").read_text()
    assert report["totals"]["final"]["deployed_params"] == sum(
        p for layer in report["layers"] for p in [sum(_numel(s) for s in layer["deployed_tensors"].values())])
    verified = cli("verify", str(artifacts))
    assert verified.exit_code == 0, verified.stderr
    _check_static_int8(artifacts)


def _check_static_int8(artifacts: Path) -> None:
    """int8 of a CNN is static QDQ with signed int8 per-channel conv weights, calibrated on the training
    split; the gate's tolerance is opened here (this tiny net's accuracy drop is measured, not gated)."""
    report = quantize_int8(artifacts, tolerance_pp=100.0, latency_iters=5).report
    assert report["settings"]["method"] == "static" and report["settings"]["calibration"]["split"] == "train"
    assert set(report["latency_p50_ms"]) == {"threads", "batch_1", "batch_32"}
    graph = onnx.load(str(artifacts / INT8_FILE)).graph
    int8_weights = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    producers = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 12  # stem, 2 per block, 3 projections; no BatchNormalization left to fuse
    for conv in convs:
        weight = producers[conv.input[1]]
        assert weight.op_type == "DequantizeLinear" and weight.input[0] in int8_weights
        assert len(int8_weights[weight.input[0]].dims) == 4 and producers[conv.input[0]].op_type == "DequantizeLinear"
        scale = next(t for t in graph.initializer if t.name == weight.input[1])
        assert list(scale.dims) == [int8_weights[weight.input[0]].dims[0]]  # one scale per output channel


def _numel(shape: list[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resnet_grows_on_cuda_with_autocast_and_gpu_resident_data(tmp_path: Path) -> None:
    from tinydeploy.training.config import GrowConfig
    from tinydeploy.training.job import prepare_grow

    cfg = GrowConfig(dataset="digits", arch="resnet10", stream_width=1 / 16, max_growth_epochs=0.3, grow_every=0.3,
                     final_epochs=0.2, seed=1, device="cuda")
    job = prepare_grow(cfg, tmp_path / "run")
    trainer = job.trainer
    assert trainer.X.device.type == "cuda" and trainer.rng.device.type == "cuda"
    assert trainer.amp in (torch.bfloat16, torch.float16) and trainer.channels_last
    result = job.run()
    assert sum(result.metrics["final_widths"]) > 4 and result.metrics["metrics"]["test"]["accuracy"] > 0.2


def test_profiled_layer_latency_covers_every_conv_of_the_folded_resnet(tmp_path: Path) -> None:
    """onnxruntime's profiler attributes every kernel of a BatchNorm-folded ResNet to a module of the spec."""
    import numpy as np

    from tinydeploy.export.onnx_format import export_onnx_model
    from tinydeploy.export.profile import layer_latency, node_modules

    spec, model = _resnet()
    frozen = fold_batchnorm(model.float())
    proto = export_onnx_model(frozen, spec, 18, {})
    data = proto.SerializeToString()
    modules = node_modules(data)
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert len(convs) == 6 and {modules[node.name] for node in convs} == {"0", "3", "4"}
    latency = layer_latency(data, np.random.default_rng(0).standard_normal((4, 2, 6, 6)), runs=3)
    assert {"0", "3", "4"} <= set(latency) or {"2", "3", "4"} <= set(latency)  # stem conv fused with its ReLU
    assert all(value > 0 for value in latency.values())
