"""Stage 6, serving: manifests, onnxruntime providers and runtime, the HTTP server and the edge
entry point. Imports no torch and no other tinydeploy sub-package: only numpy, onnxruntime,
uvicorn, the standard library and the common modules ``tinydeploy.errors`` and
``tinydeploy.atomic``. The container recipe copies exactly this sub-package and those modules."""
