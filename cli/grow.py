"""``tinydeploy grow``: a few lines over ``tinydeploy.training.job.run_grow`` plus a progress bar and a summary."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from cli.app import app, reports_errors
from tinydeploy.errors import TinyDeployError
from tinydeploy.training.config import RECIPES, GrowConfig, parse_fraction
from tinydeploy.training.job import GrowResult, check_run_dir, default_run_dir, prepare_grow, prepare_resume
from tinydeploy.training.job import Progress as GrowProgress

_DEFAULTS = GrowConfig()


def parse_widths(text: str, option: str = "--init-widths", minimum: int = 1) -> list[int]:
    """'1,1' -> [1, 1], with a one-line error for anything else."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < minimum:
        kind = "positive" if minimum > 0 else "non-negative"
        raise TinyDeployError(f"{option} must be comma-separated {kind} integers like 1,1; got '{text}'")
    return widths


def _optional_list(text: str | None, option: str, minimum: int = 1) -> list[int] | None:
    return None if text is None else parse_widths(text, option, minimum)


def _recipe_help(text: str, key: str) -> str:
    return f"{text} (default: {RECIPES['mlp'][key]:g} for MLPs, {RECIPES['cnn'][key]:g} for CNNs)."


def _scores(m: dict, split: str) -> str:
    """'accuracy 0.9611' or 'rmse 53.2, mae 43.1, r2 0.47' for one split of a run's metrics."""
    values = m["metrics"][split]
    if m["task"] == "classification":
        return f"accuracy {values['accuracy']:.4f}"
    if "rmse" not in values:
        return f"mse {values['mse']:.4g}"
    return f"rmse {values['rmse']:.4g}, mae {values['mae']:.4g}, r2 {values['r2']:.4f}"


def _summary(result: GrowResult, console: Console) -> None:
    m = result.metrics
    console.print(f"grown {m['dataset']} network ({m['method']}, stop: {m['stop_reason']})", highlight=False)
    table = Table()
    for column in ("", "widths", "params", "MACs"):
        table.add_column(column)
    table.add_row("initial", str(m["initial_widths"]), str(m["initial_params"]), "")
    table.add_row("final", str(m["final_widths"]), str(m["params"]), str(m["macs"]))
    console.print(table)
    for split in ("train", "val", "test"):
        console.print(f"{split:5} {_scores(m, split)}", highlight=False)
    wall = m["wall_time_s"]
    if "linear_regions" in m:
        console.print(f"linear regions {m['linear_regions']} (distinct ReLU patterns, {m['region_grid']}^2 grid)",
                      highlight=False)
    console.print(f"wall time {wall['total']:.1f} s (training {wall['training']:.1f} s, growth {wall['growth']:.1f} s)\n"
                  f"run directory: {result.run_dir}\nnext: tinydeploy export {result.run_dir} --onnx", highlight=False)


def _seeds_summary(report: dict, console: Console) -> None:
    """One row per seed, then the spread of the validation and test scores and the seed kept."""
    table = Table(title=None)
    keys = [k for k in report["runs"][0] if k.startswith(("val_", "test_")) and k.split("_", 1)[1] in
            ("accuracy", "rmse", "r2")]
    for column in ("seed", "widths", "params", *(k.replace("_", " ") for k in keys)):
        table.add_column(column)
    for row in report["runs"]:
        mark = " (kept)" if row["seed"] == report["kept"] else ""
        table.add_row(f"{row['seed']}{mark}", str(row["final_widths"]), str(row["params"]),
                      *(f"{row[k]:.4f}" for k in keys))
    console.print(table)
    for key in keys:
        s = report["spread"][key]
        console.print(f"{key.replace('_', ' ')} over {len(report['seeds'])} seeds: {s['mean']:.4f} +- {s['std']:.4f} "
                      f"(min {s['min']:.4f}, max {s['max']:.4f})", highlight=False)
    console.print(f"kept seed {report['kept']} (best on validation); every seed's run is in seeds/, the summary in "
                  "seeds.json", highlight=False)


