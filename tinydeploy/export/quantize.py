"""int8 quantization of an exported ONNX model, gated on task accuracy (onnxruntime.quantization).

``quantize_int8(export_dir)`` writes ``model.int8.onnx`` next to ``model.onnx``:

* method ``"dynamic"`` (default): weights quantized to int8 ahead of time, activations quantized
  per batch at run time; no calibration data, and no activation range that could be wrong on new
  inputs. onnxruntime's dynamic quantizer handles ``MatMul`` but not ``Gemm``, which is what the
  exporter writes for ``nn.Linear``, so every ``Gemm`` is first rewritten as the equivalent
  ``MatMul`` + ``Add`` (weights transposed once; exact in float32);
* method ``"static"``: QDQ format, signed int8 activations and per-channel int8 weights, activation
  ranges calibrated (MinMax) on up to ``CALIBRATION_SAMPLES`` images of the training split, after
  onnxruntime's pre-processing (shape inference and graph optimisation, which fuses Conv + BatchNorm;
  exported graphs have theirs folded already). Convolutions, MatMul and Gemm are quantized;
* method ``"auto"`` (default): ``"static"`` for graphs with convolutions (dynamic quantization would
  leave every Conv in float32), ``"dynamic"`` otherwise.

Latency is measured at batch 1 and batch 32 (one thread each).

The gate runs both models on the test split of the run's dataset (``load_dataset(**data_source)``
recorded in parity.json / the run's metrics.json) and passes when, for classification, the int8
accuracy is at most ``tolerance_pp`` percentage points below fp32 (default 1), or, for regression,
the int8 MSE is at most ``mse_tolerance`` (relative, default 5%) above fp32 (MSE, RMSE, MAE and R^2 of
both are recorded: ``gate["scores"]``). Size and single-thread
latency versus fp32 are measured and reported, not gated, and judged (``int8_gain``): on compact
models int8 is often barely smaller (the graph and metadata dominate the file) and slower (the
quantize/dequantize steps cost more than the small matrix products save), and the report says so
plainly (``gains``, ``verdict``). The model is quantized to a temporary name and renamed to
``model.int8.onnx`` only when the gate passes; the results are merged into parity.json under
``"int8"`` and manifest.json gets the new hashes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tinydeploy.atomic import write_json
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.artifacts import INT8_FILE, PARITY_FILE
from tinydeploy.model.scores import regression_scores
from tinydeploy.serving.manifest import MANIFEST_FILE, STAGING_PREFIX, read_manifest, sha256_file, verify_manifest
from tinydeploy.serving.runtime import MODEL_FILE, OnnxModel, resolve_model_path

METHODS = ("auto", "dynamic", "static")
#: Training images that calibrate the static activation ranges (a seeded random subset).
CALIBRATION_SAMPLES = 1024
#: Batch sizes of the latency measurement.
LATENCY_BATCHES = (1, 32)
DEFAULT_TOLERANCE_PP = 1.0
DEFAULT_MSE_TOLERANCE = 0.05
#: int8 counts as a gain when its file is at most this fraction of fp32's, or its median latency at
#: some measured batch size is at most this fraction of fp32's.
GAIN_SIZE_RATIO = 0.75
GAIN_LATENCY_RATIO = 0.9
QUANT_KEY = "tinydeploy.quantization"
#: Operators the static method quantizes.
STATIC_OPS = ("Conv", "MatMul", "Gemm")


class QuantizationError(TinyDeployError):
    """The int8 model failed the accuracy gate (``result`` holds the measurements); nothing was written."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class QuantizeResult:
    path: Path
    report: dict[str, Any]


