"""Latency and throughput of an export directory's artifacts, measured side by side.

Engines (each only when its file exists and, for the torch ones, when torch is installed):

* ``onnxruntime``      model.onnx, ``InferenceSession.run`` on a float32 numpy batch;
* ``onnxruntime-int8`` model.int8.onnx (written by ``tinydeploy.export.quantize``), same call;
* ``torch-eager``      the frozen model rebuilt from model.safetensors + its spec with the
  preprocessing baked in (``tinydeploy.model.freeze``), called under ``torch.inference_mode()``;
* ``torchscript``      model.ts loaded with ``torch.jit.load``, same call;
* ``torch-export``     model.pt2 loaded with ``torch.export.load``, same call.

The export directory is untrusted: its manifest is verified and every engine loads the bytes that
were hashed. TorchScript and torch.export files can run code when loaded, so their engines run only
with ``trust_pickle=True`` (``--trust-pickle``) and are listed as skipped otherwise.

Fairness rules: every engine runs single-threaded (onnxruntime ``intra_op_num_threads=1`` and
``inter_op_num_threads=1``, ``torch.set_num_threads(1)``; ``threads`` changes both) and all engines
see the same input values. The engines take turns within one process for the whole measurement, so
drifts of the machine (frequency, other load) hit all of them alike. Each engine gets ``warmup``
untimed calls per batch size first; then, per round, every engine makes one untimed call and
``block`` (default 10) timed calls, in an order rotated every round. Alternating engines on every
single call would time each call right after another engine evicted its weights and code from the
CPU caches, which inflates microsecond latencies unevenly; blocks measure the warm steady state a
serving process sees while still spreading drift over all engines. A latency is the wall time of one
call (``time.perf_counter_ns``) on an input already in the engine's native type (numpy array or
torch tensor); throughput is ``batch / mean latency``.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tinydeploy import __version__
from tinydeploy.atomic import write_json
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.artifacts import FORMATS, INPUTS_KEY, INT8_FILE, METADATA_KEYS
from tinydeploy.serving.manifest import read_verified
from tinydeploy.serving.providers import import_onnxruntime
from tinydeploy.serving.runtime import OnnxModel, resolve_model_path

BENCH_FILE = "bench.json"
BENCH_FORMAT = "tinydeploy.bench/1"
DEFAULT_BATCH_SIZES = (1, 32, 256)
DEFAULT_ITERS = 200
DEFAULT_WARMUP = 20
#: Consecutive timed calls per engine before the next engine's turn (see the module doc).
DEFAULT_BLOCK = 10
ENGINE_ORDER = ("onnxruntime", "onnxruntime-int8", "torch-eager", "torchscript", "torch-export")
BASELINE = "torch-eager"

Runner = Callable[[Any], Any]


class Engine:
    """One way of running the model: a callable on the engine's native input, and how to make it."""

    def __init__(self, name: str, file: str, call: Runner, to_native: Callable[[np.ndarray], Any],
                 to_numpy: Callable[[Any], np.ndarray], details: dict[str, Any]) -> None:
        self.name = name
        self.file = file
        self.call = call
        self.to_native = to_native
        self.to_numpy = to_numpy
        self.details = details


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,32,256"`` -> (1, 32, 256), with a one-line error for anything else."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TinyDeployError(f"--batch-sizes must be comma-separated positive integers like 1,32,256; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise TinyDeployError(f"--batch-sizes must be comma-separated positive integers like 1,32,256; got {text!r}")
    return sizes


def _onnx_engine(name: str, directory: Path, file: str, provider: str, threads: int) -> Engine:
    model = OnnxModel(directory, provider, model_file=file, intra_op_num_threads=threads, inter_op_num_threads=1)
    return Engine(
        name, file, model.run, lambda x: np.ascontiguousarray(x, dtype=np.float32), np.asarray,
        {"runtime": "onnxruntime", "providers": model.providers, "size_bytes": model.size_bytes,
         "sha256": model.sha256},
    )


def _torch_engines(directory: Path, manifest: dict[str, Any], threads: int, skipped: dict[str, str],
                   trust_pickle: bool) -> list[Engine]:
    """Eager, TorchScript and torch.export engines (torch imported lazily, here only), each loaded from
    the bytes that ``read_verified`` hashed; TorchScript and torch.export only when ``trust_pickle``."""
    try:
        import torch
    except ImportError:
        for name in ("torch-eager", "torchscript", "torch-export"):
            skipped[name] = "torch is not installed"
        return []
    from tinydeploy.export.torch_formats import load_pt2, load_torchscript
    from tinydeploy.model.freeze import freeze
    from tinydeploy.model.serialization import load_model_bytes, metadata_from_bytes

    torch.set_num_threads(threads)

    def to_tensor(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def wrap(module: Any) -> Runner:
        def call(x: Any) -> Any:
            with torch.inference_mode():
                return module(x)

        return call

    def to_numpy(y: Any) -> np.ndarray:
        return y.detach().numpy()

    base = {"runtime": f"torch {torch.__version__}", "device": "cpu", "threads": threads}
    engines = []
    files = manifest["files"]
    weights = FORMATS["safetensors"]
    if weights in files:
        data = read_verified(directory, manifest, weights)
        model, spec = load_model_bytes(data)
        frozen = freeze(model, spec, preprocessing=metadata_from_bytes(data).get(INPUTS_KEY, "raw") == "raw")
        engines.append(Engine("torch-eager", weights, wrap(frozen), to_tensor, to_numpy,
                              {**base, "loader": "safetensors + spec, tinydeploy.model.freeze"}))
    else:
        skipped["torch-eager"] = f"{weights} is missing"
    for name, fmt, load, loader in (("torchscript", "torchscript", load_torchscript, "torch.jit.load"),
                                    ("torch-export", "pt2", load_pt2, "torch.export.load")):
        file = FORMATS[fmt]
        if file not in files:
            skipped[name] = f"{file} is missing"
        elif not trust_pickle:
            skipped[name] = f"{file} not loaded: {fmt} files can run code when loaded (pass --trust-pickle to measure it)"
        else:
            data = read_verified(directory, manifest, file)
            try:
                module, _ = load(data, METADATA_KEYS)
            except Exception as exc:  # torch raises many types for a corrupt file: report it, bench the rest
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                skipped[name] = f"{file} cannot be loaded ({type(exc).__name__}: {first})"
                continue
            engines.append(Engine(name, file, wrap(module), to_tensor, to_numpy, {**base, "loader": loader}))
    return engines


def _stats(samples_ns: list[int], batch: int) -> dict[str, float]:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "min_ms": float(ms.min()),
        "throughput_rows_per_s": float(batch / (mean / 1e3)) if mean > 0 else float("inf"),
        "iters": len(samples_ns),
    }


def _inputs(model: OnnxModel, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw inputs drawn per feature around the training mean/std when the spec has them."""
    shape = (batch, *model.input_shape)
    prep = (model.spec or {}).get("preprocessing") or {}
    if prep.get("kind") == "standardize" and model.input_space == "raw":
        per_sample = model.input_shape
        if prep.get("per") == "channel":  # one mean/std per channel, shared by every position
            per_sample = (per_sample[0], *[1] * (len(per_sample) - 1))
        mean = np.asarray(prep["mean"], dtype=np.float64).reshape(per_sample)
        std = np.asarray(prep["std"], dtype=np.float64).reshape(per_sample)
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def _restore_threads(previous: int | None) -> None:
    if previous is not None:
        import torch

        torch.set_num_threads(previous)


def run_bench(
    export_dir: str | os.PathLike[str],
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    iters: int = DEFAULT_ITERS,
    warmup: int = DEFAULT_WARMUP,
    threads: int = 1,
    provider: str = "cpu",
    engines: tuple[str, ...] | None = None,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    progress: Callable[[str], None] | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Measure every available engine on ``export_dir``; return the bench.json document."""
    if iters < 1 or warmup < 0 or threads < 1 or block < 1:
        raise TinyDeployError(
            f"--iters must be >= 1, --warmup >= 0, --threads >= 1 and block >= 1 (got {iters}, {warmup}, {threads}, {block})"
        )
    if not batch_sizes or min(batch_sizes) < 1:
        raise TinyDeployError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    directory, _ = resolve_model_path(export_dir)
    say = progress or (lambda message: None)
    wanted = set(engines or ENGINE_ORDER)
    unknown = wanted - set(ENGINE_ORDER)
    if unknown:
        raise TinyDeployError(f"unknown engine(s) {', '.join(sorted(unknown))}: use {', '.join(ENGINE_ORDER)}")
    skipped: dict[str, str] = {}
    reference = OnnxModel(directory, provider)
    built: list[Engine] = [_onnx_engine("onnxruntime", directory, "model.onnx", provider, threads)]
    if INT8_FILE in reference.manifest["files"]:
        built.append(_onnx_engine("onnxruntime-int8", directory, INT8_FILE, provider, threads))
    else:
        skipped["onnxruntime-int8"] = f"{INT8_FILE} is missing (run 'tinydeploy export RUN --quantize int8')"
    torch_version = None
    previous_threads = None
    if wanted & {"torch-eager", "torchscript", "torch-export"}:
        try:
            import torch

            torch_version = torch.__version__
            previous_threads = torch.get_num_threads()
        except ImportError:
            pass
        try:
            built += _torch_engines(directory, reference.manifest, threads, skipped, trust_pickle)
        except BaseException:
            _restore_threads(previous_threads)
            raise
    chosen = [e for e in built if e.name in wanted]
    for name in list(skipped):
        if name not in wanted:
            del skipped[name]
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, Any]] = {e.name: {} for e in chosen}
    agreement: dict[str, dict[str, Any]] = {e.name: {} for e in chosen}
    try:
        for batch in batch_sizes:
            x = _inputs(reference, batch, rng)
            native = {e.name: e.to_native(x) for e in chosen}
            ref = np.asarray(reference.run(x), dtype=np.float32)
            for e in chosen:
                out = e.to_numpy(e.call(native[e.name]))
                diff = float(np.abs(np.asarray(out, dtype=np.float64) - ref).max())
                entry: dict[str, Any] = {"max_abs_diff_vs_onnxruntime": diff}
                if reference.task == "classification":
                    entry["argmax_agreement"] = float(np.mean(np.asarray(out).argmax(1) == ref.argmax(1)))
                agreement[e.name][str(batch)] = entry
            say(f"batch {batch}: warming up {len(chosen)} engines ({warmup} calls each)")
            for _ in range(warmup):
                for e in chosen:
                    e.call(native[e.name])
            say(f"batch {batch}: timing {iters} calls per engine, interleaved in blocks of {block}")
            samples: dict[str, list[int]] = {e.name: [] for e in chosen}
            clock = time.perf_counter_ns
            rounds = -(-iters // block)
            for r in range(rounds):
                shift = r % len(chosen)
                for e in chosen[shift:] + chosen[:shift]:
                    call, arg, times = e.call, native[e.name], samples[e.name]
                    call(arg)  # re-warm caches after the previous engine's block (untimed)
                    for _ in range(min(block, iters - len(times))):
                        start = clock()
                        call(arg)
                        times.append(clock() - start)
            for e in chosen:
                results[e.name][str(batch)] = _stats(samples[e.name], batch)
    finally:
        _restore_threads(previous_threads)

    ratios: dict[str, dict[str, float]] = {}
    if BASELINE in results:
        for e in chosen:
            if e.name == BASELINE:
                continue
            ratios[f"{e.name}/{BASELINE}"] = {
                str(b): results[e.name][str(b)]["p50_ms"] / results[BASELINE][str(b)]["p50_ms"] for b in batch_sizes
            }
    ort = import_onnxruntime()
    return {
        "format": BENCH_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_dir": str(directory.resolve()),
        "model_sha256": reference.sha256,
        "task": reference.task,
        "input_shape": list(reference.input_shape),
        "settings": {
            "batch_sizes": list(batch_sizes),
            "iters": iters,
            "warmup": warmup,
            "threads": threads,
            "onnxruntime_intra_op_num_threads": threads,
            "onnxruntime_inter_op_num_threads": 1,
            "torch_num_threads": threads if torch_version else None,
            "provider": provider,
            "interleaved": True,
            "interleave_block": block,
            "schedule": (
                f"rounds of {block} consecutive timed calls per engine (after 1 untimed re-warm call), "
                "engine order rotated every round"
            ),
            "timed_call": "one forward call on a prepared batch in the engine's native type (numpy / torch tensor)",
            "seed": seed,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "torch": torch_version,
            "numpy": np.__version__,
            "tinydeploy": __version__,
        },
        "engines": {e.name: {"file": e.file, **e.details} for e in chosen},
        "skipped": skipped,
        "results": results,
        "ratios_p50": ratios,
        "agreement": agreement,
    }


def write_bench(document: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``document`` atomically to ``path``."""
    path = Path(path)
    write_json(path, document)
    return path


def bench_table(document: dict[str, Any]) -> list[list[str]]:
    """Rows (engine, batch, p50, p95, p99, throughput, p50 ratio vs eager) for printing."""
    rows = []
    for batch in document["settings"]["batch_sizes"]:
        for name in ENGINE_ORDER:
            stats = document["results"].get(name, {}).get(str(batch))
            if stats is None:
                continue
            ratio = document["ratios_p50"].get(f"{name}/{BASELINE}", {}).get(str(batch))
            rows.append([
                name, str(batch), f"{stats['p50_ms']:.4f}", f"{stats['p95_ms']:.4f}", f"{stats['p99_ms']:.4f}",
                f"{stats['throughput_rows_per_s']:,.0f}",
                "1.00" if name == BASELINE else (f"{ratio:.2f}" if ratio is not None else "-"),
            ])
    return rows


BENCH_HEADER = ("engine", "batch", "p50 ms", "p95 ms", "p99 ms", "rows/s", "p50 / eager")