class _Bars:
    """Progress of one grow: a bar for the growth phase (out of its epoch limit; when growth stops,
    whenever that is, it shows the epoch it stopped at as complete) and one for the final phase (its
    fixed number of epochs). Neither total changes while its phase runs, and neither count passes it."""

    def __init__(self, bar: Progress, cfg: GrowConfig, label: str = "") -> None:
        self.bar, self.cfg, self.label = bar, cfg, label
        self.grow = bar.add_task(f"{label}growing", total=cfg.max_growth_epochs or 1, shown=f"/{cfg.max_growth_epochs:g}",
                                 status="")
        self.final: int | None = None

    def __call__(self, p: GrowProgress) -> None:
        status = f"widths {p.widths} params {p.params} loss {p.train_loss:.3f} {p.metric_name} {p.val_metric:.4f}"
        if p.phase == "grow":
            self.bar.update(self.grow, completed=min(p.epoch, self.cfg.max_growth_epochs), status=status)
            return
        if self.final is None:
            stopped = p.total_epochs - self.cfg.final_epochs
            self.bar.update(self.grow, total=max(stopped, 1e-9), completed=stopped, description=f"{self.label}grown",
                            shown=" (growth stopped)", status="")
            self.final = self.bar.add_task(f"{self.label}final", total=self.cfg.final_epochs or 1,
                                           shown=f"/{self.cfg.final_epochs:g}", status="")
        done = p.epoch - (p.total_epochs - self.cfg.final_epochs)
        self.bar.update(self.final, completed=min(done, self.cfg.final_epochs), status=status)


