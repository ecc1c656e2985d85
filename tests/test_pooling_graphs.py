"""The model's average pools in traced, scripted and exported graphs: torch's own AveragePool, never the
strided views of eager runs (``tinydeploy.model.pooling``). Apart from ``test_pooling.py`` because
mutation testing cannot script a module whose methods it has instrumented."""

from __future__ import annotations

import torch
from torch import nn

from tinydeploy.model.pooling import AvgPool2d


def test_scripted_and_exported_graphs_hold_torchs_average_pool() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), AvgPool2d(2)).eval()
    x = torch.randn(32, 1, 28, 28)  # 32 x 8 x 28 x 28 values reach the pool: the strided path when eager
    scripted = torch.jit.script(model)
    assert "avg_pool2d" in str(scripted.inlined_graph)
    assert torch.equal(scripted(x), model(x))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("avg_pool2d" in op for op in ops) and not any("slice" in op for op in ops)
    traced = torch.jit.trace(model, x)
    assert "avg_pool2d" in str(traced.inlined_graph)
