"""Architecture spec: the single, JSON-serialisable source of truth for a model's structure.

A spec lists the layers of a plain ``nn.Sequential`` (``flatten``, ``linear``, ``activation``), the
input shape, the task, the class names and the preprocessing fitted on the training split. The
module index of layer ``i`` in the built ``nn.Sequential`` is ``i``, so state-dict keys read
``"{i}.weight"`` / ``"{i}.bias"``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from tinydeploy.errors import SpecError

SPEC_FORMAT = "tinydeploy.arch/1"
TASKS = ("classification", "regression")

#: Activations TINY can grow through: all satisfy sigma(0) = 0 (paper Sec. 2.1).
ACTIVATIONS: tuple[str, ...] = ("relu", "selu", "tanh", "gelu", "identity")
#: Activations users commonly ask for that violate sigma(0) = 0, with their value at 0.
_REJECTED_ACTIVATIONS = {"sigmoid": 0.5, "softplus": math.log(2.0), "hardsigmoid": 0.5}


def check_activation(name: str) -> str:
    """Return ``name`` if TINY supports it, else raise a one-line ``SpecError``."""
    valid = ", ".join(a for a in ACTIVATIONS if a != "identity")
    if name in _REJECTED_ACTIVATIONS:
        raise SpecError(
            f"activation '{name}' has sigma(0)={_REJECTED_ACTIVATIONS[name]:.3g}, but TINY needs "
            f"sigma(0)=0: use one of {valid}"
        )
    if name not in ACTIVATIONS:
        raise SpecError(f"unknown activation '{name}': use one of {valid}")
    return name


@dataclass(frozen=True)
class ArchSpec:
    """Structure of a plain MLP plus everything needed to use it on raw inputs."""

    task: str
    input_shape: tuple[int, ...]
    layers: tuple[dict[str, Any], ...]
    classes: tuple[str, ...] = ()
    preprocessing: dict[str, Any] | None = None
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ----- construction -------------------------------------------------------------------------
    @staticmethod
    def mlp(
        *,
        task: str,
        input_shape: tuple[int, ...],
        hidden_widths: list[int],
        n_outputs: int,
        activation: str = "relu",
        classes: tuple[str, ...] = (),
        preprocessing: dict[str, Any] | None = None,
        dataset: str = "",
    ) -> "ArchSpec":
        """An MLP whose hidden layers are growable: [flatten] (linear, act)* linear."""
        check_activation(activation)
        if not hidden_widths or any(int(w) < 1 for w in hidden_widths):
            raise SpecError(f"hidden widths must be positive integers, got {hidden_widths}")
        layers: list[dict[str, Any]] = []
        if len(input_shape) > 1:
            layers.append({"kind": "flatten"})
        for width in hidden_widths:
            layers.append({"kind": "linear", "out_features": int(width), "growable": True})
            layers.append({"kind": "activation", "name": activation})
        layers.append({"kind": "linear", "out_features": int(n_outputs), "growable": False})
        spec = ArchSpec(
            task=task,
            input_shape=tuple(int(s) for s in input_shape),
            layers=tuple(layers),
            classes=tuple(classes),
            preprocessing=preprocessing,
            dataset=dataset,
        )
        spec.validate()
        return spec

    # ----- derived quantities -------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def linear_indices(self) -> list[int]:
        """Module indices of the linear layers, in order."""
        return [i for i, layer in enumerate(self.layers) if layer["kind"] == "linear"]

    @property
    def growable_indices(self) -> list[int]:
        """Module indices of the linear layers whose output width can grow."""
        return [i for i in self.linear_indices if self.layers[i].get("growable", False)]

    @property
    def hidden_widths(self) -> list[int]:
        return [self.layers[i]["out_features"] for i in self.growable_indices]

    @property
    def n_outputs(self) -> int:
        return self.layers[self.linear_indices[-1]]["out_features"]

    def in_features(self, index: int) -> int:
        """Fan-in of the linear layer at module ``index``."""
        previous = [i for i in self.linear_indices if i < index]
        return self.layers[previous[-1]]["out_features"] if previous else self.n_features

    def n_params(self) -> int:
        return sum((self.in_features(i) + 1) * self.layers[i]["out_features"] for i in self.linear_indices)

    def macs(self) -> int:
        """Multiply-accumulates per sample (weights only; biases and activations not counted)."""
        return sum(self.in_features(i) * self.layers[i]["out_features"] for i in self.linear_indices)

    def with_hidden_widths(self, widths: list[int]) -> "ArchSpec":
        """The same spec with new hidden widths (one per growable layer)."""
        if len(widths) != len(self.growable_indices):
            raise SpecError(f"expected {len(self.growable_indices)} widths, got {len(widths)}")
        layers = [dict(layer) for layer in self.layers]
        for i, width in zip(self.growable_indices, widths):
            layers[i]["out_features"] = int(width)
        return replace(self, layers=tuple(layers))

    def with_preprocessing(self, preprocessing: dict[str, Any] | None) -> "ArchSpec":
        return replace(self, preprocessing=preprocessing)

    # ----- validation and (de)serialisation ------------------------------------------------------
    def validate(self) -> None:
        """Raise ``SpecError`` naming the first problem found."""
        if self.task not in TASKS:
            raise SpecError(f"unknown task '{self.task}': use one of {', '.join(TASKS)}")
        if not self.input_shape or any(s < 1 for s in self.input_shape):
            raise SpecError(f"input_shape must be positive integers, got {list(self.input_shape)}")
        if not self.linear_indices:
            raise SpecError("the spec has no linear layer")
        for i, layer in enumerate(self.layers):
            kind = layer.get("kind")
            if kind == "linear":
                if int(layer.get("out_features", 0)) < 1:
                    raise SpecError(f"layer {i}: out_features must be >= 1")
            elif kind == "activation":
                check_activation(str(layer.get("name")))
            elif kind != "flatten":
                raise SpecError(f"layer {i}: unknown kind '{kind}': use flatten, linear or activation")
        if self.task == "classification" and self.classes and len(self.classes) != self.n_outputs:
            raise SpecError(f"{len(self.classes)} class names for {self.n_outputs} outputs")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "task": self.task,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "layers": [dict(layer) for layer in self.layers],
            "classes": list(self.classes),
            "preprocessing": self.preprocessing,
            "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): stable input for hashing and metadata."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ArchSpec":
        if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise SpecError(f"not a tinydeploy architecture spec (format {found!r}, expected '{SPEC_FORMAT}')")
        try:
            spec = ArchSpec(
                task=data["task"],
                input_shape=tuple(int(s) for s in data["input_shape"]),
                layers=tuple(dict(layer) for layer in data["layers"]),
                classes=tuple(str(c) for c in data.get("classes", [])),
                preprocessing=data.get("preprocessing"),
                dataset=data.get("dataset", ""),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed architecture spec: {exc!r}") from exc
        spec.validate()
        return spec

    @staticmethod
    def from_json(text: str) -> "ArchSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"architecture spec is not valid JSON: {exc}") from exc
        return ArchSpec.from_dict(data)