def _typed(name: str, value: object) -> object:
    """A command-line value as the GrowConfig field holds it (for comparing with a saved run's options)."""
    if name == "init_widths":
        return parse_widths(str(value))
    if name in ("width_factor", "stream_width"):
        return parse_fraction(str(value), f"--{name.replace('_', '-')}")
    return value


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
    dataset: str = typer.Option(_DEFAULTS.dataset, help="digits | mnist1d | mnist5k | moons | spirals | sine | sine2d | "
                                "quadratic2d | mnist | fashion-mnist | cifar10 | cifar100, a path to a .npz / .csv file, or a folder of "
                                "images in class sub-folders."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<dataset>-<timestamp>)."),
    force: bool = typer.Option(False, help="Replace the run in a non-empty --out directory: its files, checkpoints "
                               "and exports (artifacts/) are removed first."),
    data_dir: Optional[str] = typer.Option(None, help="Directory holding torchvision's MNIST/CIFAR files."),
    target: Optional[str] = typer.Option(None, help="Label column of a .csv dataset."),
    task: Optional[str] = typer.Option(None, help="classification | regression for a .npz/.csv file (default: text "
                                       "labels and at most max(10, n/5) distinct whole numbers are classes, other "
                                       "numbers a regression target)."),
    method: str = typer.Option(_DEFAULTS.method, help="Growth method: tiny | gradmax | north | folding (shallow "
                               "ReLU MLPs: one --init-widths value) | random."),
    arch: Optional[str] = typer.Option(None, help="mlp | cnn | resnet18 | resnet10 (default: cnn for images (C,H,W) "
                                       "and signals (C,L), mlp otherwise; --arch cnn shows digits as 1x8x8 and "
                                       "mnist1d as 1x40; resnet10 has one block per stage)."),
    width_factor: Optional[str] = typer.Option(None, help="ResNet: every block's middle channels start at this "
                                               "fraction of their full width, e.g. 1/64 (default) or 1/4."),
    stream_width: str = typer.Option("1", help="ResNet: scale of the residual stream 64/128/256/512, e.g. 1/8 for "
                                     "8/16/32/64 on small data or CPUs."),
    init_widths: Optional[str] = typer.Option(None, help="Initial widths of the growable layers, comma-separated "
                                              "(default: 1 each; MLP: 1,1)."),
    conv_kernels: Optional[str] = typer.Option(None, help="CNN: kernel of each conv block; their number is the depth "
                                               "(default: 3,3 for images, 5,5 for signals)."),
    conv_strides: Optional[str] = typer.Option(None, help="CNN: stride of each conv block (default: 1 each)."),
    conv_pools: Optional[str] = typer.Option(None, help="CNN: average pooling after each block, 0 for none (default: "
                                             "2 while the grid stays >= 4 wide)."),
    transition: str = typer.Option(_DEFAULTS.transition, help="CNN: flatten | global_avgpool between conv and linear layers."),
    hidden_layers: Optional[int] = typer.Option(None, help="CNN: hidden linear layers after the transition (default: 1)."),
    activation: str = typer.Option(_DEFAULTS.activation, help="relu | selu | tanh | gelu (sigma(0) must be 0)."),
    grow_every: Optional[float] = typer.Option(None, help=_recipe_help("Epochs of training between growth steps", "grow_every")),
    max_growth_epochs: Optional[float] = typer.Option(None, help=_recipe_help("Stop growing after this many epochs",
                                                                              "max_growth_epochs")),
    final_epochs: Optional[float] = typer.Option(None, help=_recipe_help("Epochs of training after growth stops",
                                                                         "final_epochs")),
    neurons_per_step: int = typer.Option(_DEFAULTS.neurons_per_step, help="Most neurons added to a layer per step."),
    layers_per_step: Optional[int] = typer.Option(None, help="Most layers grown per step (default: all)."),
    max_params: Optional[int] = typer.Option(None, help="Parameter budget (default: per built-in dataset, none for files)."),
    max_macs: Optional[int] = typer.Option(None, help="Budget of multiply-accumulates per sample (default: 400,000 "
                                           "for mnist5k, none otherwise)."),
    max_width: Optional[int] = typer.Option(None, help="Largest width of any hidden layer."),
    target_accuracy: Optional[float] = typer.Option(None, help="Stop growing once validation accuracy reaches this fraction."),
    patience: int = typer.Option(_DEFAULTS.patience, help="Stop after this many growth steps in a row with no significant neuron."),
    lr: float = typer.Option(_DEFAULTS.lr, help="Learning rate."),
    optimizer: str = typer.Option(_DEFAULTS.optimizer, help="adam | sgd (plain SGD, as the paper's ResNet protocol)."),
    precision: str = typer.Option(_DEFAULTS.precision, help="Training arithmetic: auto | fp32 | bf16 | fp16 (auto: "
                                  "bf16 autocast on CUDA where supported, fp32 on CPU)."),
    batch_size: Optional[int] = typer.Option(None, help=_recipe_help("Training mini-batch size", "batch_size")),
    weight_decay: float = typer.Option(_DEFAULTS.weight_decay, help="Weight decay (Adam or SGD)."),
    input_noise: Optional[float] = typer.Option(None, help="Std of Gaussian noise on standardised training inputs "
                                                "(default: 0.3 for digits, 0 otherwise)."),
    max_shift: Optional[int] = typer.Option(None, help="Random shifts of training images by up to this many pixels "
                                            "(default: CNNs on images 2, 1 below 16 pixels; 0 otherwise)."),
    ridge: Optional[float] = typer.Option(None, help=_recipe_help("Relative ridge on the growth statistics", "ridge")),
    balance: Optional[bool] = typer.Option(None, "--balance/--no-balance", help="Scale new neurons' fan-in and fan-out "
                                           "to their layers' weights (default: on for CNNs)."),
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
    seeds: int = typer.Option(1, help="Grow this many runs (seeds --seed, --seed+1, ...), keep the best on "
                              "validation in --out and report the spread of their scores."),
) -> None:
    """Start at width 1 and grow a compact MLP or CNN with TINY while it trains; write a run directory.

    Example: tinydeploy grow --dataset data.csv --target label --out runs/mine --seeds 3
    """
    cfg = GrowConfig(
        dataset=dataset, data_dir=data_dir, target=target, task=task, split_seed=split_seed, method=method, arch=arch,
        init_widths=_optional_list(init_widths, "--init-widths"),
        conv_kernels=_optional_list(conv_kernels, "--conv-kernels"),
        conv_strides=_optional_list(conv_strides, "--conv-strides"),
        conv_pools=_optional_list(conv_pools, "--conv-pools", minimum=0), transition=transition,
        hidden_layers=hidden_layers, activation=activation, grow_every=grow_every,
        width_factor=None if width_factor is None else parse_fraction(width_factor, "--width-factor"),
        stream_width=parse_fraction(stream_width, "--stream-width"), optimizer=optimizer, precision=precision,
        max_growth_epochs=max_growth_epochs, final_epochs=final_epochs, neurons_per_step=neurons_per_step,
        layers_per_step=layers_per_step, max_params=max_params, max_macs=max_macs, max_width=max_width,
        target_accuracy=target_accuracy, patience=patience, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, input_noise=input_noise, max_shift=max_shift, ridge=ridge, balance=balance,
        device=device, threads=threads, seed=seed, checkpoint_every=checkpoint_every,
    )
    if seeds != 1:
        if resume is not None or nproc is not None:
            raise TinyDeployError("--seeds grows several runs in one process: drop --resume and --nproc (resume a "
                                  "seed's run with 'tinydeploy grow --resume OUT/seeds/seed-S')")
        return _grow_seeds(cfg, seeds, out, force)
    if nproc is not None:
        return _launch(ctx, cfg, nproc, out, resume, force)
    command = shlex.join(["tinydeploy", *sys.argv[1:]])
    if resume is not None:
        if out is not None or force:
            raise TinyDeployError("--resume continues the run in its own directory: drop --out and --force")
        fields = set(GrowConfig.__dataclass_fields__)
        given = {k: _typed(k, v) for k, v in _given(ctx).items() if k in fields}
        job = prepare_resume(resume, given, command=command)
    else:
        job = prepare_grow(cfg, out, force=force, command=command)
    if not job.is_main:
        job.run()
        return
    console = Console(stderr=True)
    for notice in job.notices:
        console.print(f"[yellow]note:[/yellow] {notice}")
    with Progress(*_COLUMNS, console=console, transient=False) as bar:
        result = job.run(_Bars(bar, job.cfg))
    if result.metrics["status"] == "interrupted":
        console.print(f"interrupted at epoch {result.metrics['epochs']:.2f}; resume with: "
                      f"tinydeploy grow --resume {result.run_dir}")
        raise typer.Exit(130)
    _summary(result, Console())


