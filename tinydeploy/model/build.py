"""Build a plain PyTorch model from an architecture spec, and read the widths back from a model."""

from __future__ import annotations

import torch
from torch import nn

from tinydeploy.errors import SpecError
from tinydeploy.model.spec import ArchSpec

class ReLU(nn.ReLU):
    """max(x, 0) whose derivative at 0 is 1 (the right derivative) instead of torch's 0.

    A unit whose pre-activation is exactly 0 on every sample (a neuron inserted with fan-in 0, as
    GradMax does) then receives the gradient sigma'(0) * omega^T V on its fan-in and trains, as in the
    GradMax reference code, whose ReLU has grad(f(0)) = 1. Values are those of ``nn.ReLU``; without
    autograd (inference, tracing for export) it is ``torch.relu``, so exported graphs hold a plain Relu.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.where(x >= 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.relu(x)


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
POOL_MODULES: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d}


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
    return ACTIVATION_MODULES[layer["name"]]()


def build_model(spec: ArchSpec) -> nn.Sequential:
    """A plain ``nn.Sequential`` with the spec's layers (fresh PyTorch default initialisation)."""
    shapes = spec.shapes()
    return nn.Sequential(*(build_layer(spec, i, shapes) for i in range(len(spec.layers))))


def module_width(module: nn.Module) -> int:
    """Output width of a weight module: out_features (linear) or out_channels (conv)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.out_channels
    raise SpecError(f"{type(module).__name__} has no width: expected Linear, Conv1d or Conv2d")


def spec_from_model(model: nn.Sequential, template: ArchSpec) -> ArchSpec:
    """``template`` with the growable widths read back from ``model``'s linear and conv layers."""
    widths = []
    expected = {"linear": nn.Linear, "conv": (nn.Conv1d, nn.Conv2d)}
    for i in template.growable_indices:
        module, kind = model[i], template.layers[i]["kind"]
        if not isinstance(module, expected[kind]):
            raise SpecError(f"module {i} is {type(module).__name__}, the spec says {kind}")
        widths.append(module_width(module))
    return template.with_hidden_widths(widths)
