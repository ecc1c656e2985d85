"""Architecture spec: the single, JSON-serialisable source of truth for a model's structure.

A spec lists the layers of a plain ``nn.Sequential``, the input shape, the task, the class names and
the preprocessing fitted on the training split. The module index of layer ``i`` in the built
``nn.Sequential`` is ``i``, so state-dict keys read ``"{i}.weight"`` / ``"{i}.bias"``.

Layer kinds (JSON objects with a ``kind``):

* ``linear``: ``out_features``, ``growable``; its input must be a vector (flatten first);
* ``conv``: ``dims`` (1 for signals (C, L), 2 for images (C, H, W)), ``out_channels``, ``kernel``,
  ``stride``, ``padding`` (square kernels, integers), ``growable``;
* ``activation``: ``name``, one of ``ACTIVATIONS`` (sigma(0) = 0);
* ``avgpool``: ``kernel``, ``stride`` (average pooling without padding, over the last ``dims`` axes);
* ``flatten``: (C, ...) -> (C * ...), channel-major as ``torch.flatten``;
* ``global_avgpool``: (C, ...) -> (C,), the mean over every spatial position;
* ``batchnorm``: per-channel batch normalisation of (C, ...) or (C,) inputs (affine, eps 1e-5,
  momentum 0.1, running statistics);
* ``resblock``: a residual BasicBlock on 2-D images, ``out_channels`` (the residual stream),
  ``mid_channels`` (its middle width), ``stride``, ``activation``, ``growable``: conv 3x3 (stride) ->
  BatchNorm -> activation -> conv 3x3 -> BatchNorm, plus a shortcut (identity, or a 1x1 conv with
  that stride and a BatchNorm when the stride or the channel count changes), then the activation.
  State-dict keys ``{i}.conv1.*``, ``{i}.bn1.*``, ``{i}.conv2.*``, ``{i}.bn2.*``, ``{i}.shortcut.0.*``,
  ``{i}.shortcut.1.*``.

``feature_names`` (optional) names the input features of a flat input, in order (a CSV header):
clients may then send features by name. It is serialised only when present, so specs without names
keep their JSON (and hashes).

A growable layer's width (``out_features``, ``out_channels``, or a block's ``mid_channels``) is what
growth changes; between a growable linear/conv layer and the next weight layer (its consumer) only
channel-wise layers (activations, pooling, flatten, batchnorm) may sit; a block's middle channels are
produced by its conv1 and consumed by its conv2. Specs written before convolutions existed (flatten /
linear / activation) are valid specs of this format.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

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


WEIGHT_KINDS = ("linear", "conv", "resblock")
#: Kinds allowed between a growable layer and its consumer: they act on each channel on its own.
CHANNELWISE_KINDS = ("activation", "avgpool", "flatten", "global_avgpool", "batchnorm")
LAYER_KINDS = (*WEIGHT_KINDS, *CHANNELWISE_KINDS)
TRANSITIONS = ("flatten", "global_avgpool")
#: ResNet presets: residual blocks per stage (four stages, stream widths 64/128/256/512 at full size).
RESNET_STAGES: dict[str, tuple[int, ...]] = {"resnet18": (2, 2, 2, 2), "resnet10": (1, 1, 1, 1)}
RESNET_STREAM = (64, 128, 256, 512)
BATCHNORM_EPS = 1e-5
BATCHNORM_MOMENTUM = 0.1


@dataclass(frozen=True)
class ConvBlock:
    """One block of a sequential CNN: conv (kernel, stride, padding) -> activation -> optional average pool.

    ``padding`` None means "same" for stride 1 (kernel // 2); ``pool`` 0 or 1 means no pooling.
    """

    kernel: int = 3
    stride: int = 1
    padding: int | None = None
    pool: int = 0

    def layers(self, dims: int, width: int, activation: str) -> list[dict[str, Any]]:
        padding = self.kernel // 2 if self.padding is None else self.padding
        layers: list[dict[str, Any]] = [
            {"kind": "conv", "dims": dims, "out_channels": int(width), "kernel": int(self.kernel),
             "stride": int(self.stride), "padding": int(padding), "growable": True},
            {"kind": "activation", "name": activation},
        ]
        if self.pool > 1:
            layers.append({"kind": "avgpool", "kernel": int(self.pool), "stride": int(self.pool)})
        return layers


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def width_key(layer: dict[str, Any]) -> str:
    """The key holding a weight layer's growable width: ``out_features`` (linear), ``out_channels``
    (conv) or ``mid_channels`` (a residual block's middle channels)."""
    return {"conv": "out_channels", "resblock": "mid_channels"}.get(layer["kind"], "out_features")


def needs_projection(layer: dict[str, Any], in_channels: int) -> bool:
    """Whether a residual block's shortcut is a 1x1 conv + BatchNorm (stride or channel count changes)."""
    return layer["stride"] != 1 or layer["out_channels"] != in_channels


def block_shapes(layer: dict[str, Any], in_channels: int) -> dict[str, list[int]]:
    """Parameter name (relative to the block) -> shape of a residual block's parameters."""
    mid, out = layer["mid_channels"], layer["out_channels"]
    shapes = {"conv1.weight": [mid, in_channels, 3, 3], "conv1.bias": [mid], "bn1.weight": [mid], "bn1.bias": [mid],
              "conv2.weight": [out, mid, 3, 3], "conv2.bias": [out], "bn2.weight": [out], "bn2.bias": [out]}
    if needs_projection(layer, in_channels):
        shapes.update({"shortcut.0.weight": [out, in_channels, 1, 1], "shortcut.0.bias": [out],
                       "shortcut.1.weight": [out], "shortcut.1.bias": [out]})
    return shapes


@dataclass(frozen=True)
class ArchSpec:
    """Structure of a plain sequential network (MLP or CNN) plus everything needed to use it on raw inputs."""

    task: str
    input_shape: tuple[int, ...]
    layers: tuple[dict[str, Any], ...]
    classes: tuple[str, ...] = ()
    preprocessing: dict[str, Any] | None = None
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    feature_names: tuple[str, ...] = ()

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
        layers += _hidden_and_output(hidden_widths, n_outputs, activation)
        return _checked(task, input_shape, layers, classes, preprocessing, dataset)

    @staticmethod
    def cnn(
        *,
        task: str,
        input_shape: tuple[int, ...],
        blocks: list[ConvBlock],
        conv_widths: list[int],
        hidden_widths: list[int],
        n_outputs: int,
        transition: str = "flatten",
        activation: str = "relu",
        classes: tuple[str, ...] = (),
        preprocessing: dict[str, Any] | None = None,
        dataset: str = "",
    ) -> "ArchSpec":
        """A sequential CNN: (conv, act[, avgpool])* -> flatten | global_avgpool -> (linear, act)* -> linear.

        ``input_shape`` is (C, L) for Conv1d blocks or (C, H, W) for Conv2d blocks; every conv block's
        channel count and every hidden linear width is growable.
        """
        check_activation(activation)
        if len(input_shape) not in (2, 3):
            raise SpecError(
                f"a CNN takes signals of shape (C, L) or images of shape (C, H, W); inputs have shape "
                f"{list(input_shape)}: use --arch mlp or reshape the data"
            )
        if not blocks or len(conv_widths) != len(blocks):
            raise SpecError(f"a CNN needs at least one conv block and one width per block, got {len(blocks)} "
                            f"blocks and widths {conv_widths}")
        if any(int(w) < 1 for w in [*conv_widths, *hidden_widths]):
            raise SpecError(f"widths must be positive integers, got {[*conv_widths, *hidden_widths]}")
        if transition not in TRANSITIONS:
            raise SpecError(f"unknown transition '{transition}': use flatten or global_avgpool")
        dims = len(input_shape) - 1
        layers: list[dict[str, Any]] = []
        for block, width in zip(blocks, conv_widths):
            layers += block.layers(dims, width, activation)
        layers.append({"kind": transition})
        layers += _hidden_and_output(hidden_widths, n_outputs, activation)
        return _checked(task, input_shape, layers, classes, preprocessing, dataset)

    @staticmethod
    def resnet(
        *,
        task: str,
        input_shape: tuple[int, ...],
        stages: tuple[int, ...],
        stream_widths: list[int],
        mid_widths: list[int],
        n_outputs: int,
        activation: str = "relu",
        classes: tuple[str, ...] = (),
        preprocessing: dict[str, Any] | None = None,
        dataset: str = "",
    ) -> "ArchSpec":
        """A ResNet of BasicBlocks on (C, H, W) images: stem conv 3x3 (stride 1) -> BatchNorm -> activation,
        ``stages[s]`` residual blocks at stream width ``stream_widths[s]`` (the first block of every stage
        after the first has stride 2), global average pooling, linear output layer. ``mid_widths`` lists
        every block's middle width (growable), in order."""
        check_activation(activation)
        if len(input_shape) != 3:
            raise SpecError(f"a ResNet takes images of shape (C, H, W); inputs have shape {list(input_shape)}: "
                            "use --arch cnn or mlp")
        if len(stream_widths) != len(stages) or len(mid_widths) != sum(stages):
            raise SpecError(f"a ResNet with stages {list(stages)} needs {len(stages)} stream widths and "
                            f"{sum(stages)} middle widths, got {stream_widths} and {mid_widths}")
        if any(int(w) < 1 for w in [*stream_widths, *mid_widths]):
            raise SpecError(f"widths must be positive integers, got {[*stream_widths, *mid_widths]}")
        layers: list[dict[str, Any]] = [
            {"kind": "conv", "dims": 2, "out_channels": int(stream_widths[0]), "kernel": 3, "stride": 1,
             "padding": 1, "growable": False},
            {"kind": "batchnorm"},
            {"kind": "activation", "name": activation},
        ]
        mids = iter(mid_widths)
        for stage, (blocks, width) in enumerate(zip(stages, stream_widths)):
            for b in range(blocks):
                layers.append({"kind": "resblock", "out_channels": int(width), "mid_channels": int(next(mids)),
                               "stride": 2 if stage > 0 and b == 0 else 1, "activation": activation,
                               "growable": True})
        layers += [{"kind": "global_avgpool"}, {"kind": "linear", "out_features": int(n_outputs), "growable": False}]
        return _checked(task, input_shape, layers, classes, preprocessing, dataset)

    # ----- derived quantities -------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def linear_indices(self) -> list[int]:
        """Module indices of the linear layers, in order."""
        return [i for i, layer in enumerate(self.layers) if layer["kind"] == "linear"]

    @property
    def weight_indices(self) -> list[int]:
        """Module indices of the layers with weights (linear and conv), in order."""
        return [i for i, layer in enumerate(self.layers) if layer["kind"] in WEIGHT_KINDS]

    @property
    def growable_indices(self) -> list[int]:
        """Module indices of the weight layers whose width (features or channels) can grow."""
        return [i for i in self.weight_indices if self.layers[i].get("growable", False)]

    @property
    def has_convolutions(self) -> bool:
        return any(layer["kind"] in ("conv", "resblock") for layer in self.layers)

    @property
    def has_batchnorm(self) -> bool:
        return any(layer["kind"] in ("batchnorm", "resblock") for layer in self.layers)

    def width(self, index: int) -> int:
        """Output width of the weight layer at module ``index`` (features or channels)."""
        layer = self.layers[index]
        return int(layer[width_key(layer)])

    @property
    def hidden_widths(self) -> list[int]:
        """Widths of the growable layers, in order (conv channels and hidden linear features)."""
        return [self.width(i) for i in self.growable_indices]

    @property
    def n_outputs(self) -> int:
        return self.layers[self.linear_indices[-1]]["out_features"]

    def consumer(self, index: int) -> int:
        """The next weight layer after module ``index`` (the one that reads a growable layer's output);
        a residual block's middle channels are read inside the block: its own index."""
        if self.layers[index]["kind"] == "resblock":
            return index
        following = [i for i in self.weight_indices if i > index]
        if not following:
            raise SpecError(f"layer {index} has no weight layer after it")
        return following[0]

    def pairs(self) -> list[tuple[int, int]]:
        """(growable layer, its consumer) for every growable layer."""
        return [(i, self.consumer(i)) for i in self.growable_indices]

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape entering each layer, then the output shape (len(layers) + 1 entries)."""
        shapes = [tuple(self.input_shape)]
        for i, layer in enumerate(self.layers):
            shapes.append(_layer_output(i, layer, shapes[-1]))
        return shapes

    def in_features(self, index: int) -> int:
        """Fan-in of the linear layer at module ``index`` (the size of its flat input)."""
        return math.prod(self.shapes()[index])

    def in_channels(self, index: int) -> int:
        """Channels entering the weight layer at module ``index`` (features for a linear layer)."""
        return self.shapes()[index][0]

    def weight_shapes(self, folded: bool = False) -> dict[str, list[int]]:
        """State-dict name -> shape of every parameter: ``"{i}.weight"`` and ``"{i}.bias"``, a block's
        ``"{i}.conv1.weight"`` ... With ``folded``, those of the model with every BatchNorm folded into
        the convolution before it (``tinydeploy.model.fold``): the BatchNorm parameters are gone."""
        shapes = self.shapes()
        found: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            if layer["kind"] == "conv":
                weight = [layer["out_channels"], shapes[i][0], *[layer["kernel"]] * layer["dims"]]
            elif layer["kind"] == "linear":
                weight = [layer["out_features"], math.prod(shapes[i])]
            elif layer["kind"] == "batchnorm" and not folded:
                weight = [shapes[i][0]]
            elif layer["kind"] == "resblock":
                found.update({f"{i}.{name}": shape for name, shape in block_shapes(layer, shapes[i][0]).items()
                              if not (folded and name.startswith(("bn", "shortcut.1")))})
                continue
            else:
                continue
            found[f"{i}.weight"], found[f"{i}.bias"] = weight, [weight[0]]
        return found

    def layer_tensors(self, index: int, folded: bool = False) -> dict[str, list[int]]:
        """State-dict name -> shape of the parameters of the weight layer at module ``index`` together with
        the BatchNorm layers right after it (the ones folded into it at export); a block's: all of its
        convolutions and BatchNorms. ``folded``: as stored after folding (``weight_shapes``)."""
        owners = [index]
        while owners[-1] + 1 < len(self.layers) and self.layers[owners[-1] + 1]["kind"] == "batchnorm":
            owners.append(owners[-1] + 1)
        prefixes = tuple(f"{i}." for i in owners)
        return {name: shape for name, shape in self.weight_shapes(folded).items() if name.startswith(prefixes)}

    def layer_params(self, index: int, folded: bool = False) -> int:
        """Parameters of the layer at module ``index`` with its BatchNorms (``layer_tensors``)."""
        return sum(math.prod(shape) for shape in self.layer_tensors(index, folded).values())

    def layer_macs(self, index: int, shapes: list[tuple[int, ...]] | None = None) -> int:
        """Multiply-accumulates per sample of the weight layer at ``index`` (weights only, no biases)."""
        shapes = shapes or self.shapes()
        layer = self.layers[index]
        if layer["kind"] == "conv":
            kernel = layer["kernel"] ** layer["dims"]
            return shapes[index][0] * kernel * math.prod(shapes[index + 1])
        if layer["kind"] == "linear":
            return math.prod(shapes[index]) * layer["out_features"]
        if layer["kind"] == "resblock":
            positions = math.prod(shapes[index + 1][1:])
            c_in, mid, out = shapes[index][0], layer["mid_channels"], layer["out_channels"]
            shortcut = c_in * out if needs_projection(layer, c_in) else 0
            return (9 * c_in * mid + 9 * mid * out + shortcut) * positions
        return 0

    def n_params(self, folded: bool = False) -> int:
        """Parameters of the model (``folded``: after folding every BatchNorm into its convolution)."""
        return sum(math.prod(shape) for shape in self.weight_shapes(folded).values())

    def macs(self) -> int:
        """Multiply-accumulates per sample (weights only; biases, activations and pooling not counted)."""
        shapes = self.shapes()
        return sum(self.layer_macs(i, shapes) for i in self.weight_indices)

    def with_hidden_widths(self, widths: Iterable[int]) -> "ArchSpec":
        """The same spec with new widths (one per growable layer, in order)."""
        widths = list(widths)
        if len(widths) != len(self.growable_indices):
            raise SpecError(f"expected {len(self.growable_indices)} widths, got {len(widths)}")
        layers = [dict(layer) for layer in self.layers]
        for i, width in zip(self.growable_indices, widths):
            layers[i][width_key(layers[i])] = int(width)
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
        for i, layer in enumerate(self.layers):
            _check_layer(i, layer)
        if not self.linear_indices:
            raise SpecError("the spec has no linear layer")
        if self.weight_indices[-1] != self.linear_indices[-1]:
            raise SpecError("the last weight layer must be linear (the output layer)")
        for i in self.growable_indices:
            if self.layers[i]["kind"] == "resblock":
                continue
            consumer = self.consumer(i) if i != self.weight_indices[-1] else None
            if consumer is None:
                raise SpecError(f"layer {i} is growable but no weight layer reads its output")
            between = [self.layers[j]["kind"] for j in range(i + 1, consumer)]
            if any(kind not in CHANNELWISE_KINDS for kind in between):
                raise SpecError(f"layer {i} is growable but {between} sit between it and layer {consumer}")
        self.shapes()
        if self.task == "classification" and self.classes and len(self.classes) != self.n_outputs:
            raise SpecError(f"{len(self.classes)} class names for {self.n_outputs} outputs")
        if self.feature_names and (len(self.feature_names) != self.n_features
                                   or len(set(self.feature_names)) != len(self.feature_names)):
            raise SpecError(f"{len(self.feature_names)} feature names for {self.n_features} features: they must be "
                            "distinct, one per feature")

    def to_dict(self) -> dict[str, Any]:
        names = {"feature_names": list(self.feature_names)} if self.feature_names else {}
        return {
            "format": SPEC_FORMAT,
            "task": self.task,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "layers": [dict(layer) for layer in self.layers],
            "classes": list(self.classes),
            "preprocessing": self.preprocessing,
            "extra": dict(self.extra),
            **names,
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
                feature_names=tuple(str(n) for n in data.get("feature_names", [])),
            )
            spec.validate()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpecError(f"malformed architecture spec: {exc!r}") from exc
        return spec

    @staticmethod
    def from_json(text: str) -> "ArchSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"architecture spec is not valid JSON: {exc}") from exc
        return ArchSpec.from_dict(data)


def _hidden_and_output(hidden_widths: list[int], n_outputs: int, activation: str) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for width in hidden_widths:
        layers.append({"kind": "linear", "out_features": int(width), "growable": True})
        layers.append({"kind": "activation", "name": activation})
    layers.append({"kind": "linear", "out_features": int(n_outputs), "growable": False})
    return layers


def _checked(task: str, input_shape: tuple[int, ...], layers: list[dict[str, Any]], classes: tuple[str, ...],
             preprocessing: dict[str, Any] | None, dataset: str) -> ArchSpec:
    spec = ArchSpec(task=task, input_shape=tuple(int(s) for s in input_shape), layers=tuple(layers),
                    classes=tuple(classes), preprocessing=preprocessing, dataset=dataset)
    spec.validate()
    return spec


def _positive_int(i: int, layer: dict[str, Any], key: str, minimum: int = 1) -> None:
    value = layer.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"layer {i} ({layer.get('kind')}): {key} must be an integer >= {minimum}, got {value!r}")


def _check_layer(i: int, layer: dict[str, Any]) -> None:
    kind = layer.get("kind")
    if kind == "linear":
        if int(layer.get("out_features", 0)) < 1:
            raise SpecError(f"layer {i}: out_features must be >= 1")
    elif kind == "conv":
        if layer.get("dims") not in (1, 2):
            raise SpecError(f"layer {i} (conv): dims must be 1 (signals) or 2 (images), got {layer.get('dims')!r}")
        for key in ("out_channels", "kernel", "stride"):
            _positive_int(i, layer, key)
        _positive_int(i, layer, "padding", 0)
    elif kind == "avgpool":
        _positive_int(i, layer, "kernel")
        _positive_int(i, layer, "stride")
    elif kind == "resblock":
        for key in ("out_channels", "mid_channels", "stride"):
            _positive_int(i, layer, key)
        check_activation(str(layer.get("activation")))
    elif kind == "activation":
        check_activation(str(layer.get("name")))
    elif kind not in LAYER_KINDS:
        raise SpecError(f"layer {i}: unknown kind '{kind}': use one of {', '.join(LAYER_KINDS)}")


def _layer_output(i: int, layer: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample output shape of ``layer`` for an input of ``shape``; SpecError when it does not fit."""
    kind = layer["kind"]
    if kind == "linear":
        if len(shape) != 1:
            raise SpecError(f"layer {i} (linear) gets inputs of shape {list(shape)}: put a flatten or "
                            "global_avgpool layer before it")
        return (int(layer["out_features"]),)
    if kind == "resblock":
        if len(shape) != 3:
            raise SpecError(f"layer {i} (resblock) gets inputs of shape {list(shape)}: a residual block needs "
                            "(channels, height, width)")
        return (int(layer["out_channels"]), *(_out_size(s, 3, layer["stride"], 1) for s in shape[1:]))
    if kind == "batchnorm" and len(shape) > 3:
        raise SpecError(f"layer {i} (batchnorm) gets inputs of shape {list(shape)}: it needs (C,), (C, L) or (C, H, W)")
    if kind in ("conv", "avgpool"):
        dims = layer["dims"] if kind == "conv" else len(shape) - 1
        if len(shape) != dims + 1 or dims < 1:
            raise SpecError(f"layer {i} ({kind}) gets inputs of shape {list(shape)}: a {dims}-d {kind} needs "
                            f"(channels, {', '.join(['size'] * max(dims, 1))})")
        padding = layer.get("padding", 0) if kind == "conv" else 0
        spatial = tuple(_out_size(s, layer["kernel"], layer["stride"], padding) for s in shape[1:])
        if min(spatial) < 1:
            raise SpecError(f"layer {i} ({kind}): kernel {layer['kernel']} does not fit inputs of spatial size "
                            f"{list(shape[1:])}: use a smaller kernel, more padding or fewer pooling layers")
        channels = layer["out_channels"] if kind == "conv" else shape[0]
        return (int(channels), *spatial)
    if kind == "flatten":
        return (math.prod(shape),)
    if kind == "global_avgpool":
        if len(shape) < 2:
            raise SpecError(f"layer {i} (global_avgpool) gets inputs of shape {list(shape)}: it needs (channels, ...)")
        return (shape[0],)
    return shape
