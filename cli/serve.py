"""`tinydeploy serve`, `predict` and `bench`: thin commands over tinydeploy.serving.server / runtime / bench.

Importing this module imports no torch (nor onnxruntime): serve and predict run on onnxruntime only
and import it when they run; bench imports torch inside the command to measure the PyTorch engines
when torch is installed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from cli.app import app, reports_errors
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.artifacts import TRUST_HELP
from tinydeploy.serving.limits import DEFAULT_BODY_TIMEOUT_S
from tinydeploy.serving.providers import DEFAULT_PROVIDER, PROVIDER_HELP

_PROVIDER_HELP = PROVIDER_HELP
#: Inputs with more rows than this get a progress bar.
_PROGRESS_ROWS = 8192
_NO_VERIFY_HELP = ("Skip manifest.json: load model.onnx without checking any hash (unsafe: tampered or truncated "
                   "files go undetected; a loud warning is printed).")


@app.command("serve")
@reports_errors
def serve_command(
    export_dir: Path = typer.Argument(..., help="Export directory written by 'tinydeploy export --onnx' (or a .onnx file)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    provider: str = typer.Option(DEFAULT_PROVIDER, "--provider", help=_PROVIDER_HELP),
    workers: int = typer.Option(1, "--workers", help="uvicorn worker processes (each loads the model; metrics are per worker)."),
    max_batch: int = typer.Option(1024, "--max-batch", help="Largest batch accepted per request (larger gets 413)."),
    body_timeout: float = typer.Option(
        DEFAULT_BODY_TIMEOUT_S, "--body-timeout", help="Seconds a client gets to send a request body (slower gets 408)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help=_NO_VERIFY_HELP),
) -> None:
    """Serve an exported model over HTTP with onnxruntime (no torch needed).

    The directory must hold a manifest.json whose hashes match (written by 'tinydeploy export');
    requests are bounded before they are parsed (body size and time, JSON depth, numbers, batch).

    Example: tinydeploy serve runs/digits/artifacts --port 8000
    """
    from tinydeploy.serving.server import serve

    serve(export_dir, host=host, port=port, provider=provider, workers=workers, max_batch=max_batch,
          verify=not no_verify, body_timeout_s=body_timeout)


@app.command("predict")
@reports_errors
def predict_command(
    export_dir: Path = typer.Argument(..., help="Export directory written by 'tinydeploy export --onnx' (or a .onnx file)."),
    input: Path = typer.Option(..., "--input", "-i", help="Inputs: .npy, .npz (--key or first array), numeric .csv "
                               "(a header naming the columns puts them in the model's order), .json (an object with "
                               "\"inputs\", as POST /v1/predict takes it), or for a model grown on images an "
                               "image file or a folder of images."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write .npy (raw outputs), .csv (label + probabilities) or .json (default: CSV to stdout)."
    ),
    key: Optional[str] = typer.Option(None, "--key", help="Array to read from an .npz input (default: the first)."),
    provider: str = typer.Option(DEFAULT_PROVIDER, "--provider", help=_PROVIDER_HELP),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Rows per onnxruntime call."),
    no_verify: bool = typer.Option(False, "--no-verify", help=_NO_VERIFY_HELP),
) -> None:
    """Batch inference on a file of raw inputs, in chunks, with a progress bar on large inputs.

    Example: tinydeploy predict runs/digits/artifacts --input rows.csv --output predictions.csv
    """
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tinydeploy.serving.batch_io import load_inputs
    from tinydeploy.serving.runtime import NO_VERIFY_WARNING, OnnxModel, csv_lines, write_predictions

    if chunk_size < 1:
        raise TinyDeployError(f"--chunk-size must be at least 1, got {chunk_size}")
    if output is not None and output.suffix.lower() not in (".npy", ".csv", ".json"):
        raise TinyDeployError(f"--output {output}: unsupported file type '{output.suffix}': use .npy, .csv or .json")
    model = OnnxModel(export_dir, provider, verify=not no_verify)
    err = Console(stderr=True)
    if no_verify:
        err.print(NO_VERIFY_WARNING.format(path=model.model_path), markup=False, highlight=False, style="bold red")
    data, names = load_inputs(input, model, key)
    batch = model.validate(data)  # whole file checked before any work: errors name the rows
    n = int(batch.shape[0])
    start = time.perf_counter()
    if n > _PROGRESS_ROWS:
        columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("predict", total=n)
            prediction = model.predict_chunks(batch, chunk_size, progress=lambda k: bar.advance(task, k))
    else:
        prediction = model.predict_chunks(batch, chunk_size)
    seconds = time.perf_counter() - start
    if output is None:
        sys.stdout.write("".join(csv_lines(prediction, model, names)))
    else:
        write_predictions(output, prediction, model, names)
    where = f" -> {output}" if output is not None else ""
    err.print(
        f"predicted {n} rows in {seconds:.3f}s ({n / max(seconds, 1e-9):,.0f} rows/s) on "
        f"{', '.join(p.removesuffix('ExecutionProvider') for p in model.providers)}{where}",
        highlight=False,
    )


@app.command("bench")
@reports_errors
def bench_command(
    export_dir: Path = typer.Argument(..., help="Export directory written by 'tinydeploy export --onnx'."),
    batch_sizes: str = typer.Option("1,32,256", "--batch-sizes", help="Comma-separated batch sizes."),
    iters: int = typer.Option(200, "--iters", help="Timed calls per engine and batch size (interleaved)."),
    warmup: int = typer.Option(20, "--warmup", help="Untimed calls per engine and batch size first."),
    threads: int = typer.Option(1, "--threads", help="Threads of every engine (onnxruntime intra-op and torch)."),
    provider: str = typer.Option(DEFAULT_PROVIDER, "--provider", help=_PROVIDER_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write bench.json (default: EXPORT_DIR/bench.json)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
) -> None:
    """Latency p50/p95/p99 and throughput: onnxruntime vs PyTorch eager vs TorchScript (vs int8), side by side.

    Example: tinydeploy bench runs/digits/artifacts --batch-sizes 1,64 --trust-pickle
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from tinydeploy.export.bench import BENCH_FILE, BENCH_HEADER, bench_table, parse_batch_sizes, run_bench, write_bench
    from tinydeploy.serving.runtime import resolve_model_path

    sizes = parse_batch_sizes(batch_sizes)
    directory, _ = resolve_model_path(export_dir)
    err = Console(stderr=True)
    document = run_bench(
        directory, sizes, iters=iters, warmup=warmup, threads=threads, provider=provider,
        progress=lambda message: err.print(f"[dim]{message}...[/dim]"), trust_pickle=trust_pickle,
    )
    path = write_bench(document, out or directory / BENCH_FILE)
    if path.resolve().parent == directory.resolve():
        import shlex
        import sys

        from tinydeploy.export.quantize import amend_manifest

        amend_manifest(directory, [path.name], shlex.join(["tinydeploy", *sys.argv[1:]]))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in BENCH_HEADER:
        table.add_column(column, justify="left" if column == "engine" else "right", no_wrap=True)
    for row in bench_table(document):
        table.add_row(*row)
    console = Console()
    console.print(table)
    settings = document["settings"]
    threads = f"onnxruntime intra_op_num_threads={settings['onnxruntime_intra_op_num_threads']}"
    if settings["torch_num_threads"]:
        threads += f", torch.set_num_threads({settings['torch_num_threads']})"
    console.print(
        f"{settings['iters']} timed calls per engine and batch size after {settings['warmup']} warm-up calls, engines "
        f"interleaved in blocks of {settings['interleave_block']} in one process; {threads}. "
        "rows/s = batch / mean latency.",
        highlight=False,
    )
    for name, reason in document["skipped"].items():
        console.print(f"skipped {name}: {reason}", highlight=False)
    console.print(f"wrote {path}", highlight=False)
