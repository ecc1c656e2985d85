"""The network a grow run starts from: its spec (an MLP, or a CNN of conv blocks) and live initial weights."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from tinydeploy.data import Dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.pairs import pair_at
from tinydeploy.model.build import ACTIVATION_MODULES
from tinydeploy.model.spec import RESNET_STAGES, RESNET_STREAM, ArchSpec, ConvBlock
from tinydeploy.training.config import GrowConfig

#: ResNets start every block's middle channels at this fraction of their full width (Table 3: 1/64).
DEFAULT_WIDTH_FACTOR = 1 / 64


def conv_blocks(cfg: GrowConfig, input_shape: tuple[int, ...]) -> list[ConvBlock]:
    """The CNN's conv blocks: ``--conv-kernels`` (default 3 for images, 5 for signals, two blocks),
    ``--conv-strides`` (default 1) and ``--conv-pools`` (default: average pooling by 2 after a stride-1
    block while the grid stays at least 4 wide, so 28 -> 14 -> 7, 8 -> 4 -> 4, 40 -> 20 -> 10; strided
    blocks downsample on their own)."""
    dims = len(input_shape) - 1
    depth = len(next((v for v in (cfg.conv_kernels, cfg.conv_strides, cfg.conv_pools) if v), [0, 0]))
    kernels = cfg.conv_kernels or [3 if dims == 2 else 5] * depth
    strides = cfg.conv_strides or [1] * len(kernels)
    if not len(kernels) == len(strides) == len(cfg.conv_pools or kernels):
        raise TinyDeployError(f"--conv-kernels {kernels}, --conv-strides {strides} and --conv-pools "
                              f"{cfg.conv_pools} must list one value per conv block")
    pools, size = [], min(input_shape[1:])
    for i, (kernel, stride) in enumerate(zip(kernels, strides)):
        size = (size - 1) // stride + 1
        pool = cfg.conv_pools[i] if cfg.conv_pools else (2 if stride == 1 and size // 2 >= 4 else 0)
        size = size // pool if pool > 1 else size
        pools.append(pool)
    return [ConvBlock(kernel=k, stride=s, pool=p) for k, s, p in zip(kernels, strides, pools)]


def initial_spec(cfg: GrowConfig, data: Dataset, prep: dict[str, Any]) -> ArchSpec:
    """The spec at the initial widths (``cfg`` resolved to an architecture): an MLP, or a CNN of
    ``conv_blocks`` + ``hidden_layers`` linear layers; image data records its format in ``extra``, named
    features their names (``feature_names``)."""
    common = {"task": data.task, "input_shape": data.input_shape, "n_outputs": data.n_outputs,
              "activation": cfg.activation, "classes": data.classes, "preprocessing": prep, "dataset": data.name}
    if cfg.arch == "mlp":
        spec = ArchSpec.mlp(hidden_widths=list(cfg.init_widths or [1, 1]), **common)
    elif cfg.arch in RESNET_STAGES:
        spec = resnet_spec(cfg, common)
    else:
        blocks = conv_blocks(cfg, data.input_shape)
        hidden = 1 if cfg.hidden_layers is None else cfg.hidden_layers
        widths = list(cfg.init_widths or [1] * (len(blocks) + hidden))
        if len(widths) != len(blocks) + hidden:
            raise TinyDeployError(f"--init-widths lists {len(widths)} widths but the CNN has {len(blocks)} conv "
                                  f"blocks and {hidden} hidden linear layer(s): give {len(blocks) + hidden}")
        spec = ArchSpec.cnn(blocks=blocks, conv_widths=widths[: len(blocks)], hidden_widths=widths[len(blocks):],
                            transition=cfg.transition, **common)
    spec = replace(spec, feature_names=data.feature_names) if data.feature_names else spec
    return replace(spec, extra={"image": data.image}) if data.image else spec


def resnet_spec(cfg: GrowConfig, common: dict[str, Any]) -> ArchSpec:
    """A ResNet preset (``RESNET_STAGES``) with the residual stream at ``--stream-width`` times 64/128/256/512
    and every block's middle channels at ``--width-factor`` (default 1/64) of their full width, the
    stream width of their stage (at least 1), or ``--init-widths``."""
    stages = RESNET_STAGES[cfg.arch]
    streams = [max(1, round(w * cfg.stream_width)) for w in RESNET_STREAM]
    full = [w for blocks, w in zip(stages, streams) for _ in range(blocks)]
    factor = cfg.width_factor if cfg.width_factor is not None else DEFAULT_WIDTH_FACTOR
    mids = list(cfg.init_widths) if cfg.init_widths else [max(1, round(factor * w)) for w in full]
    if len(mids) != len(full):
        raise TinyDeployError(f"--init-widths lists {len(mids)} widths but {cfg.arch} has {len(full)} residual blocks: "
                              f"give {len(full)}")
    if any(m > w for m, w in zip(mids, full)):
        raise TinyDeployError(f"--init-widths {mids} exceed the blocks' full widths {full}: give at most those")
    if len(common["input_shape"]) != 3:
        raise TinyDeployError(f"--arch {cfg.arch} takes images (C, H, W), but '{common['dataset']}' has inputs of shape "
                              f"{list(common['input_shape'])}: use --arch cnn or mlp")
    return ArchSpec.resnet(stages=stages, stream_widths=streams, mid_widths=mids, **common)


def full_widths(spec: ArchSpec) -> dict[int, int]:
    """Growable module index -> largest width: a residual block's middle channels reach its stream width."""
    return {i: spec.layers[i]["out_channels"] for i in spec.growable_indices if spec.layers[i]["kind"] == "resblock"}


#: Training samples on which a fresh network's units must not all be zero, and re-draws allowed.
LIVENESS_SAMPLES = 1024
LIVENESS_ATTEMPTS = 20


@torch.no_grad()
def live_initialisation(model: torch.nn.Sequential, growable: list[int], X: torch.Tensor) -> torch.nn.Sequential:
    """Re-draw the initial weights of a growable layer's producer while one of its neurons/channels is 0
    after its activation on each of the first ``LIVENESS_SAMPLES`` samples of ``X`` (a dead ReLU). At
    width 1 a dead unit passes no gradient, so every layer before it has V_goal = 0 and nothing can ever
    grow there. A network whose units are all alive is returned unchanged (no random numbers drawn)."""
    pairs = [pair_at(model, i) for i in growable]
    watched = {}
    for pair in pairs:
        modules = [m for m in pair.between(model) if isinstance(m, tuple(ACTIVATION_MODULES.values()))]
        watched[pair.in_index] = modules[0] if modules else pair.producer(model)
    for _ in range(LIVENESS_ATTEMPTS):
        outputs: dict[int, torch.Tensor] = {}
        handles = [module.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
                   for i, module in watched.items()]
        try:
            model.eval()(X[:LIVENESS_SAMPLES])
        finally:
            for handle in handles:
                handle.remove()
        dead = [i for i in growable if bool((outputs[i].transpose(0, 1).flatten(1) == 0).all(dim=1).any())]
        if not dead:
            break
        pair_at(model, dead[0]).producer(model).reset_parameters()
    return model.train()
