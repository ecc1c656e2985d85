"""``tinydeploy grow``: a few lines over ``tinydeploy.training.job.run_grow`` plus a progress bar and a summary."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.app import app, reports_errors
from tinydeploy.errors import TinyDeployError
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import GrowResult, check_run_dir, default_run_dir, prepare_grow, prepare_resume
from tinydeploy.training.job import Progress as GrowProgress

_DEFAULTS = GrowConfig()


def parse_widths(text: str) -> list[int]:
    """'1,1' -> [1, 1], with a one-line error for anything else."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise TinyDeployError(f"--init-widths must be comma-separated positive integers like 1,1; got '{text}'") from None
    if not widths or min(widths) < 1:
        raise TinyDeployError(f"--init-widths must be comma-separated positive integers like 1,1; got '{text}'")
    return widths


def _summary(result: GrowResult, console: Console) -> None:
    m = result.metrics
    table = Table(title=f"grown {m['dataset']} network ({m['method']}, stop: {m['stop_reason']})")
    for column in ("", "widths", "params", "MACs"):
        table.add_column(column)
    table.add_row("initial", str(m["initial_widths"]), str(m["initial_params"]), "")
    table.add_row("final", str(m["final_widths"]), str(m["params"]), str(m["macs"]))
    console.print(table)
    key = "accuracy" if m["task"] == "classification" else "mse"
    scores = ", ".join(f"{split} {key} {m['metrics'][split][key]:.4f}" for split in ("train", "val", "test"))
    wall = m["wall_time_s"]
    console.print(f"{scores}\nwall time {wall['total']:.1f} s (training {wall['training']:.1f} s, "
                  f"growth {wall['growth']:.1f} s)\nrun directory: {result.run_dir}\n"
                  f"next: tinydeploy export {result.run_dir} --onnx")