# ----- graph preparation ---------------------------------------------------------------------------
def gemm_to_matmul(model: Any) -> int:
    """Rewrite every ``Gemm(A, B, C)`` with constant ``B`` as ``MatMul(A, B') [+ Add C']`` in place.

    ``alpha``/``beta``/``transB`` are folded into new initializers (``transA`` must be 0). Returns the
    number of nodes rewritten. The result is the same function in float32 up to summation order.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    new_nodes = []
    rewritten = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) != 0 or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            weight = weight.T
        weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
        w_name = f"{node.input[1]}.matmul"
        graph.initializer.append(numpy_helper.from_array(weight, w_name))
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{out}.matmul" if has_bias else out
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name or out}.MatMul"))
        if has_bias:
            beta = np.float32(attrs.get("beta", 1.0))
            bias_input = node.input[2]
            if beta != 1.0:
                if bias_input not in inits:
                    new_nodes.pop()
                    graph.initializer.pop()
                    new_nodes.append(node)
                    continue
                bias = numpy_helper.to_array(inits[bias_input]).astype(np.float32) * beta
                bias_input = f"{node.input[2]}.scaled"
                graph.initializer.append(numpy_helper.from_array(bias, bias_input))
            new_nodes.append(helper.make_node("Add", [mm_out, bias_input], [out], name=f"{node.name or out}.Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Drop initializers no node reads any more (the original, transposed weights).
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten


class _Calibration:
    """onnxruntime CalibrationDataReader over a float32 array, in batches."""

    def __init__(self, name: str, X: np.ndarray, batch: int = 64) -> None:
        self.name = name
        self.batches = [X[i : i + batch] for i in range(0, len(X), batch)]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


# ----- data ----------------------------------------------------------------------------------------
def data_source(directory: Path) -> dict[str, Any]:
    """The ``load_dataset`` arguments of the run this export came from (parity.json, else metrics.json)."""
    parity = directory / PARITY_FILE
    if parity.is_file():
        source = json.loads(parity.read_text(encoding="utf-8")).get("inputs", {}).get("data_source")
        if isinstance(source, dict):
            return source
    if (directory / MANIFEST_FILE).is_file():
        run = read_manifest(directory).get("source_run")
        metrics = Path(run) / "metrics.json" if run else None
        if metrics is not None and metrics.is_file():
            source = json.loads(metrics.read_text(encoding="utf-8")).get("data_source")
            if isinstance(source, dict):
                return source
    raise TinyDeployError(
        f"cannot find the dataset of {directory}: neither {PARITY_FILE} nor the source run's metrics.json "
        "records a data_source; re-export the run"
    )


def _model_inputs(model: OnnxModel, X: np.ndarray) -> np.ndarray:
    """``X`` in the space the model expects (raw, or standardised for --no-preprocessing exports)."""
    if model.input_space == "raw":
        return np.ascontiguousarray(X, dtype=np.float32)
    from tinydeploy.data import apply_standardizer

    return apply_standardizer(X, (model.spec or {})["preprocessing"])


def _metric(task: str, outputs: np.ndarray, y: np.ndarray) -> float:
    if task == "classification":
        return float(np.mean(outputs.argmax(axis=1) == y))
    return float(np.mean((outputs.astype(np.float64) - y.reshape(outputs.shape)) ** 2))


def _latency(models: dict[str, OnnxModel], x: np.ndarray, iters: int) -> dict[str, float]:
    """Interleaved single-call p50 latency in ms of each model on ``x``."""
    samples: dict[str, list[int]] = {name: [] for name in models}
    for model in models.values():
        for _ in range(5):
            model.run(x)
    for _ in range(iters):
        for name, model in models.items():
            start = time.perf_counter_ns()
            model.run(x)
            samples[name].append(time.perf_counter_ns() - start)
    return {name: float(np.percentile(np.asarray(v) / 1e6, 50)) for name, v in samples.items()}


# ----- manifest ------------------------------------------------------------------------------------
def amend_manifest(directory: str | os.PathLike[str], files: list[str], command: str) -> None:
    """Record (re)written ``files`` in manifest.json without re-blessing the other entries.

    The caller verified the manifest before writing; only the named files get new hashes, and an
    ``amendments`` entry says who changed them.
    """
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        return
    manifest = read_manifest(directory)
    for name in files:
        path = directory / name
        manifest["files"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest.setdefault("amendments", []).append({
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "files": list(files),
    })
    write_json(directory / MANIFEST_FILE, manifest)


# ----- quantization --------------------------------------------------------------------------------
def quantize_int8(
    export_dir: str | os.PathLike[str],
    *,
    method: str = "auto",
    tolerance_pp: float = DEFAULT_TOLERANCE_PP,
    mse_tolerance: float = DEFAULT_MSE_TOLERANCE,
    per_channel: bool = True,
    latency_iters: int = 200,
    command: str = "",
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize ``export_dir/model.onnx`` to ``model.int8.onnx`` and gate it (see the module doc)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from tinydeploy.data import load_dataset

    say = progress or (lambda message: None)
    if method not in METHODS:
        raise TinyDeployError(f"unknown quantization method '{method}': use one of {', '.join(METHODS)}")
    if not tolerance_pp >= 0 or not mse_tolerance >= 0:
        raise TinyDeployError(f"quantization tolerances must be >= 0, got {tolerance_pp} pp and {mse_tolerance}")
    directory, model_path = resolve_model_path(export_dir)
    if model_path.name != MODEL_FILE:
        raise TinyDeployError(f"pass an export directory holding {MODEL_FILE}, not {model_path}")
    if (directory / MANIFEST_FILE).is_file():
        verify_manifest(directory)
    fp32 = OnnxModel(directory, "cpu", intra_op_num_threads=1, inter_op_num_threads=1)
    source = data_source(directory)
    say(f"loading the {source.get('name')} dataset")
    data = load_dataset(**source)
    X_test = _model_inputs(fp32, data.X_test)
    fp32_out = fp32.run(X_test)

    graph = onnx.load(str(model_path))
    if method == "auto":
        method = "static" if any(node.op_type == "Conv" for node in graph.graph.node) else "dynamic"
    say(f"quantizing ({method})")
    props = {p.key: p.value for p in graph.metadata_props}
    rewritten = 0
    if method == "dynamic":
        rewritten = gemm_to_matmul(graph)
    settings = {
        "method": method,
        "weight_type": "int8",
        "activation_type": "uint8 (dynamic, per batch)" if method == "dynamic" else "int8 (static, calibrated)",
        "per_channel": per_channel,
        "op_types": ["MatMul"] if method == "dynamic" else list(STATIC_OPS),
        "gemm_rewritten_as_matmul": rewritten,
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    tmp = directory / f"{STAGING_PREFIX}{os.getpid()}-{INT8_FILE}"
    prepared = directory / f"{STAGING_PREFIX}{os.getpid()}-prepared.onnx"
    root_logger = logging.getLogger()
    root_level = root_logger.level
    try:
        # onnxruntime.quantization logs a generic "consider pre-processing" warning on the root logger.
        root_logger.setLevel(logging.ERROR)
        if method == "dynamic":
            quantize_dynamic(graph, str(tmp), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                             weight_type=QuantType.QInt8)
        else:
            from onnxruntime.quantization import quant_pre_process

            rows = np.random.default_rng(0).permutation(len(data.X_train))[:CALIBRATION_SAMPLES]
            X_cal = _model_inputs(fp32, data.X_train[np.sort(rows)])
            settings["calibration"] = {"split": "train", "samples": int(len(X_cal)), "method": "MinMax"}
            settings["pre_processing"] = "onnxruntime.quantization.quant_pre_process"
            quant_pre_process(graph, str(prepared))
            quantize_static(str(prepared), str(tmp), _Calibration(fp32.input_name, X_cal),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OPS),
                            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        root_logger.setLevel(root_level)
        quantized = onnx.load(str(tmp))
        del quantized.metadata_props[:]
        onnx.helper.set_model_props(quantized, {**props, QUANT_KEY: json.dumps(settings, sort_keys=True)})
        onnx.save(quantized, str(tmp))
        int8 = OnnxModel(tmp, "cpu", verify=False, intra_op_num_threads=1, inter_op_num_threads=1)

        say("gating int8 against fp32 on the test split")
        int8_out = int8.run(X_test)
        task = fp32.task
        fp32_metric = _metric(task, fp32_out, data.y_test)
        int8_metric = _metric(task, int8_out, data.y_test)
        diff = np.abs(int8_out.astype(np.float64) - fp32_out)
        if task == "classification":
            drop_pp = (fp32_metric - int8_metric) * 100.0
            passed = drop_pp <= tolerance_pp + 1e-9
            gate = {
                "metric": "accuracy", "fp32": fp32_metric, "int8": int8_metric, "drop_pp": drop_pp,
                "tolerance_pp": tolerance_pp, "rule": "fp32 accuracy - int8 accuracy <= tolerance_pp / 100",
                "argmax_agreement": float(np.mean(int8_out.argmax(1) == fp32_out.argmax(1))),
            }
        else:
            increase = (int8_metric - fp32_metric) / max(fp32_metric, 1e-12)
            passed = increase <= mse_tolerance + 1e-12
            gate = {
                "metric": "mse", "fp32": fp32_metric, "int8": int8_metric, "relative_increase": increase,
                "tolerance": mse_tolerance, "rule": "(int8 mse - fp32 mse) / fp32 mse <= tolerance",
                "scores": {"fp32": regression_scores(fp32_out, data.y_test), "int8": regression_scores(int8_out, data.y_test)},
            }
        gate.update({"test_samples": int(len(X_test)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())})
        say("measuring size and latency")
        latency = {"threads": 1}
        for batch in LATENCY_BATCHES:
            x = X_test[: min(batch, len(X_test))]
            measured = _latency({"fp32": fp32, "int8": int8}, x, latency_iters if batch == 1 else max(10, latency_iters // 4))
            latency[f"batch_{len(x)}"] = {**measured, "ratio": measured["int8"] / measured["fp32"]}
        report = {
            "file": INT8_FILE,
            "passed": bool(passed),
            "data_source": source,
            "settings": settings,
            "gate": gate,
            "size": {"fp32_bytes": fp32.size_bytes, "int8_bytes": int8.size_bytes,
                     "ratio": int8.size_bytes / fp32.size_bytes},
            "latency_p50_ms": latency,
            "sha256": int8.sha256,
        }
        report["gains"], report["verdict"] = int8_gain(report)
        if not passed:
            what = (f"accuracy {int8_metric:.4f} vs fp32 {fp32_metric:.4f} (drop {gate.get('drop_pp', 0):.2f} pp > "
                    f"{tolerance_pp:g} pp)" if task == "classification" else
                    f"mse {int8_metric:.4g} vs fp32 {fp32_metric:.4g} (+{100 * gate['relative_increase']:.1f}% > "
                    f"{100 * mse_tolerance:g}%; rmse {gate['scores']['int8']['rmse']:.4g} vs "
                    f"{gate['scores']['fp32']['rmse']:.4g}, r2 {gate['scores']['int8']['r2']:.4f} vs "
                    f"{gate['scores']['fp32']['r2']:.4f})")
            raise QuantizationError(f"int8 gate failed: {what}; {INT8_FILE} was not written", report)
        del int8
        os.replace(tmp, directory / INT8_FILE)
    finally:
        root_logger.setLevel(root_level)
        tmp.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    _record(directory, report, command)
    return QuantizeResult(directory / INT8_FILE, report)


def int8_gain(report: dict[str, Any]) -> tuple[bool, str]:
    """(whether int8 gains anything over fp32, one sentence saying what) from a report's size and latency."""
    size = report["size"]
    latency = {name: entry["ratio"] for name, entry in report["latency_p50_ms"].items() if isinstance(entry, dict)}
    smaller = size["ratio"] <= GAIN_SIZE_RATIO
    faster = [name.replace("_", " ") for name, ratio in latency.items() if ratio <= GAIN_LATENCY_RATIO]
    measured = (f"{size['int8_bytes'] / 1024:.1f} KB vs {size['fp32_bytes'] / 1024:.1f} KB, median latency "
                + ", ".join(f"{ratio:.2f}x fp32 at {name.replace('_', ' ')}" for name, ratio in latency.items()))
    if not smaller and not faster:
        return False, (f"int8 gains nothing on this model ({measured}): serve {MODEL_FILE}; int8 pays off on wider "
                       "layers, where the weights dominate the file and the products the time")
    gains = (["smaller"] if smaller else []) + ([f"faster at {', '.join(faster)}"] if faster else [])
    return True, f"int8 is {' and '.join(gains)} ({measured})"


def _record(directory: Path, report: dict[str, Any], command: str) -> None:
    """Merge ``report`` into parity.json under "int8" and record the new hashes in the manifest."""
    parity_path = directory / PARITY_FILE
    if parity_path.is_file():
        parity = json.loads(parity_path.read_text(encoding="utf-8"))
        parity["int8"] = report
        write_json(parity_path, parity)
        written = [INT8_FILE, PARITY_FILE]
    else:
        write_json(directory / "quant.json", {"int8": report})
        written = [INT8_FILE, "quant.json"]
    amend_manifest(directory, written, command or "tinydeploy.export.quantize.quantize_int8")
