"""Stage 2, model: the architecture spec, building a plain PyTorch model from it, per-sample losses,
freezing for export, and safetensors save/load (weights plus the spec, no pickle)."""