def _given(ctx: typer.Context) -> dict[str, object]:
    """The options the user typed (not defaults), by parameter name."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}  # typer's own click: compare by name
    return {name: value for name, value in ctx.params.items()
            if sources[name] is not None and sources[name].name not in ("DEFAULT", "DEFAULT_MAP")}


def _as_arguments(ctx: typer.Context, given: dict[str, object]) -> list[str]:
    """``given`` written back as command-line arguments (to hand them to torchrun's processes)."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name not in given:
            continue
        value = given[param.name]
        if getattr(param, "is_flag", False):
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _launch(ctx: typer.Context, cfg: GrowConfig, nproc: int, out: Optional[Path], resume: Optional[Path],
            force: bool) -> None:
    """--nproc N: check what can be checked here, then run the same command under torchrun."""
    from tinydeploy.training import distributed

    if distributed.in_torchrun():
        raise TinyDeployError("--nproc starts torchrun itself: drop it when launching with torchrun")
    given = {k: v for k, v in _given(ctx).items() if k != "nproc"}
    if resume is None:
        cfg.validate()
        out = out if out is not None else default_run_dir(cfg.dataset)
        check_run_dir(out, force)
        given["out"] = out
    code = distributed.launch(nproc, _as_arguments(ctx, given))
    if code:
        where = resume if resume is not None else out
        raise TinyDeployError(f"the {nproc}-process grow stopped (exit code {code}; the failing process's error is "
                              f"above); its last checkpoint is kept: resume with 'tinydeploy grow --resume {where} "
                              f"--nproc {nproc}'")


@app.command()
@reports_errors
def grow(
    ctx: typer.Context,
    dataset: str = typer.Option(_DEFAULTS.dataset, help="digits | mnist1d | moons | spirals | sine | mnist | "
                                "fashion-mnist | cifar10 | cifar100, or a path to a .npz / .csv file."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<dataset>-<timestamp>)."),
    force: bool = typer.Option(False, help="Overwrite a non-empty --out directory."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding torchvision's MNIST/CIFAR files."),
    target: Optional[str] = typer.Option(None, help="Label column of a .csv dataset."),
    method: str = typer.Option(_DEFAULTS.method, help="Growth method: tiny | gradmax | random."),
    init_widths: str = typer.Option("1,1", help="Initial hidden widths, comma-separated."),
    activation: str = typer.Option(_DEFAULTS.activation, help="relu | selu | tanh | gelu (sigma(0) must be 0)."),
    grow_every: float = typer.Option(_DEFAULTS.grow_every, help="Epochs of training between growth steps (fractions allowed)."),
    max_growth_epochs: float = typer.Option(_DEFAULTS.max_growth_epochs, help="Stop growing after this many epochs."),
    final_epochs: float = typer.Option(_DEFAULTS.final_epochs, help="Epochs of training after growth stops."),
    neurons_per_step: int = typer.Option(_DEFAULTS.neurons_per_step, help="Most neurons added to a layer per step."),
    layers_per_step: Optional[int] = typer.Option(None, help="Most layers grown per step (default: all)."),
    max_params: Optional[int] = typer.Option(None, help="Parameter budget (default: per built-in dataset, none for files)."),
    max_width: Optional[int] = typer.Option(None, help="Largest width of any hidden layer."),
    target_accuracy: Optional[float] = typer.Option(None, help="Stop growing once validation accuracy reaches this fraction."),
    patience: int = typer.Option(_DEFAULTS.patience, help="Stop after this many growth steps in a row with no significant neuron."),
    lr: float = typer.Option(_DEFAULTS.lr, help="Adam learning rate."),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, help="Training mini-batch size."),
    weight_decay: float = typer.Option(_DEFAULTS.weight_decay, help="Adam weight decay."),
    input_noise: Optional[float] = typer.Option(None, help="Std of Gaussian noise on standardised training inputs "
                                                "(default: 0.3 for digits, 0 otherwise)."),
    split_seed: int = typer.Option(_DEFAULTS.split_seed, help="Seed of the train/validation/test splits."),
    seed: int = typer.Option(_DEFAULTS.seed, help="Seed of initialisation, batching and growth."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: 1 for budgets <= 100k params)."),
    device: str = typer.Option(_DEFAULTS.device, help="auto | cpu | cuda (auto picks CUDA when usable)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this directory (its saved "
                                          "options apply; on CPU with the same threads the result is bit-identical)."),
    checkpoint_every: float = typer.Option(_DEFAULTS.checkpoint_every, help="Minutes between checkpoints during long "
                                           "training phases (one is also written after every growth step)."),
    nproc: Optional[int] = typer.Option(None, help="Grow with N processes (torchrun; gloo on CPU, NCCL with one GPU "
                                        "per process); --batch-size stays the global batch."),
) -> None:
    """Start at width 1 and grow a compact MLP with TINY while it trains; write a run directory."""
    cfg = GrowConfig(
        dataset=dataset, data_dir=data_dir, target=target, split_seed=split_seed, method=method,
        init_widths=parse_widths(init_widths), activation=activation, grow_every=grow_every,
        max_growth_epochs=max_growth_epochs, final_epochs=final_epochs, neurons_per_step=neurons_per_step,
        layers_per_step=layers_per_step, max_params=max_params, max_width=max_width,
        target_accuracy=target_accuracy, patience=patience, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, input_noise=input_noise, device=device, threads=threads, seed=seed,
        checkpoint_every=checkpoint_every,
    )
    if nproc is not None:
        return _launch(ctx, cfg, nproc, out, resume, force)
    command = shlex.join(["tinydeploy", *sys.argv[1:]])
    if resume is not None:
        if out is not None or force:
            raise TinyDeployError("--resume continues the run in its own directory: drop --out and --force")
        fields = set(GrowConfig.__dataclass_fields__)
        given = {k: (parse_widths(v) if k == "init_widths" else v) for k, v in _given(ctx).items() if k in fields}
        job = prepare_resume(resume, given, command=command)
    else:
        job = prepare_grow(cfg, out, force=force, command=command)
    if not job.is_main:
        job.run()
        return
    console = Console(stderr=True)
    for notice in job.notices:
        console.print(f"[yellow]note:[/yellow] {notice}")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("epoch {task.completed:.2f}/{task.total:.0f}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("grow", total=cfg.max_growth_epochs + cfg.final_epochs, status="")

        def show(p: GrowProgress) -> None:
            bar.update(task, description=p.phase, completed=p.epoch, total=max(p.total_epochs, p.epoch),
                       status=f"loss {p.train_loss:.3f} {p.metric_name} {p.val_metric:.4f} "
                              f"widths {p.widths} params {p.params}")

        result = job.run(show)
    if result.metrics["status"] == "interrupted":
        console.print(f"interrupted at epoch {result.metrics['epochs']:.2f}; resume with: "
                      f"tinydeploy grow --resume {result.run_dir}")
        raise typer.Exit(130)
    _summary(result, Console())