#: Phase, bar, epoch and time first, so that the status (the longest, last) is what a narrow terminal cuts.
_COLUMNS = (TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=14)), BarColumn(bar_width=16),
            TextColumn("epoch {task.completed:.2f}{task.fields[shown]}", table_column=Column(no_wrap=True, min_width=28)),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, ratio=1)))


def _grow_seeds(cfg: GrowConfig, n_seeds: int, out: Optional[Path], force: bool) -> None:
    """--seeds N: every seed's progress, then its table, the spread and the kept run's summary."""
    from tinydeploy.training.seeds import grow_seeds

    console = Console(stderr=True)
    out = out if out is not None else default_run_dir(cfg.dataset)
    with Progress(*_COLUMNS, console=console, transient=False) as bar:
        bars: dict[int, _Bars] = {}

        def start(k: int, resolved: GrowConfig) -> None:
            bars[k] = _Bars(bar, resolved, f"seed {resolved.seed} ")

        def progress(k: int, p: GrowProgress) -> None:
            bars[k](p)

        result, report = grow_seeds(cfg, out, n_seeds, force=force, command=shlex.join(["tinydeploy", *sys.argv[1:]]),
                                    on_progress=progress, on_start=start)
    stdout = Console()
    _seeds_summary(report, stdout)
    _summary(result, stdout)
