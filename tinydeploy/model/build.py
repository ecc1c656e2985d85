"""Build a plain PyTorch model from an architecture spec, and read the widths back from a model."""

from __future__ import annotations

import torch
from torch import nn

from tinydeploy.errors import SpecError
from tinydeploy.model.pooling import AvgPool1d, AvgPool2d
from tinydeploy.model.spec import BATCHNORM_EPS, BATCHNORM_MOMENTUM, ArchSpec, needs_projection


class _RightDerivativeReLU(torch.autograd.Function):
    """relu(x) with the gradient g * (x >= 0): one relu and one product instead of ``torch.where``'s
    comparison, select and select-backward (3x faster on a 3,200 x 13 x 20 batch of the statistics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x >= 0)


#: Below this many values ``torch.where`` is as fast (a Python autograd Function costs ~10 us a call).
FUNCTION_MIN_VALUES = 1 << 14


class ReLU(nn.ReLU):
    """max(x, 0) whose derivative at 0 is 1 (the right derivative) instead of torch's 0.

    A unit whose pre-activation is exactly 0 on every sample (a neuron inserted with fan-in 0, as
    GradMax does) then receives the gradient sigma'(0) * omega^T V on its fan-in and trains, as in the
    GradMax reference code, whose ReLU has grad(f(0)) = 1. Values are those of ``nn.ReLU``; without
    autograd (inference, tracing for export) and in TorchScript it is ``torch.relu``, so exported graphs
    hold a plain Relu. With autograd: ``torch.where`` on small batches and under torch.export /
    torch.compile (which trace it), the autograd Function ``_RightDerivativeReLU`` on large ones.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu(x)
        return self._right_derivative(x)

    @torch.jit.unused
    def _right_derivative(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and x.numel() >= FUNCTION_MIN_VALUES:
            return _RightDerivativeReLU.apply(x)
        return torch.where(x >= 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


#: The module of each activation name in ``tinydeploy.model.spec.ACTIVATIONS`` (all have sigma(0) = 0;
#: every derivative at 0 is non-zero, ReLU's by the convention of ``ReLU``).
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": ReLU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}
#: Modules that act on each value alone: the activations above, and torch's own ReLU (in models built elsewhere).
ELEMENTWISE_TYPES: tuple[type[nn.Module], ...] = (*ACTIVATION_MODULES.values(), nn.ReLU)
CONV_MODULES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
POOL_MODULES: dict[int, type[nn.Module]] = {1: AvgPool1d, 2: AvgPool2d}
NORM_MODULES: dict[int, type[nn.Module]] = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def batchnorm(channels: int, dims: int = 2) -> nn.Module:
    """The spec's BatchNorm over ``channels`` channels of (C,), (C, L) (``dims`` 0, 1) or (C, H, W) inputs."""
    return NORM_MODULES[dims](channels, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)


class ResidualBlock(nn.Module):
    """A BasicBlock: act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)), 3x3 convolutions with padding 1,
    ``conv1`` with the block's stride; the shortcut is the identity or a 1x1 conv + BatchNorm.

    Its middle channels (``conv1``'s outputs, read by ``conv2``) are what growth widens; ``tail`` is the
    part after ``conv2``, so that a growth step can replace conv2's output and finish the block.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride=stride, padding=1)
        self.bn1 = batchnorm(mid_channels)
        self.act1 = ACTIVATION_MODULES[activation]()
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, stride=1, padding=1)
        self.bn2 = batchnorm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride), batchnorm(out_channels))
        self.act2 = ACTIVATION_MODULES[activation]()

    def tail(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output from conv2's output ``pre`` and the block's input ``x``."""
        return self.act2(self.bn2(pre) + self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv2(self.act1(self.bn1(self.conv1(x)))), x)


class GlobalAvgPool(nn.Module):
    """(batch, C, *spatial) -> (batch, C): the mean of each channel over every position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


def build_layer(spec: ArchSpec, index: int, shapes: list[tuple[int, ...]] | None = None) -> nn.Module:
    """The module of layer ``index`` (fresh PyTorch default initialisation)."""
    shapes = shapes or spec.shapes()
    layer = spec.layers[index]
    kind = layer["kind"]
    if kind == "flatten":
        return nn.Flatten()
    if kind == "linear":
        return nn.Linear(spec.in_features(index), layer["out_features"])
    if kind == "conv":
        return CONV_MODULES[layer["dims"]](shapes[index][0], layer["out_channels"], layer["kernel"],
                                           stride=layer["stride"], padding=layer["padding"])
    if kind == "avgpool":
        return POOL_MODULES[len(shapes[index]) - 1](layer["kernel"], stride=layer["stride"])
    if kind == "global_avgpool":
        return GlobalAvgPool()
    if kind == "batchnorm":
        return batchnorm(shapes[index][0], len(shapes[index]) - 1)
    if kind == "resblock":
        block = ResidualBlock(shapes[index][0], layer["mid_channels"], layer["out_channels"], layer["stride"],
                              layer["activation"])
        assert isinstance(block.shortcut, nn.Sequential) == needs_projection(layer, shapes[index][0])
        return block
    return ACTIVATION_MODULES[layer["name"]]()


def build_model(spec: ArchSpec) -> nn.Sequential:
    """A plain ``nn.Sequential`` with the spec's layers (fresh PyTorch default initialisation)."""
    shapes = spec.shapes()
    return nn.Sequential(*(build_layer(spec, i, shapes) for i in range(len(spec.layers))))


def module_width(module: nn.Module) -> int:
    """Growable width of a weight module: out_features (linear), out_channels (conv), a residual block's
    middle channels."""
    if isinstance(module, ResidualBlock):
        return module.conv1.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.out_channels
    raise SpecError(f"{type(module).__name__} has no width: expected Linear, Conv1d, Conv2d or ResidualBlock")


def spec_from_model(model: nn.Sequential, template: ArchSpec) -> ArchSpec:
    """``template`` with the growable widths read back from ``model``'s linear and conv layers."""
    widths = []
    expected = {"linear": nn.Linear, "conv": (nn.Conv1d, nn.Conv2d), "resblock": ResidualBlock}
    for i in template.growable_indices:
        module, kind = model[i], template.layers[i]["kind"]
        if not isinstance(module, expected[kind]):
            raise SpecError(f"module {i} is {type(module).__name__}, the spec says {kind}")
        widths.append(module_width(module))
    return template.with_hidden_widths(widths)
