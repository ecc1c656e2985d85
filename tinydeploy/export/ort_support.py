"""What the installed onnxruntime loads: its newest ONNX IR version and default-domain opset.

onnxruntime has no API for these limits and recent ``onnx`` releases write IR versions that older
onnxruntime releases reject, so they are measured: tiny one-node models stamped with decreasing
versions are loaded until one succeeds (a few milliseconds, cached per process).
"""

from __future__ import annotations

import functools

import onnx
from onnx import TensorProto, helper

from tinydeploy.serving.providers import CPU, import_onnxruntime, quiet_session_options

ort = import_onnxruntime()

#: Oldest versions probed; anything older is not worth exporting to.
_OLDEST_IR = 7
_OLDEST_OPSET = 13


def _loads(ir_version: int, opset: int) -> bool:
    """Whether onnxruntime creates a CPU session for a Relu model stamped (ir_version, opset)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    options = quiet_session_options()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=[CPU])
    except Exception:  # onnxruntime reports unsupported versions as a generic Fail
        return False
    return True


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads."""
    for ir_version in range(onnx.IR_VERSION, _OLDEST_IR - 1, -1):
        if _loads(ir_version, _OLDEST_OPSET):
            return ir_version
    raise RuntimeError(f"onnxruntime {ort.__version__} loads no IR version >= {_OLDEST_IR}")


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (and onnx knows)."""
    for opset in range(onnx.defs.onnx_opset_version(), _OLDEST_OPSET - 1, -1):
        needed_ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
        if needed_ir <= max_ir_version() and _loads(max(needed_ir, _OLDEST_IR), opset):
            return opset
    raise RuntimeError(f"onnxruntime {ort.__version__} loads no opset >= {_OLDEST_OPSET}")
