"""Per-layer latency of an exported ONNX model, measured with onnxruntime's profiler.

The exporter records, on every ONNX node, the module it came from (node metadata ``namespace``:
``": torch.nn.modules.container.Sequential/3: tinydeploy.model.build.ResidualBlock/..."``). The
profiler's trace gives each node's kernel time per run; ``layer_latency`` sums them by top-level module
of the frozen model (``"standardize"``, ``"0"``, ``"3"``, ...), averaged over the runs, in microseconds.
One thread, CPU execution provider, so the numbers are comparable from layer to layer, not across
machines.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from tinydeploy.serving.providers import import_onnxruntime

#: Timed runs (after one warm-up run) per batch size, the batch sizes, and the seed of the random inputs.
PROFILE_RUNS = 20
PROFILE_BATCHES = (1, 32)
PROFILE_SEED = 0


def node_modules(model_bytes: bytes) -> dict[str, str]:
    """ONNX node name, and each node's output tensor name, -> the top-level module of the frozen model the
    node came from (the exporter's ``namespace`` metadata). onnxruntime's graph optimiser renames the
    nodes it rewrites after their output (``relu_3_nchwc`` for a Conv + ReLU fused into one kernel that
    writes ``relu_3``), hence the output names."""
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    found = {}
    for node in graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        parts = namespace.split("/")
        if len(parts) > 1:
            module = parts[1].split(":")[0].strip()
            found.update({name: module for name in (node.name, *node.output)})
    return found


def _module_of(kernel: str, modules: dict[str, str]) -> str:
    """The module of a profiled kernel name (without ``_kernel_time``); ``"(layout)"`` for the layout
    conversions the optimiser inserts (``ReorderOutput``, ``ReorderInput``) and other unknown nodes."""
    for name in (kernel, kernel.removesuffix("_nchwc")):
        if name in modules:
            return modules[name]
    return "(layout)"


def layer_latency(model_bytes: bytes, x: np.ndarray, runs: int = PROFILE_RUNS) -> dict[str, float]:
    """Top-level module -> mean kernel time per run (microseconds) of its nodes on input ``x``, over
    ``runs`` profiled runs after one warm-up run (whose events are dropped)."""
    ort = import_onnxruntime()

    modules = node_modules(model_bytes)
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(scratch, "profile")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        for _ in range(runs + 1):
            session.run(None, feed)
        events = _events(Path(session.end_profiling()))
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    warm_up_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    totals: dict[str, float] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event["ts"] < warm_up_end:
            continue
        module = _module_of(name[: -len("_kernel_time")], modules)
        totals[module] = totals.get(module, 0.0) + float(event["dur"])
    counted = max(1, len(model_runs) - 1)
    return {module: total / counted for module, total in totals.items()}


def _events(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    finally:
        path.unlink(missing_ok=True)
