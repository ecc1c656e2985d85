"""Torch-free inference on an exported model with onnxruntime.

This module imports only numpy, onnxruntime, the standard library and torch-free tinydeploy modules
(``errors``, ``providers``, ``manifest``), so an edge device can run it without PyTorch installed.

An :class:`OnnxModel` is opened from an export directory (or a bare ``model.onnx`` path):

* the directory's ``manifest.json`` is required (``verify=False`` skips it, for ``--no-verify``):
  every file it lists is checked against its sha256, and the model bytes actually handed to
  onnxruntime come from ``read_verified``, which hashes exactly those bytes, so a tampered,
  unlisted or swapped file is refused and named;
* files are opened without following symbolic links, and a model that keeps tensors in external
  files is refused (onnxruntime would read them from outside the checked directory);
* execution providers are chosen deliberately (``auto`` | ``cpu`` | ``cuda``, see
  ``tinydeploy.serving.providers``) and the session's real providers are checked after it is created;
* inputs are validated against the model's declared input (shape, numeric dtype, finite values,
  non-empty batch): a violation raises :class:`InputError`, which a server maps to a 4xx answer;
* one row (1-D with ``n_features`` values, or exactly ``input_shape``: [C, H, W] or [C, L] for a
  CNN) or a batch (``[batch, n_features]`` or ``[batch, *input_shape]``) is accepted, and the answer
  is always batched: ``outputs`` has shape ``[batch, n_outputs]``; classifiers also get ``labels``
  (class names of the argmax) and ``probabilities`` (softmax of the logits);
* a model with feature names (``feature_names``, from a CSV header) also takes rows as objects
  ``{name: value}`` in any order, and ``match_columns`` reorders a named table
  (``tinydeploy.serving.features``); a model grown on images records their format (``image``), and
  image files are converted to its input tensors by ``tinydeploy.serving.images``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tinydeploy.errors import IntegrityError, TinyDeployError
from tinydeploy.serving.features import FeatureMismatch, column_order, rows_by_name
from tinydeploy.serving.images import image_format
from tinydeploy.serving.manifest import read_file, read_verified, sha256_bytes, verify_manifest
from tinydeploy.serving.onnx_scan import MalformedModel, external_tensors
from tinydeploy.serving.providers import (
    CUDA,
    DEFAULT_PROVIDER,
    choose_providers,
    import_onnxruntime,
    quiet_session_options,
)

ort = import_onnxruntime()

MODEL_FILE = "model.onnx"
ARCH_FILE = "arch.json"
SPEC_KEY = "tinydeploy.spec"
CLASSES_KEY = "tinydeploy.classes"
TASK_KEY = "tinydeploy.task"
FEATURE_NAMES_KEY = "tinydeploy.feature_names"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Printed by ``serve`` and ``predict`` when the manifest check is skipped.
NO_VERIFY_WARNING = (
    "WARNING: --no-verify: {path} is loaded WITHOUT checking manifest.json; tampered or truncated files "
    "will not be detected. Use it only for a directory you wrote yourself."
)


class InputError(TinyDeployError):
    """The caller's input does not fit the model (shape, dtype, non-finite values, empty batch).

    ``code`` is a short machine-readable reason (``"shape"``, ``"dtype"``, ``"non_finite"``,
    ``"empty"``, ``"too_large"``) that a server reports next to the message.
    """

    def __init__(self, message: str, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Prediction:
    """The answer for a batch: raw outputs, and for classifiers argmax labels and softmax."""

    outputs: np.ndarray
    labels: list[str] | None = None
    indices: np.ndarray | None = None
    probabilities: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.outputs.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (lists of floats, batch first)."""
        answer: dict[str, Any] = {"outputs": self.outputs.tolist()}
        if self.labels is not None:
            answer["labels"] = list(self.labels)
            answer["indices"] = [int(i) for i in self.indices] if self.indices is not None else None
            answer["probabilities"] = self.probabilities.tolist() if self.probabilities is not None else None
        return answer


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax computed in float64 (stable), returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def resolve_model_path(path: str | os.PathLike[str], model_file: str = MODEL_FILE) -> tuple[Path, Path]:
    """(export directory, model file) for an export directory or a bare ``.onnx`` path."""
    path = Path(path)
    if path.is_dir():
        model_path = path / model_file
        if not model_path.is_file():
            raise TinyDeployError(
                f"{path} holds no {model_file}: pass the directory written by 'tinydeploy export RUN --onnx' "
                "or a .onnx file"
            )
        return path, model_path
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise TinyDeployError(f"{path} is not an .onnx file: pass an export directory or a model.onnx path")
        return path.parent, path
    raise TinyDeployError(f"{path} does not exist: pass an export directory or a model.onnx path")


