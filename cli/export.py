"""`tinydeploy export`, `verify` and `report`: thin commands over tinydeploy.export.pipeline / verify / report.

Importing this module imports no torch: the export pipeline (torch) and the parity gate are imported
inside the commands, so ``verify --hashes-only`` and ``report`` of an export directory stay torch-free.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cli.app import EXIT_CHECK_FAILED, app, fail, reports_errors
from tinydeploy.export.artifacts import FORMATS, OPTIONAL_FORMATS, TRUST_HELP, parse_formats
from tinydeploy.export.parity import DEFAULT_ATOL, DEFAULT_RTOL
from tinydeploy.serving.providers import DEFAULT_PROVIDER, PROVIDER_HELP

if TYPE_CHECKING:
    from tinydeploy.export.parity import FormatParity

_PROVIDER_HELP = PROVIDER_HELP.replace("provider:", "provider of the parity gate:")


def _size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "-"
    if n_bytes < 1024:
        return f"{n_bytes} B"
    return f"{n_bytes / 1024:.1f} KB" if n_bytes < 1024**2 else f"{n_bytes / 1024**2:.1f} MB"


#: Short names of the runtimes that reload each format.
_LOADERS = {"safetensors": "safetensors", "torchscript": "torch.jit", "pt2": "torch.export"}


def _runtime(result: FormatParity) -> str:
    """The runtime that reloaded the artifact, with onnxruntime's providers that really ran."""
    providers = result.runtime.get("providers")
    if providers:
        return "onnxruntime " + ",".join(p.removesuffix("ExecutionProvider") for p in providers)
    return _LOADERS.get(result.format, result.format)


def _parity_table(results: list[FormatParity], sizes: dict[str, int] | None = None, hash_only: tuple[str, ...] = ()) -> Table:
    """One row per format: size, runtime, max abs diff, test scores of the artifact (accuracy next to
    the frozen model's; or RMSE and R^2, with the frozen model's RMSE, MAE and R^2 in the caption: the
    table fits 80 columns), verdict; then one row per artifact checked by hash only (not loaded)."""
    regression = next((r.metric["scores"] for r in results if r.metric.get("scores")), None)
    scores = ("rmse", "r2") if regression else ("acc", "frozen")
    caption = None
    if regression:
        frozen = regression["frozen"]
        caption = f"frozen model on the test split: rmse {frozen['rmse']:.4g}, mae {frozen['mae']:.4g}, r2 {frozen['r2']:.4f}"
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, caption=caption, caption_justify="left")
    for column in ("format", "size", "runtime", "max |diff|", *scores, "parity"):
        table.add_column(column, justify="left" if column in ("format", "runtime") else "right", no_wrap=True)
    for r in results:
        if r.metric and regression:
            mine = r.metric["scores"]["artifact"]
            values: tuple[str, ...] = (f"{mine['rmse']:.4g}", f"{mine['r2']:.4f}")
        elif r.metric:
            values = (f"{r.metric['artifact']:.4f}", f"{r.metric['frozen']:.4f}")
        else:
            values = ("-",) * len(scores)
        diff = f"{r.max_abs_diff:.1e}" if r.checks else "-"
        verdict = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.format, _size((sizes or {}).get(r.format)), _runtime(r), diff, *values, verdict)
    for fmt in hash_only:
        table.add_row(fmt, _size((sizes or {}).get(fmt)), "not loaded", "-", *("-",) * len(scores), "[yellow]HASH[/yellow]")
    return table


def _line(console: Console, text: str) -> None:
    """Print plain text (no rich markup or highlighting: paths may contain brackets)."""
    console.print(text, markup=False, highlight=False)


def _formats(onnx: bool, torchscript: bool, pt2: bool, formats: Optional[str]) -> tuple[str, ...]:
    flagged = [name for name, on in (("onnx", onnx), ("torchscript", torchscript), ("pt2", pt2)) if on]
    listed = list(parse_formats((formats or "").split(",")))
    return tuple(flagged + listed) or ("onnx",)


