"""Build a plain PyTorch model from an architecture spec, and read the widths back from a model."""

from __future__ import annotations

from torch import nn

from tinydeploy.errors import SpecError
from tinydeploy.model.spec import ArchSpec

#: The module of each activation name in ``tinydeploy.model.spec.ACTIVATIONS`` (all have sigma(0) = 0).
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def build_model(spec: ArchSpec) -> nn.Sequential:
    """A plain ``nn.Sequential`` with the spec's layers (fresh PyTorch default initialisation)."""
    modules: list[nn.Module] = []
    for i, layer in enumerate(spec.layers):
        if layer["kind"] == "flatten":
            modules.append(nn.Flatten())
        elif layer["kind"] == "linear":
            modules.append(nn.Linear(spec.in_features(i), layer["out_features"]))
        else:
            modules.append(ACTIVATION_MODULES[layer["name"]]())
    return nn.Sequential(*modules)


def spec_from_model(model: nn.Sequential, template: ArchSpec) -> ArchSpec:
    """``template`` with hidden widths read back from ``model``'s linear layers."""
    widths = []
    for i in template.growable_indices:
        module = model[i]
        if not isinstance(module, nn.Linear):
            raise SpecError(f"module {i} is {type(module).__name__}, the spec says linear")
        widths.append(module.out_features)
    return template.with_hidden_widths(widths)