def check_self_contained(data: bytes, where: str | os.PathLike[str]) -> None:
    """Refuse an ONNX model that keeps any tensor in an external file (see ``onnx_scan``)."""
    try:
        external = external_tensors(data)
    except MalformedModel as exc:
        raise TinyDeployError(f"onnxruntime cannot load {where}: it is not a valid ONNX file ({exc})") from None
    if external:
        name, location = external[0]
        raise IntegrityError(
            f"{where} keeps tensor {name!r} in the external file {location!r}"
            f"{f' (and {len(external) - 1} more)' if len(external) > 1 else ''}: tinydeploy loads only self-contained "
            "ONNX files, since external data is read from outside the checked directory; re-export the model"
        )


def load_model_bytes(directory: Path, name: str, verify: bool) -> tuple[bytes, dict[str, Any] | None]:
    """(the bytes of ``directory/name``, the verified manifest or None): links never followed, the
    manifest required and the returned bytes hashed unless ``verify`` is False."""
    if not verify:
        return read_file(directory, name), None
    manifest = verify_manifest(directory, hint=" (or pass --no-verify to skip the integrity check, at your own risk)")
    return read_verified(directory, manifest, name), manifest


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class OnnxModel:
    """An exported model opened with onnxruntime; thread-safe for concurrent ``predict`` calls."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        provider: str = DEFAULT_PROVIDER,
        *,
        model_file: str = MODEL_FILE,
        verify: bool = True,
        intra_op_num_threads: int | None = None,
        inter_op_num_threads: int | None = None,
    ) -> None:
        self.directory, self.model_path = resolve_model_path(path, model_file)
        data, self.manifest = load_model_bytes(self.directory, self.model_path.name, verify)
        check_self_contained(data, self.model_path)
        self.sha256 = sha256_bytes(data)
        self.size_bytes = len(data)
        self.requested_provider = provider
        providers = choose_providers(provider)
        options = quiet_session_options()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = int(intra_op_num_threads)
        if inter_op_num_threads is not None:
            options.inter_op_num_threads = int(inter_op_num_threads)
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt models
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TinyDeployError(f"onnxruntime cannot load {self.model_path}: {first}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        if provider == "cuda" and CUDA not in self.providers:
            raise TinyDeployError(
                f"provider 'cuda' requested but the session for {self.model_path} runs on "
                f"{', '.join(self.providers)}: install onnxruntime-gpu matching the CUDA driver "
                "(pip install 'tinydeploy[gpu]'), or use 'cpu'"
            )
        self._read_signature()
        self._read_metadata()

    # ----- model description -----------------------------------------------------------------------
    def _read_signature(self) -> None:
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise TinyDeployError(
                f"{self.model_path} has {len(inputs)} inputs and {len(outputs)} outputs: "
                "a tinydeploy model has one input and one output"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        if inputs[0].type != "tensor(float)":
            raise TinyDeployError(f"{self.model_path}: input '{self.input_name}' is {inputs[0].type}, expected tensor(float)")
        shape = list(inputs[0].shape)
        if len(shape) < 2:
            raise TinyDeployError(f"{self.model_path}: input '{self.input_name}' has shape {shape}, expected [batch, ...]")
        dims = [_dim(d) for d in shape[1:]]
        if any(d is None for d in dims):
            raise TinyDeployError(
                f"{self.model_path}: input '{self.input_name}' has dynamic feature dims {shape}: only the batch may be dynamic"
            )
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
        fixed_batch = _dim(shape[0])
        self.fixed_batch: int | None = fixed_batch
        out_shape = list(outputs[0].shape)
        self.n_outputs: int | None = _dim(out_shape[-1]) if len(out_shape) >= 2 else None

    def _read_metadata(self) -> None:
        """Task, classes, spec and widths from the model's metadata (or the verified arch.json).

        The metadata is as untrusted as the file: anything malformed is a one-line error at start-up,
        never an exception on a later request."""
        try:
            self._interpret_metadata(dict(self.session.get_modelmeta().custom_metadata_map or {}))
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
            if isinstance(exc, TinyDeployError):
                raise
            raise TinyDeployError(
                f"{self.model_path}: its tinydeploy metadata is malformed ({type(exc).__name__}: "
                f"{_first_line(exc)[:120]}): re-export the run"
            ) from None

    def _interpret_metadata(self, props: dict[str, str]) -> None:
        self.metadata_props = props
        spec: Any = None
        if SPEC_KEY in props:
            try:
                spec = json.loads(props[SPEC_KEY])
            except json.JSONDecodeError as exc:
                raise TinyDeployError(f"{self.model_path}: metadata '{SPEC_KEY}' is not JSON ({exc})") from None
        elif self.manifest is not None and ARCH_FILE in self.manifest["files"]:
            try:
                spec = json.loads(read_verified(self.directory, self.manifest, ARCH_FILE).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                spec = None
        self.spec: dict[str, Any] | None = spec if isinstance(spec, dict) else None
        task = props.get(TASK_KEY) or (self.spec or {}).get("task")
        classes: list[str] = []
        if CLASSES_KEY in props:
            try:
                classes = [str(c) for c in json.loads(props[CLASSES_KEY])]
            except (json.JSONDecodeError, TypeError) as exc:
                raise TinyDeployError(f"{self.model_path}: metadata '{CLASSES_KEY}' is not a JSON list ({exc})") from None
        elif self.spec:
            classes = [str(c) for c in self.spec.get("classes", [])]
        if task is None:
            task = "classification" if classes else "regression"
        self.task: str = str(task)
        #: "raw" when the model standardises inside (the default export), "standardized" when it was
        #: exported with --no-preprocessing and expects already standardised features.
        self.input_space: str = props.get("tinydeploy.inputs", "raw")
        if self.task == "classification" and not classes and self.n_outputs:
            classes = [str(i) for i in range(self.n_outputs)]
        self.classes: list[str] = classes
        layers = (self.spec or {}).get("layers", [])
        #: Output widths of every linear layer, and of the growable layers (hidden linear features, conv
        #: channels), according to the spec.
        self.layer_widths: list[int] = [int(layer["out_features"]) for layer in layers if layer.get("kind") == "linear"]
        self.hidden_widths: list[int] = [
            int(layer["out_features"] if layer.get("kind") == "linear" else layer["out_channels"])
            for layer in layers if layer.get("kind") in ("linear", "conv") and layer.get("growable")
        ]
        names = json.loads(props[FEATURE_NAMES_KEY]) if FEATURE_NAMES_KEY in props else (self.spec or {}).get(
            "feature_names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TinyDeployError(f"{self.model_path}: metadata '{FEATURE_NAMES_KEY}' is not a list of strings: "
                                  "re-export the run")
        if names and (len(names) != self.n_features or len(set(names)) != len(names)):
            raise TinyDeployError(f"{self.model_path}: {len(names)} feature names for {self.n_features} inputs: "
                                  "re-export the run")
        #: Names of the input features in order (empty when the model was grown on unnamed arrays).
        self.feature_names: list[str] = names
        #: The image format the model was grown on ({"mode", "size", "max_value"}), None if it takes no images.
        self.image: dict[str, Any] | None = image_format(self.spec, self.input_shape)
        if self.spec and "input_shape" in self.spec:
            declared = tuple(int(s) for s in self.spec["input_shape"])
            if math.prod(declared) != self.n_features:
                raise TinyDeployError(
                    f"{self.model_path}: spec input_shape {list(declared)} disagrees with the ONNX input "
                    f"{list(self.input_shape)}: re-export the run"
                )

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    def describe(self) -> dict[str, Any]:
        """Everything a client needs to call the model (JSON-serialisable)."""
        return {
            "model_file": self.model_path.name,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "task": self.task,
            "classes": list(self.classes),
            "input_space": self.input_space,
            "input": {"name": self.input_name, "dtype": "float32", "shape": ["batch", *self.input_shape]},
            "feature_names": list(self.feature_names),
            "image": self.image,
            "output": {"name": self.output_name, "dtype": "float32", "shape": ["batch", self.n_outputs]},
            "widths": {"hidden": self.hidden_widths, "linear": self.layer_widths},
            "spec": self.spec,
            "providers": list(self.providers),
            "requested_provider": self.requested_provider,
            "verified_manifest": self.manifest is not None,
            "onnxruntime": ort.__version__,
        }

    # ----- validation and inference ----------------------------------------------------------------
    def _expected(self, single: bool = False) -> str:
        """What inputs the model takes, for error messages."""
        shape, n = self.input_shape, self.n_features
        dims = ", ".join(map(str, shape))
        if len(shape) > 1:
            return f"expected one tensor of shape {list(shape)} or a batch of shape [batch, {dims}] (or rows of {n} values)"
        if single:
            return f"expected one row of {n} values or a batch [[...], ...] of shape [batch, {dims}]"
        return f"expected one row of {n} values (or shape {list(shape)}) or a batch of shape [batch, {dims}]"

    def match_columns(self, values: np.ndarray, names: list[str] | None, where: str) -> np.ndarray:
        """The columns of a table named ``names`` (a CSV header) in the model's feature order; refused with
        every missing or unknown name listed. Unnamed tables, and models without names, keep their order."""
        if not names or not self.feature_names:
            return values
        try:
            return np.asarray(values)[:, column_order(self.feature_names, names, where)]
        except FeatureMismatch as exc:
            raise InputError(str(exc), "features") from None

    def validate(self, inputs: Any, *, max_batch: int | None = None) -> np.ndarray:
        """Return ``inputs`` as a C-contiguous float32 batch ``[batch, *input_shape]`` or raise InputError.

        Rows may be sent by name (an object, or a list of objects) when the model has feature names."""
        if isinstance(inputs, dict) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], dict)):
            try:
                inputs = rows_by_name([inputs] if isinstance(inputs, dict) else inputs, self.feature_names)
            except FeatureMismatch as exc:
                raise InputError(str(exc), "features") from None
        x = _as_numeric_array(inputs)
        shape = self.input_shape
        n = self.n_features
        if x.ndim == 0:
            raise InputError(f"inputs is a single number; {self._expected(single=True)}", "shape")
        if x.shape == shape or (x.ndim == 1 and x.shape[0] == n):
            batch = x.reshape((1, *shape))
        elif x.ndim >= 2 and tuple(x.shape[1:]) == shape:
            batch = x
        elif x.ndim == 2 and x.shape[1] == n:
            batch = x.reshape((x.shape[0], *shape))
        else:
            if x.size == 0:
                raise InputError("inputs is empty: send at least one row", "empty")
            raise InputError(f"inputs has shape {list(x.shape)}; {self._expected()}", "shape")
        if batch.shape[0] == 0:
            raise InputError("inputs is an empty batch: send at least one row", "empty")
        if max_batch is not None and batch.shape[0] > max_batch:
            raise InputError(f"batch of {batch.shape[0]} rows exceeds the limit of {max_batch}: split it", "too_large")
        if self.fixed_batch is not None and batch.shape[0] != self.fixed_batch:
            raise InputError(f"this model takes exactly {self.fixed_batch} rows per call, got {batch.shape[0]}", "shape")
        finite = np.isfinite(batch)
        if not finite.all():
            rows = np.unique(np.nonzero(~finite.reshape(batch.shape[0], -1))[0])
            shown = ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise InputError(f"inputs contain NaN or infinite values (rows {shown}): send finite numbers", "non_finite")
        if x.dtype != np.float32 and np.abs(batch).max(initial=0.0) > _FLOAT32_MAX:
            raise InputError("inputs contain values outside the float32 range (|x| > 3.4e38)", "non_finite")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs for an already validated float32 batch."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def predict(self, inputs: Any, *, max_batch: int | None = None) -> Prediction:
        """Validate ``inputs`` (one row or a batch) and run the model."""
        batch = self.validate(inputs, max_batch=max_batch)
        outputs = np.asarray(self.run(batch), dtype=np.float32).reshape(batch.shape[0], -1)
        return self.postprocess(outputs)

    def postprocess(self, outputs: np.ndarray) -> Prediction:
        if self.task != "classification":
            return Prediction(outputs=outputs)
        indices = outputs.argmax(axis=1)
        labels = [self.classes[i] if i < len(self.classes) else str(int(i)) for i in indices]
        return Prediction(outputs=outputs, labels=labels, indices=indices, probabilities=softmax(outputs))

    def predict_chunks(self, inputs: np.ndarray, chunk_size: int = 1024, progress: Any = None) -> Prediction:
        """Predict a large validated array in chunks; ``progress(n_done)`` is called after each chunk."""
        batch = self.validate(inputs)
        parts, step = [], max(1, int(chunk_size))
        for start in range(0, batch.shape[0], step):
            chunk = batch[start : start + step]
            parts.append(np.asarray(self.run(chunk), dtype=np.float32).reshape(chunk.shape[0], -1))
            if progress is not None:
                progress(chunk.shape[0])
        return self.postprocess(np.concatenate(parts, axis=0))


def _as_numeric_array(inputs: Any) -> np.ndarray:
    """``inputs`` as a numeric (int/float) ndarray, or an InputError naming what is wrong.

    Python lists are checked element by element (via an object array, at C speed): booleans,
    strings, ``None`` and nested objects are refused instead of being silently coerced to numbers.
    """
    if isinstance(inputs, np.ndarray):
        x = inputs
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            what = "booleans" if x.dtype == np.bool_ else f"values of dtype {x.dtype}"
            raise InputError(f"inputs must contain only numbers, found {what}", "dtype")
        return x
    if isinstance(inputs, (int, float)) and not isinstance(inputs, bool):
        raise InputError("inputs is a single number; expected one row of values or a batch of rows", "shape")
    if not isinstance(inputs, (list, tuple)):
        raise InputError(
            f"inputs must be a list of numbers or a list of rows, got {_json_type(inputs)}", "dtype"
        )
    try:
        obj = np.asarray(inputs, dtype=object)
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"inputs is ragged: every row must have the same number of values ({_first_line(exc)})", "shape"
        ) from exc
    kinds = set(map(type, obj.ravel().tolist()))
    if kinds & {list, tuple}:
        if obj.ndim >= 32:
            raise InputError(f"inputs is nested {obj.ndim}+ levels deep: send one row or a list of rows", "shape")
        raise InputError("inputs is ragged: every row must have the same number of values", "shape")
    bad = kinds - {int, float}
    if bad:
        names = ", ".join(sorted(_json_type_name(k) for k in bad))
        raise InputError(f"inputs must contain only numbers, found {names}", "dtype")
    if obj.size == 0:
        return np.zeros(obj.shape, dtype=np.float32)
    try:
        return obj.astype(np.float64)
    except OverflowError as exc:
        raise InputError("inputs contain an integer too large for float32", "non_finite") from exc


_JSON_NAMES = {bool: "booleans", str: "strings", type(None): "nulls", dict: "objects (mappings)", bytes: "bytes"}


def _json_type_name(kind: type) -> str:
    return _JSON_NAMES.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    return {bool: "a boolean", str: "a string", type(None): "null", dict: "an object (mapping)"}.get(
        type(value), type(value).__name__
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(path: str | os.PathLike[str], provider: str = DEFAULT_PROVIDER, **kwargs: Any) -> OnnxModel:
    """Open an export directory or a model.onnx path (see :class:`OnnxModel`)."""
    return OnnxModel(path, provider, **kwargs)


def predict(path: str | os.PathLike[str], inputs: Any, provider: str = DEFAULT_PROVIDER) -> Prediction:
    """One-shot convenience: open the model and predict ``inputs``."""
    return OnnxModel(path, provider).predict(inputs)


from tinydeploy.serving.batch_io import csv_lines, read_inputs, write_predictions  # noqa: E402  (re-exported)

__all__: Sequence[str] = (
    "csv_lines",
    "read_inputs",
    "write_predictions",
    "InputError",
    "IntegrityError",
    "OnnxModel",
    "Prediction",
    "load",
    "predict",
    "softmax",
)