@app.command("export")
@reports_errors
def export_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by 'tinydeploy grow --out'."),
    onnx: bool = typer.Option(False, "--onnx", help="Write model.onnx (the default when no format is chosen)."),
    torchscript: bool = typer.Option(False, "--torchscript", help="Write model.ts (TorchScript)."),
    pt2: bool = typer.Option(False, "--pt2", help="Write model.pt2 (torch.export)."),
    formats: Optional[str] = typer.Option(
        None, "--formats", help=f"Comma-separated formats: {', '.join(OPTIONAL_FORMATS)} (safetensors is always written)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Export directory (default: RUN_DIR/artifacts)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 18; the range is checked)."),
    no_preprocessing: bool = typer.Option(
        False, "--no-preprocessing", help="Leave the standardisation out: clients send standardised features."
    ),
    atol: float = typer.Option(DEFAULT_ATOL, "--atol", help="Absolute tolerance of the parity gate."),
    rtol: float = typer.Option(DEFAULT_RTOL, "--rtol", help="Relative tolerance of the parity gate."),
    provider: str = typer.Option(DEFAULT_PROVIDER, "--provider", help=_PROVIDER_HELP),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="'int8': also write model.int8.onnx, kept only within 1 accuracy point of fp32 (needs ONNX)."
    ),
    triton: Optional[Path] = typer.Option(None, "--triton", help="Also write a Triton model repository entry under this directory."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export directory whole (files this "
                               "export does not write are removed)."),
) -> None:
    """Freeze a grown run, export it, check every artifact's parity, write reports and a manifest.

    Example: tinydeploy export runs/digits --onnx --torchscript --pt2 --quantize int8
    """
    from tinydeploy.export.parity import ParityError
    from tinydeploy.export.pipeline import export_run

    console, progress = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    chosen = _formats(onnx, torchscript, pt2, formats)
    if quantize not in (None, "int8"):
        fail(f"--quantize {quantize!r} is not supported: use int8")
    if (quantize or triton) and "onnx" not in chosen:
        fail("--quantize and --triton work on model.onnx: add --onnx")
    command = shlex.join(["tinydeploy", *sys.argv[1:]])
    try:
        result = export_run(
            run_dir, out, chosen, opset, not no_preprocessing, atol, rtol, command, provider,
            progress=lambda message: progress.print(f"{message}...", markup=False, highlight=False, style="dim"),
            force=force,
        )
    except ParityError as exc:
        console.print(_parity_table(exc.results))
        fail(str(exc), EXIT_CHECK_FAILED)
    onnx_note = f", opset {result.opset}" if result.opset else ""
    inputs = "standardised features" if no_preprocessing else "raw features"
    where = shlex.quote(str(result.out_dir))
    for warning in result.warnings:
        progress.print(f"warning: {warning}", markup=False, highlight=False, style="bold yellow")
    _line(console, f"Exported {run_dir} -> {result.out_dir} (inputs: {inputs}{onnx_note})"
                   + ("" if result.run_status == "complete" else f" [run status: {result.run_status}]"))
    console.print(_parity_table(result.parity, result.sizes))
    _line(console, f"Export complete ({result.seconds:.1f}s), every format within atol {atol:g} + rtol {rtol:g} x |frozen|")
    _line(console, f"Width report: {result.out_dir / 'width_report.md'}")
    _line(console, f"Verify:       tinydeploy verify {where}")
    if "onnx" in result.files:
        _line(console, f"Serve:        tinydeploy serve {where}")
    if quantize:
        from tinydeploy.export.quantize import QuantizationError, quantize_int8

        try:
            report = quantize_int8(result.out_dir, command=command).report
        except QuantizationError as exc:
            fail(str(exc), EXIT_CHECK_FAILED)
        gate = report["gate"]
        scores = f"{gate['metric']} {gate['int8']:.4g} vs fp32 {gate['fp32']:.4g}"
        if report["gains"]:
            _line(console, f"int8:         {result.out_dir / 'model.int8.onnx'} ({scores}): {report['verdict']}")
        else:
            progress.print(f"note: int8 brings no gain: {result.out_dir / 'model.int8.onnx'} passes the accuracy gate "
                           f"({scores}) but {report['verdict']}", markup=False, highlight=False, style="yellow")
    if triton:
        from tinydeploy.export.triton import write_triton_repo

        _line(console, f"Triton:       {write_triton_repo(result.out_dir, triton)}")


@app.command("verify")
@reports_errors
def verify_command(
    directory: Path = typer.Argument(..., help="Export directory written by 'tinydeploy export'."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default: the one the export used)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (default: the one the export used)."),
    provider: str = typer.Option(DEFAULT_PROVIDER, "--provider", help=_PROVIDER_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
    hashes_only: bool = typer.Option(
        False, "--hashes-only", help="Check the manifest hashes only (no artifact is loaded; no torch needed)."
    ),
) -> None:
    """Check the manifest hashes, reload every safe artifact from the hashed bytes and re-run the parity gate.

    Every file must be listed in manifest.json and match its sha256; symbolic links are refused.
    safetensors and ONNX are reloaded and gated. model.ts and model.pt2 can run code when loaded, so
    they are checked by hash only unless --trust-pickle is given.

    Example: tinydeploy verify runs/digits/artifacts --hashes-only
    """
    from tinydeploy.export.parity import ParityError
    from tinydeploy.export.verify import verify_export

    console = Console(soft_wrap=True)
    try:
        result = verify_export(directory, atol, rtol, provider, trust_pickle=trust_pickle, hashes_only=hashes_only)
    except ParityError as exc:
        console.print(_parity_table(exc.results))
        fail(str(exc), EXIT_CHECK_FAILED)
    sizes = result.files
    console.print(_parity_table(result.parity, sizes, tuple(result.hash_only)))
    if hashes_only:
        _line(console, f"Verified {directory}: manifest hashes match ({len(sizes)} artifacts, none loaded)")
        return
    not_loaded = [FORMATS[fmt] for fmt in result.hash_only]
    _line(
        console,
        f"Verified {directory}: manifest hashes match, {len(result.parity)} artifacts within "
        f"atol {result.atol:g} + rtol {result.rtol:g} x |frozen|"
        + (f"; {', '.join(not_loaded)} checked by hash only (pass --trust-pickle to load them)" if not_loaded else ""),
    )


@app.command("report")
@reports_errors
def report_command(
    directory: Path = typer.Argument(..., help="Export directory or run directory."),
) -> None:
    """Print the per-layer width report.

    Example: tinydeploy report runs/digits/artifacts
    """
    from tinydeploy.export.width_report import report_table

    typer.echo(report_table(directory))

