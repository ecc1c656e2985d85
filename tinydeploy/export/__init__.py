"""Stage 5, export: artifact formats, the parity gate, verification, width reports, int8
quantization, the Triton repository and engine benchmarks. Imports torch lazily where it can, so
torch-free helpers (e.g. the Triton writer) stay importable on a serving machine."""
