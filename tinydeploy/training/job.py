"""The ``grow`` job: start at width 1, train, grow with TINY (or a baseline), write a run directory."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tinydeploy import __version__
from tinydeploy.data import apply_standardizer, fit_standardizer, load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.policy import Batch, Growth, GrowthSettings, growth_step, neuron_budget
from tinydeploy.growth.surgery import carry_optimizer_state
from tinydeploy.model.build import build_model, spec_from_model
from tinydeploy.model.losses import per_sample_loss, task_metric
from tinydeploy.model.spec import ArchSpec
from tinydeploy.training.architecture import initial_spec, live_initialisation
from tinydeploy.training.config import DATASET_DEFAULTS, SINGLE_THREAD_MAX_PARAMS, GrowConfig
from tinydeploy.training.devices import resolve_device, synchronize
from tinydeploy.training.rundir import write_run
from tinydeploy.training.trainer import Trainer, evaluate


@dataclass
class Progress:
    """What the job reports to its caller after each chunk of training or growth."""

    phase: str
    epoch: float
    total_epochs: float
    train_loss: float
    val_loss: float
    val_metric: float
    metric_name: str
    widths: list[int]
    params: int


@dataclass
class GrowResult:
    run_dir: Path
    spec: ArchSpec
    metrics: dict[str, Any]
    growth_log: list[dict[str, Any]]


class GrowJob:
    """State of one grow run: data on device, trainer, log, timers, run-directory writes."""

    def __init__(self, cfg: GrowConfig, run_dir: Path, command: str):
        self.cfg, self.run_dir, self.command = cfg, run_dir, command
        self.on_progress: Callable[[Progress], None] = lambda _p: None
        self.device = resolve_device(cfg.device)
        self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, target=cfg.target,
                                 split_seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                                 as_images=cfg.arch == "cnn")
        self.arch = cfg.arch or ("cnn" if self.data.X_train.ndim in (3, 4) else "mlp")
        self.cfg = cfg = cfg.resolved(self.arch, len(self.data.X_train))
        prep = fit_standardizer(self.data.X_train, per_channel=self.arch == "cnn")
        # The spec at the initial widths; current widths are read back with spec_from_model.
        self.spec = initial_spec(cfg, self.data, prep)
        self.task = self.data.task
        if cfg.target_accuracy is not None and self.task != "classification":
            raise TinyDeployError(f"--target-accuracy applies to classification, but '{cfg.dataset}' is a "
                                  "regression dataset: drop the option")
        self.loss_fn = per_sample_loss(self.task)
        self.train_set, self.val_set, self.test_set = (self._tensors(X, y, prep) for X, y in (
            (self.data.X_train, self.data.y_train), (self.data.X_val, self.data.y_val),
            (self.data.X_test, self.data.y_test)))
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.cpu_generator = torch.Generator().manual_seed(cfg.seed)
        model = live_initialisation(build_model(self.spec).to(self.device), self.spec.growable_indices,
                                    self.train_set.X)
        self.trainer = Trainer(model, self.train_set.X, self.train_set.y, self.loss_fn, lr=cfg.lr,
                               batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                               input_noise=self.input_noise, max_shift=self.max_shift,
                               generator=self.cpu_generator)
        self.settings = GrowthSettings(method=cfg.method, neurons_per_step=cfg.neurons_per_step,
                                       layers_per_step=cfg.layers_per_step, max_params=self.max_params,
                                       max_macs=self.max_macs, max_width=cfg.max_width, ridge=cfg.ridge,
                                       balance=cfg.balance)
        self.log: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.psi: dict[int, float] = {}
        self.time_train = self.time_growth = 0.0
        self.started = time.perf_counter()
        self.stop_reason = ""

    @property
    def max_shift(self) -> int:
        """--max-shift, else 2 pixels for CNNs on images at least 16 pixels wide, 1 below, 0 for signals."""
        if self.cfg.max_shift is not None:
            return self.cfg.max_shift
        if self.arch != "cnn" or len(self.data.input_shape) != 3:
            return 0
        return 2 if min(self.data.input_shape[1:]) >= 16 else 1

    @property
    def input_noise(self) -> float:
        if self.cfg.input_noise is not None:
            return self.cfg.input_noise
        return DATASET_DEFAULTS.get(self.cfg.dataset, {}).get("input_noise", 0.0)

    def cpu_threads(self) -> int:
        """--threads, else 1 for compact budgets and torch's default for large or unbounded ones."""
        if self.cfg.threads is not None:
            return self.cfg.threads
        small = self.max_params is not None and self.max_params <= SINGLE_THREAD_MAX_PARAMS
        return 1 if small else torch.get_num_threads()

    @property
    def max_params(self) -> int | None:
        return self._budget("max_params")

    @property
    def max_macs(self) -> int | None:
        return self._budget("max_macs")

    def _budget(self, name: str) -> int | None:
        """--max-params / --max-macs, else the dataset's default budget (none for user files)."""
        if getattr(self.cfg, name) is not None:
            return getattr(self.cfg, name)
        budget = DATASET_DEFAULTS.get(self.cfg.dataset, {}).get(name)
        return int(budget) if budget is not None else None

    def _tensors(self, X: np.ndarray, y: np.ndarray, prep: dict[str, Any]) -> Batch:
        X_std = torch.from_numpy(apply_standardizer(X, prep)).to(self.device)
        return Batch(X_std, torch.from_numpy(y).to(self.device))

    @property
    def model(self) -> torch.nn.Sequential:
        return self.trainer.model

    # ----- phases -------------------------------------------------------------------------------
    def _train(self, n_steps: int) -> float:
        start = time.perf_counter()
        loss = self.trainer.train_steps(n_steps)
        synchronize(self.device)
        self.time_train += time.perf_counter() - start
        return loss

    def _record(self, phase: str, train_loss: float, total_epochs: float) -> None:
        val_loss, val_metric = evaluate(self.model, self.val_set.X, self.val_set.y, self.loss_fn, self.task)
        spec = spec_from_model(self.model, self.spec)
        entry = {"epoch": round(self.trainer.epoch, 4), "phase": phase, "params": spec.n_params(),
                 "widths": spec.hidden_widths, "train_loss": train_loss, "val_loss": val_loss,
                 self._metric_key("val"): val_metric}
        self.history.append(entry)
        self.on_progress(Progress(phase, self.trainer.epoch, total_epochs, train_loss, val_loss, val_metric,
                                  self._metric_key("val").replace("_", " "), spec.hidden_widths, spec.n_params()))

    def _metric_key(self, split: str) -> str:
        return f"{split}_accuracy" if self.task == "classification" else f"{split}_mse"

    def _grow(self, step: int) -> list[Growth]:
        start = time.perf_counter()
        old_model = self.model
        held_out = self.val_set.take(self.cfg.line_search_batch, self.generator)
        metric = lambda out, y: task_metric(self.task, out, y)  # noqa: E731
        model, growths, psi = growth_step(old_model, self.spec.growable_indices, self.train_set, held_out,
                                              self.loss_fn, metric, self.settings, self.generator)
        self.psi = psi
        if growths:
            self.trainer.replace_model(model, carry_optimizer_state(self.trainer.optimizer, old_model, model))
        synchronize(self.device)
        self.time_growth += time.perf_counter() - start
        for g in growths:
            self.log.append(self._event(step, g))
        return growths

    def _event(self, step: int, g: Growth) -> dict[str, Any]:
        c = g.candidate
        spec = self.spec.with_hidden_widths(g.widths_after)
        return {"step": step, "epoch": round(self.trainer.epoch, 4), "layer": c.in_index,
                "hidden_index": self.spec.growable_indices.index(c.in_index), "method": c.method,
                "neurons_added": c.n_neurons, "lambdas": c.lambdas, "lambda_null": c.lambda_null,
                "gamma": g.gamma, "loss_before": g.loss_before, "loss_after": g.loss_after,
                "acc_before" if self.task == "classification" else "mse_before": g.metric_before,
                "acc_after" if self.task == "classification" else "mse_after": g.metric_after,
                "psi_before": c.psi, "psi_after": g.psi_after, "params": spec.n_params(),
                "widths": spec.hidden_widths}

    def _budget_left(self) -> bool:
        sample = self.train_set.X[:1]
        return any(neuron_budget(self.model, i, o, self.settings, sample) > 0 for i, o in self.spec.pairs())

    def _budget_reason(self) -> str:
        spec = spec_from_model(self.model, self.spec)
        if self.max_macs is not None and self.max_params is not None:
            # whichever budget has the smaller share left
            return "max_macs" if spec.macs() / self.max_macs > spec.n_params() / self.max_params else "max_params"
        if self.max_macs is not None:
            return "max_macs"
        return "max_params" if self.max_params is not None else "max_width"

    def growth_phase(self) -> None:
        """Grow (first at initialisation, while width-1 ReLU units are still alive), then train
        ``grow_every`` epochs, until a budget, the target accuracy or ``patience`` idle steps stop it."""
        cfg = self.cfg
        steps_between = max(1, round(cfg.grow_every * self.trainer.steps_per_epoch))
        total = cfg.max_growth_epochs + cfg.final_epochs
        train_loss = evaluate(self.model, self.train_set.X, self.train_set.y, self.loss_fn, self.task)[0]
        step, idle = 0, 0
        while True:
            if not self._budget_left():
                self.stop_reason = self._budget_reason()
                break
            if self.trainer.epoch >= cfg.max_growth_epochs:
                self.stop_reason = "max_growth_epochs"
                break
            if cfg.target_accuracy is not None and self.task == "classification":
                if evaluate(self.model, self.val_set.X, self.val_set.y, self.loss_fn, self.task)[1] >= cfg.target_accuracy:
                    self.stop_reason = "target_accuracy"
                    break
            step += 1
            idle = 0 if self._grow(step) else idle + 1
            self._record("grow", train_loss, total)
            self.checkpoint("running")
            if idle >= cfg.patience:
                self.stop_reason = "no_significant_neuron"
                break
            train_loss = self._train(steps_between)

    def final_phase(self) -> None:
        """Train the final architecture with a cosine learning-rate decay, one progress record per epoch."""
        cfg = self.cfg
        start_epoch = self.trainer.epoch
        total_steps = round(cfg.final_epochs * self.trainer.steps_per_epoch)
        done = 0
        while done < total_steps:
            chunk = min(self.trainer.steps_per_epoch, total_steps - done)
            self.trainer.set_lr(cfg.lr * 0.5 * (1 + math.cos(math.pi * done / total_steps)))
            train_loss = self._train(chunk)
            done += chunk
            self._record("final", train_loss, start_epoch + cfg.final_epochs)

    def run(self, on_progress: Callable[[Progress], None] | None = None) -> GrowResult:
        """Grow, then train the final architecture; the run directory is rewritten after each growth step
        and once more (``status: interrupted``) if the user interrupts."""
        self.on_progress = on_progress or self.on_progress
        make_run_dir(self.run_dir)
        self.started = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads())
        try:
            self.growth_phase()
            self.final_phase()
        except KeyboardInterrupt:
            self.checkpoint("interrupted")
            raise
        finally:
            torch.set_num_threads(threads)
        metrics = self.checkpoint("complete")
        return GrowResult(self.run_dir, spec_from_model(self.model, self.spec), metrics, self.log)

    # ----- outputs ------------------------------------------------------------------------------
    def metrics(self, status: str) -> dict[str, Any]:
        spec = spec_from_model(self.model, self.spec)
        splits = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        results = {}
        for name, batch in splits.items():
            loss, metric = evaluate(self.model, batch.X, batch.y, self.loss_fn, self.task)
            results[name] = {"loss": loss, "accuracy" if self.task == "classification" else "mse": metric}
        wall = time.perf_counter() - self.started
        return {
            "status": status, "dataset": self.data.name, "task": self.task, "arch": self.arch,
            "method": self.cfg.method,
            "seed": self.cfg.seed, "device": str(self.device), "data_source": self.data.source,
            "initial_widths": self.spec.hidden_widths, "final_widths": spec.hidden_widths,
            "initial_params": self.spec.n_params(), "params": spec.n_params(), "macs": spec.macs(),
            "max_params": self.max_params, "max_macs": self.max_macs, "input_noise": self.input_noise,
            "max_shift": self.max_shift, "metrics": results, "epochs": round(self.trainer.epoch, 4),
            "growth_events": len(self.log), "stop_reason": self.stop_reason,
            "final_bottleneck": [self.psi.get(i) for i in self.spec.growable_indices],
            "wall_time_s": {"total": wall, "training": self.time_train, "growth": self.time_growth},
            "history": self.history, "config": asdict(self.cfg), "command": self.command,
            "versions": {"tinydeploy": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }

    def checkpoint(self, status: str) -> dict[str, Any]:
        """Write the run directory as it stands; returns the metrics written."""
        metrics = self.metrics(status)
        write_run(self.run_dir, self.model, spec_from_model(self.model, self.spec), self.log, metrics)
        return metrics


def default_run_dir(dataset: str) -> Path:
    """runs/<dataset>-<timestamp> under the current directory."""
    name = Path(dataset).stem if dataset.endswith((".csv", ".npz")) else dataset
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless ``force``; refuse a file path."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TinyDeployError(f"--out {run_dir} is a file: pass a directory path")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        raise TinyDeployError(f"--out {run_dir} is not empty: pass a new directory or --force to overwrite")


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TinyDeployError(f"cannot create --out {run_dir}: {exc.strerror}; pass a writable directory") from exc


def prepare_grow(cfg: GrowConfig, run_dir: Path | None = None, *, force: bool = False, command: str = "") -> GrowJob:
    """Validate options, output directory and data; writes nothing, so bad input leaves no trace."""
    cfg.validate()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg.dataset)
    check_run_dir(run_dir, force)
    return GrowJob(cfg, run_dir, command)


def run_grow(
    cfg: GrowConfig,
    run_dir: Path | None = None,
    *,
    force: bool = False,
    command: str = "",
    on_progress: Callable[[Progress], None] | None = None,
) -> GrowResult:
    """Grow a network as ``cfg`` says and write its run directory (also after every growth step)."""
    return prepare_grow(cfg, run_dir, force=force, command=command).run(on_progress)
