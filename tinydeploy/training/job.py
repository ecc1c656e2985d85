"""The ``grow`` job: start at width 1, train, grow with TINY (or a baseline), write a run directory.

The job is a loop over an explicit, JSON-serialisable ``LoopState`` (phase, growth step, patience
counter, optimizer steps left in the current training interval, ...). Every point where the loop
can checkpoint is a boundary between slices of optimizer steps, so a checkpoint taken there (weights,
optimizer, every RNG, trainer position, loop state: ``resume_state``) lets ``--resume`` continue with
bit-identical results. Checkpoints are written at most every ``checkpoint_every`` minutes, at a growth
step or a slice boundary, and when the run stops; SIGINT/SIGTERM stop the loop at the next boundary with
a checkpoint (``status: interrupted``). The logs are appended to as the run goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from tinydeploy import __version__
from tinydeploy.data import (
    Dataset,
    apply_standardizer,
    fit_standardizer,
    is_user_file,
    load_dataset,
)
from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.batchnorm import has_batchnorm, recalibrate
from tinydeploy.growth.candidates import check_method
from tinydeploy.growth.policy import Batch, Growth, GrowthSettings, growth_step, neuron_budget
from tinydeploy.growth.surgery import carry_optimizer_state
from tinydeploy.model.build import build_model, spec_from_model
from tinydeploy.model.losses import per_sample_loss, task_metric
from tinydeploy.model.regions import RESOLUTION, count_linear_regions, regions_apply
from tinydeploy.model.scores import regression_scores
from tinydeploy.model.spec import ArchSpec
from tinydeploy.training import crashpoints
from tinydeploy.training.architecture import full_widths, initial_spec, live_initialisation
from tinydeploy.training.checkpoint import load_optimizer_state, optimizer_state, restore_rng, rng_state
from tinydeploy.training.config import (
    DATASET_DEFAULTS,
    SINGLE_THREAD_MAX_PARAMS,
    USER_IMAGE_MACS_PER_PARAM,
    USER_MIN_WIDTH,
    USER_PARAMS_PER_SAMPLE,
    GrowConfig,
    default_arch,
    default_max_params,
    is_convolutional,
    recipe_of,
)
from tinydeploy.training.devices import resolve_device, synchronize
from tinydeploy.training.host_memory import keep_freed_buffers
from tinydeploy.training.rundir import (
    COMMIT_LOG,
    GROWTH_LOG_FILE,
    HISTORY_FILE,
    Checkpoint,
    RunWriter,
    foreign_export,
    read_checkpoint,
)
from tinydeploy.training.trainer import Trainer, evaluate

if TYPE_CHECKING:
    from tinydeploy.training.distributed import ProcessGroup

#: Optimizer steps between two looks at the clock and at stop requests (a possible checkpoint).
SLICE_STEPS = 32
#: Training samples on which a network with BatchNorm re-estimates its running statistics before a growth step.
RECALIBRATION_SAMPLES = 2048


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
    run_dir: Path | None
    spec: ArchSpec
    metrics: dict[str, Any]
    growth_log: list[dict[str, Any]]


@dataclass
class LoopState:
    """Where the grow loop stands, besides tensors: everything a resume needs to take the same path."""

    phase: str = "grow"  # grow | final | done
    step: int = 0  # growth steps taken
    idle: int = 0  # growth steps in a row without a significant neuron
    train_left: int = 0  # optimizer steps left in the current training interval (or final-phase epoch)
    train_loss: float = 0.0  # mean training loss of the last finished interval
    stop_reason: str = ""
    final_total: int = 0  # optimizer steps of the final phase
    final_done: int = 0
    final_start_epoch: float = 0.0
    regions_end_of_growth: int | None = None  # linear regions when growth stopped (2-D ReLU MLPs)


def data_fingerprint(data: Any) -> str:
    """sha256 of every split's arrays: a resume must see the same data."""
    digest = hashlib.sha256()
    for name in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        array = np.ascontiguousarray(getattr(data, name))
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class GrowJob:
    """State of one grow run: data on device, trainer, log, timers, run-directory writes.

    ``data`` is the dataset to grow on (default: ``load_dataset`` as ``cfg`` says); with ``run_dir``
    None nothing is written and the result stays in memory (the scikit-learn estimators)."""

    def __init__(self, cfg: GrowConfig, run_dir: Path | None, command: str, parallel: ProcessGroup | None = None,
                 data: Dataset | None = None):
        self.cfg, self.run_dir, self.command = cfg, run_dir, command
        self.parallel = parallel
        self.on_progress: Callable[[Progress], None] = lambda _p: None
        self.device = parallel.device if parallel is not None else resolve_device(cfg.device)
        arch = default_arch(cfg)
        # a user file without --arch: flat rows of s x s pixels are loaded (and grown) as the images they are
        self.data = data if data is not None else self._load(
            cfg, is_convolutional(arch) if arch is not None else (None if self._user_file else False))
        pixels = data is None and arch is None and bool(self.data.source.get("as_images"))
        side = self.data.X_train.shape[-1] if pixels else None
        self.arch = arch or ("cnn" if self.data.X_train.ndim in (3, 4) else "mlp")
        self.cfg = cfg = cfg.resolved(self.arch, len(self.data.X_train))
        prep = fit_standardizer(self.data.X_train, per_channel=is_convolutional(self.arch))
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
        check_method(cfg.method, model, self.spec.growable_indices, self.task)
        self.trainer = Trainer(model, self.train_set.X, self.train_set.y, self.loss_fn, lr=cfg.lr,
                               batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                               input_noise=self.input_noise, max_shift=self.max_shift, hflip=self.hflip,
                               optimizer=cfg.optimizer, precision=cfg.precision, generator=self.cpu_generator,
                               device_generator=self.generator, parallel=parallel)
        full = full_widths(self.spec)
        self.settings = GrowthSettings(method=cfg.method, neurons_per_step=cfg.neurons_per_step,
                                       layers_per_step=cfg.layers_per_step, max_params=self.max_params,
                                       max_macs=self.max_macs, max_width=cfg.max_width, ridge=cfg.ridge,
                                       balance=cfg.balance, layer_max_width=full or None,
                                       layer_neurons=self._layer_neurons(full) or None,
                                       reuse_statistics=recipe_of(self.arch) == "resnet")
        self.loop = LoopState()
        self.log: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.psi: dict[int, float] = {}
        self.time_train = self.time_growth = self.time_checkpoint = 0.0
        self.wall_before = 0.0  # wall time of earlier sessions of a resumed run
        self.started = time.perf_counter()
        self.resumed: Checkpoint | None = None
        self.notices: list[str] = []
        self.writer: RunWriter | None = None
        self._last_checkpoint = time.perf_counter()
        self._signalled = False  # a SIGINT/SIGTERM arrived (set by the handler)
        self._stop_requested = False  # the loop stops at this boundary (agreed by every process)
        self._data_sha256 = data_fingerprint(self.data)
        self._evaluations: dict[str, Any] = {}
        self._config = asdict(cfg)
        if side is not None:
            self.notices.append(f"the {side * side} features of each row are {side}x{side} pixel values: growing a "
                                f"CNN on 1x{side}x{side} images (pass --arch mlp for an MLP on the flat features)")
        if cfg.max_params is None and "max_params" not in DATASET_DEFAULTS.get(cfg.dataset, {}):
            how = (f"{USER_PARAMS_PER_SAMPLE} per training sample" if self._user_images else
                   f"the larger of {USER_PARAMS_PER_SAMPLE} per training sample and a hidden layer of {USER_MIN_WIDTH} "
                   "units")
            self.notices.append(f"no --max-params: the budget is {self.max_params:,} parameters ({how}; pass "
                                "--max-params to change it)")
        if cfg.max_macs is None and self._user_images and self.max_macs is not None:
            self.notices.append(f"no --max-macs: the budget is {self.max_macs:,} multiply-accumulates per sample "
                                f"({USER_IMAGE_MACS_PER_PARAM} per budgeted parameter; pass --max-macs to change it)")

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory and reports progress (rank 0, or the only one)."""
        return self.parallel is None or self.parallel.is_main

    @property
    def max_shift(self) -> int:
        """--max-shift, else 2 pixels for CNNs on images at least 16 pixels wide (ResNets on 32-pixel
        images: 4, the usual CIFAR random crop with padding), 1 below, 0 for signals."""
        if self.cfg.max_shift is not None:
            return self.cfg.max_shift
        if not is_convolutional(self.arch) or len(self.data.input_shape) != 3:
            return 0
        if recipe_of(self.arch) == "resnet" and min(self.data.input_shape[1:]) >= 32:
            return 4
        return 2 if min(self.data.input_shape[1:]) >= 16 else 1

    @property
    def hflip(self) -> bool:
        """Random horizontal flips of training images: on for datasets whose labels survive a mirror (CIFAR)."""
        return bool(DATASET_DEFAULTS.get(self.cfg.dataset, {}).get("hflip", False)) and is_convolutional(self.arch)

    def _layer_neurons(self, full: dict[int, int]) -> dict[int, int]:
        """Most channels a residual block gains per step: --neurons-per-step for the widest blocks, in
        proportion to the full width for the others (the paper's per-depth counts grow with the width,
        App. F.1 Table 2)."""
        widest = max(full.values(), default=1)
        return {i: max(1, round(self.cfg.neurons_per_step * w / widest)) for i, w in full.items()}

    @property
    def input_noise(self) -> float:
        if self.cfg.input_noise is not None:
            return self.cfg.input_noise
        return DATASET_DEFAULTS.get(self.cfg.dataset, {}).get("input_noise", 0.0)

    def cpu_threads(self) -> int:
        """--threads, else 1 for compact nets (a parameter budget, or a ResNet at its full widths, of at most
        ``SINGLE_THREAD_MAX_PARAMS``) and torch's default for large or unbounded ones."""
        if self.cfg.threads is not None:
            return self.cfg.threads
        bound = self.max_params
        full = full_widths(self.spec)
        if bound is None and full:
            bound = self.spec.with_hidden_widths([full.get(i, self.spec.width(i))
                                                  for i in self.spec.growable_indices]).n_params()
        small = bound is not None and bound <= SINGLE_THREAD_MAX_PARAMS
        return 1 if small else torch.get_num_threads()

    @property
    def max_params(self) -> int | None:
        return self._budget("max_params")

    @property
    def max_macs(self) -> int | None:
        return self._budget("max_macs")

    def _budget(self, name: str) -> int | None:
        """--max-params / --max-macs, else the dataset's default budget (for user files a parameter budget
        from the number of training samples, ``default_max_params``, and for their images a MAC budget of
        ``USER_IMAGE_MACS_PER_PARAM`` per parameter; none for ResNets, whose blocks stop at their full width)."""
        if getattr(self.cfg, name) is not None:
            return getattr(self.cfg, name)
        if recipe_of(self.arch) == "resnet":
            return None
        if name == "max_params":
            return default_max_params(self.cfg.dataset, len(self.data.X_train), math.prod(self.spec.input_shape),
                                      self.spec.n_outputs, images=self._user_images)
        budget = DATASET_DEFAULTS.get(self.cfg.dataset, {}).get(name)
        if budget is None and self._user_images:
            return USER_IMAGE_MACS_PER_PARAM * self._budget("max_params")
        return int(budget) if budget is not None else None

    @staticmethod
    def _load(cfg: GrowConfig, as_images: bool | None) -> Dataset:
        return load_dataset(cfg.dataset, data_dir=cfg.data_dir, target=cfg.target, split_seed=cfg.split_seed,
                            val_fraction=cfg.val_fraction, as_images=as_images, task=cfg.task)

    @property
    def _user_file(self) -> bool:
        """Whether the data come from a user .npz/.csv file (the budgets and the image check are for those)."""
        return is_user_file(self.cfg.dataset)

    @property
    def _user_images(self) -> bool:
        """A CNN on a user file's images or signals: its parameter budget has no MLP floor, and it gets a MAC budget."""
        return self._user_file and recipe_of(self.arch) == "cnn"

    def _tensors(self, X: np.ndarray, y: np.ndarray, prep: dict[str, Any]) -> Batch:
        X_std = torch.from_numpy(apply_standardizer(X, prep)).to(self.device)
        return Batch(X_std, torch.from_numpy(y).to(self.device))

    @property
    def model(self) -> torch.nn.Sequential:
        return self.trainer.model

    # ----- phases -------------------------------------------------------------------------------
    def _train(self, n_steps: int) -> None:
        start = time.perf_counter()
        self.trainer.train_steps(n_steps)
        synchronize(self.device)
        self.time_train += time.perf_counter() - start

    def _record(self, phase: str, train_loss: float, total_epochs: float) -> None:
        if not self.is_main:
            return
        val_loss, val_metric = self._evaluate("val")
        spec = spec_from_model(self.model, self.spec)
        entry = {"epoch": round(self.trainer.epoch, 4), "phase": phase, "params": spec.n_params(),
                 "widths": spec.hidden_widths, "train_loss": train_loss, "val_loss": val_loss,
                 self._metric_key("val"): val_metric}
        self.history.append(entry)
        self._append(HISTORY_FILE, entry)
        self.on_progress(Progress(phase, self.trainer.epoch, total_epochs, train_loss, val_loss, val_metric,
                                  self._metric_key("val").replace("_", " "), spec.hidden_widths, spec.n_params()))

    def _evaluate(self, split: str) -> tuple[float, float]:
        """(loss, metric) of the current model on a split, computed once per model and step."""
        key = (self.model, self.trainer.steps_done)
        cached = self._evaluations.get(split)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] != key[1]:
            batch = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
            cached = self._evaluations[split] = (key, evaluate(self.model, batch.X, batch.y, self.loss_fn, self.task))
        return cached[1]

    @torch.no_grad()
    def _regression_scores(self, split: str, chunk: int = 8192) -> dict[str, float]:
        """MSE, RMSE, MAE and R^2 of the current model on a split (``model.scores.regression_scores``)."""
        batch = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        self.model.eval()
        out = torch.cat([self.model(batch.X[i : i + chunk]) for i in range(0, batch.X.shape[0], chunk)])
        return regression_scores(out.double().cpu().numpy(), batch.y.double().cpu().numpy())

    def _metric_key(self, split: str) -> str:
        return f"{split}_accuracy" if self.task == "classification" else f"{split}_mse"

    def _grow(self, step: int) -> list[Growth]:
        start = time.perf_counter()
        old_model = self.model
        if has_batchnorm(old_model):
            recalibrate(old_model, self.train_set.take(RECALIBRATION_SAMPLES, self.generator).X)
        held_out = self.val_set.take(self.cfg.line_search_batch, self.generator)
        metric = lambda out, y: task_metric(self.task, out, y)  # noqa: E731
        sharded = self.parallel if self.parallel is not None and self.parallel.world > 1 else None
        model, growths, psi = growth_step(old_model, self.spec.growable_indices, self.train_set, held_out,
                                          self.loss_fn, metric, self.settings, self.generator, sharded)
        crashpoints.point("grow")
        self.psi = psi
        if self.parallel is not None:
            widths = spec_from_model(model, self.spec).hidden_widths
            self.parallel.check_same("growth (widths, amplitudes)", [*widths, len(growths), sum(g.gamma for g in growths)])
        if growths:
            self.trainer.replace_model(model, carry_optimizer_state(self.trainer.optimizer, old_model, model))
        synchronize(self.device)
        self.time_growth += time.perf_counter() - start
        for g in growths:
            event = self._event(step, g)
            self.log.append(event)
            self._append(GROWTH_LOG_FILE, event)
        return growths

    def _append(self, log: str, record: dict[str, Any]) -> None:
        """Append to a log of the run directory (rank 0, while ``run`` has the directory open)."""
        if self.writer is not None:
            self.writer.append(log, record)

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
                "widths": spec.hidden_widths, **({"details": c.details} if c.details else {})}

    def _budget_left(self) -> bool:
        sample = self.train_set.X[:1]
        return any(neuron_budget(self.model, i, None, self.settings, sample) > 0 for i in self.spec.growable_indices)

    def _budget_reason(self) -> str:
        spec = spec_from_model(self.model, self.spec)
        if self.max_macs is not None and self.max_params is not None:
            # whichever budget has the smaller share left
            return "max_macs" if spec.macs() / self.max_macs > spec.n_params() / self.max_params else "max_params"
        if self.max_macs is not None:
            return "max_macs"
        if self.max_params is not None:
            return "max_params"
        return "full_width" if self.settings.layer_max_width else "max_width"

    def _stop_growing(self) -> str:
        """Why growth stops before this step ("" to grow): a budget, the epoch limit or the target accuracy."""
        cfg = self.cfg
        if not self._budget_left():
            return self._budget_reason()
        if self.trainer.epoch >= cfg.max_growth_epochs:
            return "max_growth_epochs"
        if cfg.target_accuracy is not None and self.task == "classification":
            if evaluate(self.model, self.val_set.X, self.val_set.y, self.loss_fn, self.task)[1] >= cfg.target_accuracy:
                return "target_accuracy"
        return ""

    def _growth_point(self) -> None:
        """Grow (first at initialisation, while width-1 ReLU units are still alive), then train ``grow_every``
        epochs, until a budget, the target accuracy or ``patience`` idle steps stop it; a timed checkpoint."""
        loop, cfg = self.loop, self.cfg
        reason = self._stop_growing()
        if reason:
            loop.stop_reason = reason
            self._enter_final()
            return
        loop.step += 1
        loop.idle = 0 if self._grow(loop.step) else loop.idle + 1
        self._record("grow", loop.train_loss, cfg.max_growth_epochs + cfg.final_epochs)
        if loop.idle >= cfg.patience:
            loop.stop_reason = "no_significant_neuron"
            self._enter_final()
        else:
            loop.train_left = max(1, round(cfg.grow_every * self.trainer.steps_per_epoch))
        if self._poll():
            self.checkpoint(full=True)

    def _enter_final(self) -> None:
        loop = self.loop
        loop.phase = "final"
        loop.final_start_epoch = self.trainer.epoch
        loop.regions_end_of_growth = self._regions().get("linear_regions")
        loop.final_total = round(self.cfg.final_epochs * self.trainer.steps_per_epoch)
        loop.final_done = 0

    def _final_point(self) -> None:
        """Start the next epoch of the final phase (cosine learning-rate decay), or end the run."""
        loop = self.loop
        if loop.final_done >= loop.final_total:
            loop.phase = "done"
            return
        loop.train_left = min(self.trainer.steps_per_epoch, loop.final_total - loop.final_done)
        self.trainer.set_lr(self.cfg.lr * 0.5 * (1 + math.cos(math.pi * loop.final_done / loop.final_total)))

    def _train_slice(self) -> None:
        """At most SLICE_STEPS optimizer steps of the current interval; a record at its end; a timed checkpoint."""
        loop = self.loop
        n = min(loop.train_left, SLICE_STEPS)
        self._train(n)
        loop.train_left -= n
        if loop.phase == "final":
            loop.final_done += n
        crashpoints.point("slice")
        if loop.train_left == 0:
            loop.train_loss = self.trainer.mean_loss()
            if loop.phase == "final":
                self._record("final", loop.train_loss, loop.final_start_epoch + self.cfg.final_epochs)
        if self._poll():
            self.checkpoint(full=True)

    def _poll(self) -> bool:
        """Whether a timed checkpoint is due; turns a signal into a stop request. When several processes
        run, rank 0's clock decides the checkpoint and a signal to any process stops all, at the same step."""
        due = time.perf_counter() - self._last_checkpoint >= 60.0 * self.cfg.checkpoint_every
        if self.parallel is None:
            self._stop_requested = self._signalled
            return due
        flags = self.parallel.max(torch.tensor([float(due and self.is_main), float(self._signalled)]))
        self._stop_requested = bool(flags[1])
        return bool(flags[0])

    def _loop(self) -> None:
        while self.loop.phase != "done" and not self._stop_requested:
            if self.loop.train_left > 0:
                self._train_slice()
            elif self.loop.phase == "grow":
                self._growth_point()
            else:
                self._final_point()

    def run(self, on_progress: Callable[[Progress], None] | None = None) -> GrowResult:
        """Grow, then train the final architecture; checkpoint as the module docstring says.

        A SIGINT or SIGTERM stops at the next slice boundary with a resumable checkpoint
        (``status: interrupted``); a second one interrupts at once (the last checkpoint stays).
        """
        self.on_progress = on_progress or self.on_progress
        threads = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads())
        keep_freed_buffers()
        self.started = self._last_checkpoint = time.perf_counter()
        try:
            if self.is_main and self.run_dir is not None:
                self.writer = RunWriter(self.run_dir)
                if self.resumed is not None:
                    self.writer.reopen(self.resumed)
                else:
                    make_run_dir(self.run_dir)
                    self.writer.start()
            if self.resumed is None:
                self.loop.train_loss = evaluate(self.model, self.train_set.X, self.train_set.y, self.loss_fn,
                                                self.task)[0]
                self.checkpoint(full=True)  # generation 1: the initial state, so that every kill can resume
            with _stop_requests(self):
                try:
                    self._loop()
                except RuntimeError as exc:
                    if self.parallel is None or not self.parallel.is_collective_error(exc):
                        raise
                    raise TinyDeployError(
                        f"rank {self.parallel.rank}: another process of the job stopped ({str(exc).splitlines()[0]}); "
                        f"the last checkpoint is kept: resume with 'tinydeploy grow --resume {self.run_dir}'") from None
            status = "complete" if self.loop.phase == "done" else "interrupted"
            metrics = self.checkpoint(status)
            if self.writer is not None:
                self.writer.publish(metrics, self.history)
            if self.parallel is not None:
                self.parallel.close()
        finally:
            torch.set_num_threads(threads)
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        return GrowResult(self.run_dir, spec_from_model(self.model, self.spec),
                          {**metrics, "history": self.history}, self.log)

    # ----- outputs ------------------------------------------------------------------------------
    def metrics(self, status: str, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
        """The summary of the run as it stands (the history is in history.jsonl), evaluated on ``splits``."""
        spec = spec_from_model(self.model, self.spec)
        results = {}
        for name in splits:
            loss, metric = self._evaluate(name)
            results[name] = {"loss": loss, "accuracy" if self.task == "classification" else "mse": metric}
            if self.task != "classification":
                results[name].update(self._regression_scores(name))
        wall = self.wall_before + time.perf_counter() - self.started
        return {
            "status": status, "dataset": self.data.name, "task": self.task, "arch": self.arch,
            "method": self.cfg.method,
            "seed": self.cfg.seed, "device": str(self.device), "data_source": self.data.source,
            "initial_widths": self.spec.hidden_widths, "final_widths": spec.hidden_widths,
            "initial_params": self.spec.n_params(), "params": spec.n_params(), "macs": spec.macs(),
            "max_params": self.max_params, "max_macs": self.max_macs, "input_noise": self.input_noise,
            "max_shift": self.max_shift, "metrics": results,
            "epochs": round(self.trainer.epoch, 4), "growth_events": len(self.log), "growth_steps": self.loop.step,
            "phase": self.loop.phase, "stop_reason": self.loop.stop_reason,
            "final_bottleneck": [self.psi.get(i) for i in self.spec.growable_indices],
            **(self._regions() if "test" in splits else {}),
            "wall_time_s": {"total": wall, "training": self.time_train, "growth": self.time_growth,
                            "checkpoint": self.time_checkpoint},
            "processes": self._processes(),
            "config": self._config, "command": self.command,
            "versions": {"tinydeploy": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }

    def linear_regions(self) -> int:
        """Distinct ReLU activation patterns of the current model on a grid over the training inputs' box."""
        X = self.train_set.X
        return count_linear_regions(self.model, X.min(dim=0).values.tolist(), X.max(dim=0).values.tolist())

    def _regions(self) -> dict[str, int]:
        """{"linear_regions", "linear_regions_end_of_growth", "region_grid"} for 2-D inputs to a ReLU MLP
        (``tinydeploy.model.regions``), else {}."""
        if not regions_apply(self.model, self.data.input_shape):
            return {}
        end = {} if self.loop.regions_end_of_growth is None else {"linear_regions_end_of_growth":
                                                                   self.loop.regions_end_of_growth}
        return {"linear_regions": self.linear_regions(), **end, "region_grid": RESOLUTION}

    def checkpoint(self, status: str = "running", full: bool = False) -> dict[str, Any]:
        """Commit one generation of the run directory (rank 0 only); returns the metrics written.

        After a growth step the metrics hold the validation scores the step recorded; the training and
        test splits are evaluated at ``full`` checkpoints (the timed ones, the first and the last)."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.writer is None and self.parallel is None:  # in memory: nothing to save, the last metrics to return
            return self.metrics(status) if status != "running" else metrics
        resume = self.resume_state()  # every process: the trainer gathers their running loss sums
        if self.writer is not None:
            full = full or status != "running"
            metrics = self.metrics(status, ("train", "val", "test") if full else ("val",))
            self.writer.commit(self.model, spec_from_model(self.model, self.spec), metrics, status, resume)
        self._last_checkpoint = time.perf_counter()
        self.time_checkpoint += self._last_checkpoint - start
        return metrics

    # ----- resume -------------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return {"generator": self.generator, "cpu_generator": self.cpu_generator}

    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything besides the weights that the next step depends on, as tensors and JSON."""
        opt_tensors, opt_state = optimizer_state(self.trainer.optimizer)
        rng_tensors, rngs = rng_state(self._generators())
        trainer_tensors, trainer_state = self.trainer.state()
        state = {
            "config": self._config, "loop": asdict(self.loop), "optimizer": opt_state, "rng": rngs,
            "trainer": trainer_state, "psi": {str(k): v for k, v in self.psi.items()},
            "time": {"wall": self.wall_before + time.perf_counter() - self.started, "training": self.time_train,
                     "growth": self.time_growth, "checkpoint": self.time_checkpoint},
            "environment": {"threads": torch.get_num_threads(), "processes": self._processes(),
                            "device": self.device.type, "torch": torch.__version__, "tinydeploy": __version__},
            "data_sha256": self._data_sha256,
        }
        return {**opt_tensors, **rng_tensors, **trainer_tensors}, state

    def _processes(self) -> int:
        return self.parallel.world if self.parallel is not None else 1

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt`` (a generation written by ``checkpoint``): the inverse of ``resume_state``."""
        state, tensors = ckpt.state, ckpt.tensors
        if state["data_sha256"] != self._data_sha256:
            raise TinyDeployError(f"the data of {self.cfg.dataset} differ from the data the run in {self.run_dir} "
                                  "started with: resume with the same dataset files")
        env = state["environment"]
        if env["device"] != self.device.type:
            raise TinyDeployError(f"--resume {self.run_dir}: the run trained on {env['device']}, this resume would run "
                                  f"on {self.device.type}: pass --device {env['device']}")
        if env["threads"] != self.cpu_threads() and self.device.type == "cpu":
            self.notices.append(f"the run used {env['threads']} CPU thread(s), this resume {self.cpu_threads()}: "
                                "results are not bit-identical to an uninterrupted run (pass --threads)")
        if env["processes"] != self._processes():
            self.notices.append(f"the run used {env['processes']} process(es), this resume {self._processes()}: "
                                "results are not bit-identical to an uninterrupted run")
        if env["torch"] != torch.__version__:
            self.notices.append(f"the run used torch {env['torch']}, this resume {torch.__version__}: results may "
                                "differ in the last bits")
        model = ckpt.model.to(self.device)
        optimizer = self.trainer.new_optimizer(model)
        load_optimizer_state(optimizer, tensors, state["optimizer"])
        self.trainer.replace_model(model, optimizer)
        self.trainer.load_state(tensors, state["trainer"])
        self.loop = LoopState(**state["loop"])
        self.psi = {int(k): v for k, v in state["psi"].items()}
        times = state["time"]
        self.wall_before, self.time_train = times["wall"], times["training"]
        self.time_growth, self.time_checkpoint = times["growth"], times["checkpoint"]
        self.log, self.history = list(ckpt.growth_log), list(ckpt.history)
        self.notices += [f"{n}: resumed from generation {ckpt.commit['generation']}" for n in ckpt.notices[:1]]
        restore_rng(self._generators(), tensors, state["rng"])
        self.resumed = ckpt


@contextlib.contextmanager
def _stop_requests(job: GrowJob) -> Iterator[None]:
    """SIGINT/SIGTERM ask the job to stop at its next slice boundary; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum: int, _frame: Any) -> None:
        if job._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        job._signalled = True

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def default_run_dir(dataset: str) -> Path:
    """runs/<dataset>-<timestamp> under the current directory."""
    name = Path(dataset).stem if dataset.endswith((".csv", ".npz")) else dataset
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless ``force`` (which clears what the earlier
    run owned, its exports included: ``rundir.clear_run_dir``); refuse a file path."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TinyDeployError(f"--out {run_dir} is a file: pass a directory path")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        raise TinyDeployError(f"--out {run_dir} is not empty: pass a new directory or --force to overwrite")
    problem = foreign_export(run_dir) if run_dir.is_dir() else None
    if problem:
        raise TinyDeployError(f"--force over {run_dir}: {problem}; --force removes only what a run owns (its files, "
                              "checkpoints and exports): move it out or pass a new --out")


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TinyDeployError(f"cannot create --out {run_dir}: {exc.strerror}; pass a writable directory") from exc


def _process_group(cfg: GrowConfig) -> ProcessGroup | None:
    """This process's group when started by torchrun, else None (one process)."""
    from tinydeploy.training import distributed

    if not distributed.in_torchrun():
        return None
    return distributed.join(resolve_device(cfg.device))


def prepare_grow(cfg: GrowConfig, run_dir: Path | None = None, *, force: bool = False, command: str = "") -> GrowJob:
    """Validate options, output directory and data; writes nothing, so bad input leaves no trace."""
    cfg.validate()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg.dataset)
    parallel = _process_group(cfg)
    if parallel is None or parallel.is_main:
        check_run_dir(run_dir, force)
    return GrowJob(cfg, run_dir, command, parallel)


#: Options that may differ on --resume: they change how the run is executed or saved, not what it computes.
RESUME_MAY_CHANGE = ("checkpoint_every", "threads", "device")


def prepare_resume(run_dir: Path, given: dict[str, Any] | None = None, *, command: str = "") -> GrowJob:
    """A job that continues the interrupted run in ``run_dir``; ``given`` are options passed explicitly
    (GrowConfig field -> value), refused when they contradict the saved config."""
    run_dir = Path(run_dir)
    if not (run_dir / COMMIT_LOG).is_file():
        if not run_dir.is_dir():
            raise TinyDeployError(f"--resume {run_dir}: no such directory; pass the --out directory of a 'tinydeploy grow'")
        raise TinyDeployError(f"--resume {run_dir}: not a resumable tinydeploy run (no {COMMIT_LOG}): pass the --out "
                              "directory of a 'tinydeploy grow', or start a new run")
    ckpt = read_checkpoint(run_dir, resume=True)
    if ckpt.commit["status"] == "complete":
        raise TinyDeployError(f"--resume {run_dir}: the run is already complete; export it with "
                              f"'tinydeploy export {run_dir}' or start a new run")
    if not ckpt.commit["resumable"]:
        raise TinyDeployError(f"--resume {run_dir}: the run holds no resumable state; start a new run")
    saved = ckpt.state["config"]
    known = {f.name for f in fields(GrowConfig)}
    if set(saved) - known:
        raise TinyDeployError(f"--resume {run_dir}: the run was written by tinydeploy "
                              f"{ckpt.state['environment']['tinydeploy']} with options this version does not know "
                              f"({', '.join(sorted(set(saved) - known))}): resume it with that version")
    conflicts = [f"--{k.replace('_', '-')} {_show(v)} (the run has {_show(saved.get(k))})"
                 for k, v in (given or {}).items() if k not in RESUME_MAY_CHANGE and k in known and v != saved.get(k)]
    if conflicts:
        raise TinyDeployError(f"--resume {run_dir}: {'; '.join(conflicts)} contradict(s) the saved run: drop the "
                              "option(s) to resume, or start a new run")
    cfg = GrowConfig(**{**saved, **{k: v for k, v in (given or {}).items() if k in RESUME_MAY_CHANGE}})
    cfg.validate()
    job = GrowJob(cfg, run_dir, command, _process_group(cfg))
    job.restore(ckpt)
    return job


def _show(value: Any) -> str:
    if value is None:
        return "the default"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def run_grow(
    cfg: GrowConfig,
    run_dir: Path | None = None,
    *,
    force: bool = False,
    command: str = "",
    on_progress: Callable[[Progress], None] | None = None,
) -> GrowResult:
    """Grow a network as ``cfg`` says and write its run directory (checkpoints as the module docstring says)."""
    return prepare_grow(cfg, run_dir, force=force, command=command).run(on_progress)
