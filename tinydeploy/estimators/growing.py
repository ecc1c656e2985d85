"""``GrowingClassifier`` and ``GrowingRegressor``: scikit-learn estimators that grow a network with TINY.

``fit(X, y)`` runs the same grow job as ``tinydeploy grow`` (``training.job.GrowJob``, here on arrays
in memory: ``data.arrays_dataset``) with the estimator's parameters as the grow options; nothing is
written to disk. The parameters are the options of ``tinydeploy grow`` under the same names
(``GROW_PARAMETERS``), plus ``validation_fraction`` (``--val-fraction``: the split that the line
search, the significance test and ``--target-accuracy`` read), ``random_state`` (``--seed`` and
``--split-seed``), ``input_shape`` (rows reshaped to images (C, H, W) or signals (C, L) for a CNN)
and ``verbose``. Every other grow option has no meaning here (``NOT_PARAMETERS`` says why).

After ``fit``: ``predict``, ``predict_proba`` (classifier), ``score`` (accuracy or R^2), and the
attributes ``classes_``, ``n_features_in_``, ``feature_names_in_`` (DataFrame columns, which also
name the features of exported models), ``spec_``, ``model_`` (the plain PyTorch model),
``hidden_widths_``, ``n_params_``, ``metrics_`` and ``growth_log_``. Predictions run the frozen model
(standardisation included) in float64, so that they do not depend on the batch they come in.

``save(dir)`` writes the run directory ``tinydeploy grow --out dir`` would (plus ``data.npz``: the
arrays, which ``export`` and ``verify`` gate the model on); ``export(dir, formats)`` saves it and
exports it to ``dir/artifacts`` like ``tinydeploy export dir``. There is no test split: the
metrics' "test" scores are the validation split's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from tinydeploy.atomic import atomic_path
from tinydeploy.data import arrays_dataset
from tinydeploy.data.dataset import MIN_TRAIN_SAMPLES
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.parity import DEFAULT_ATOL, DEFAULT_RTOL
from tinydeploy.export.pipeline import ExportResult, export_run
from tinydeploy.model.freeze import freeze
from tinydeploy.serving.providers import DEFAULT_PROVIDER
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import GrowJob, Progress, check_run_dir, make_run_dir
from tinydeploy.training.rundir import DATA_FILE, write_run

#: Estimator parameters that are ``tinydeploy grow`` options of the same name (``GrowConfig`` fields).
GROW_PARAMETERS = (
    "method", "arch", "init_widths", "conv_kernels", "conv_strides", "conv_pools", "transition", "hidden_layers",
    "activation", "grow_every", "max_growth_epochs", "final_epochs", "neurons_per_step", "layers_per_step",
    "max_params", "max_macs", "max_width", "target_accuracy", "patience", "lr", "batch_size", "weight_decay",
    "input_noise", "max_shift", "ridge", "balance", "device", "threads",
)
#: ``GrowConfig`` fields that are not parameters, and why (``tests/test_estimators.py`` keeps this complete).
NOT_PARAMETERS = {
    "dataset": "the data is fit's X and y",
    "data_dir": "the data is fit's X and y",
    "target": "the data is fit's X and y",
    "task": "the class says it: GrowingClassifier or GrowingRegressor",
    "seed": "random_state",
    "split_seed": "random_state",
    "val_fraction": "validation_fraction",
    "checkpoint_every": "fit writes no checkpoints",
    "line_search_batch": "not a grow option either (the line search's held-out batch size)",
    "width_factor": "ResNets only: the estimators grow MLPs and CNNs of tabular or signal data",
    "stream_width": "ResNets only: the estimators grow MLPs and CNNs of tabular or signal data",
    "optimizer": "set by the architecture's recipe (SGD is the ResNet protocol's)",
    "precision": "CUDA autocast for ResNets; the estimators train in float32",
}
_LIST_PARAMETERS = ("init_widths", "conv_kernels", "conv_strides", "conv_pools")


class _GrowingEstimator(BaseEstimator):
    """What both estimators share; see the module docstring."""

    _task = ""

    def __init__(
        self,
        *,
        method: str = "tiny",
        arch: str | None = None,
        init_widths: Iterable[int] | None = None,
        conv_kernels: Iterable[int] | None = None,
        conv_strides: Iterable[int] | None = None,
        conv_pools: Iterable[int] | None = None,
        transition: str = "flatten",
        hidden_layers: int | None = None,
        activation: str = "relu",
        grow_every: float | None = None,
        max_growth_epochs: float | None = None,
        final_epochs: float | None = None,
        neurons_per_step: int = 16,
        layers_per_step: int | None = None,
        max_params: int | None = None,
        max_macs: int | None = None,
        max_width: int | None = None,
        target_accuracy: float | None = None,
        patience: int = 8,
        lr: float = 3e-3,
        batch_size: int | None = None,
        weight_decay: float = 1e-3,
        input_noise: float | None = None,
        max_shift: int | None = None,
        ridge: float | None = None,
        balance: bool | None = None,
        device: str = "auto",
        threads: int | None = None,
        validation_fraction: float = 0.2,
        random_state: int | None = 0,
        input_shape: tuple[int, ...] | None = None,
        verbose: int = 0,
    ) -> None:
        self.method = method
        self.arch = arch
        self.init_widths = init_widths
        self.conv_kernels = conv_kernels
        self.conv_strides = conv_strides
        self.conv_pools = conv_pools
        self.transition = transition
        self.hidden_layers = hidden_layers
        self.activation = activation
        self.grow_every = grow_every
        self.max_growth_epochs = max_growth_epochs
        self.final_epochs = final_epochs
        self.neurons_per_step = neurons_per_step
        self.layers_per_step = layers_per_step
        self.max_params = max_params
        self.max_macs = max_macs
        self.max_width = max_width
        self.target_accuracy = target_accuracy
        self.patience = patience
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.input_noise = input_noise
        self.max_shift = max_shift
        self.ridge = ridge
        self.balance = balance
        self.device = device
        self.threads = threads
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.input_shape = input_shape
        self.verbose = verbose

    # ----- fitting ------------------------------------------------------------------------------
    def grow_config(self) -> GrowConfig:
        """The ``tinydeploy grow`` options these parameters stand for."""
        options = {name: getattr(self, name) for name in GROW_PARAMETERS}
        for name in _LIST_PARAMETERS:
            if options[name] is not None:
                options[name] = [int(v) for v in options[name]]
        seed = 0 if self.random_state is None else int(self.random_state)
        return GrowConfig(dataset=type(self).__name__, task=self._task, seed=seed, split_seed=seed,
                          val_fraction=float(self.validation_fraction), **options)

    def _grow(self, X: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> None:
        """Grow on (X, y) (labels 0..C-1 for a classifier) and keep the result (the fitted attributes)."""
        if len(X) < MIN_TRAIN_SAMPLES:
            raise ValueError(f"n_samples={len(X)}: {type(self).__name__} needs at least {MIN_TRAIN_SAMPLES} samples "
                             "(a validation split is carved from them)")
        names = tuple(str(n) for n in getattr(self, "feature_names_in_", ()))
        X = self._shaped(X)
        try:
            cfg = self.grow_config()
            cfg.validate()
            data = arrays_dataset(X, y, task=self._task, classes=classes, feature_names=names if X.ndim == 2 else (),
                                  split_seed=cfg.split_seed, val_fraction=cfg.val_fraction, name=type(self).__name__)
            job = GrowJob(cfg, None, command=repr(self), data=data)
            result = job.run(self._report if self.verbose else None)
        except TinyDeployError as exc:
            raise ValueError(str(exc)) from None
        if result.metrics["status"] != "complete":
            raise KeyboardInterrupt(f"{type(self).__name__}.fit was interrupted at epoch {result.metrics['epochs']:.2f}")
        self.model_ = job.model.cpu().eval()
        self.spec_ = result.spec
        self.metrics_ = result.metrics
        self.growth_log_ = result.growth_log
        self.hidden_widths_ = result.spec.hidden_widths
        self.n_params_ = result.spec.n_params()
        self._frozen = freeze(self.model_, self.spec_, preprocessing=True).double()
        arrays = {"X_train": X, "y_train": y, "X_test": data.X_val, "y_test": data.y_val}
        self._arrays = {**arrays, **({"feature_names": np.array(names)} if data.feature_names else {})}

    def _shaped(self, X: np.ndarray) -> np.ndarray:
        """Rows as the network's inputs: float32, reshaped to ``input_shape`` when given."""
        X = np.array(X, dtype=np.float32)  # a copy: read-only or memory-mapped inputs stay untouched
        if self.input_shape is None:
            return X
        shape = tuple(int(s) for s in self.input_shape)
        if int(np.prod(shape)) != X.shape[1]:
            raise ValueError(f"input_shape {list(shape)} holds {int(np.prod(shape))} values but X has {X.shape[1]} "
                             "features")
        return X.reshape(len(X), *shape)

    def _report(self, p: Progress) -> None:
        print(f"{type(self).__name__}: {p.phase} epoch {p.epoch:.2f}/{p.total_epochs:g} loss {p.train_loss:.4f} "
              f"{p.metric_name} {p.val_metric:.4f} widths {p.widths} params {p.params}", file=sys.stderr)

    # ----- predicting ---------------------------------------------------------------------------
    @torch.no_grad()
    def _outputs(self, X: Any) -> np.ndarray:
        """The frozen model's float64 outputs for raw rows X."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        inputs = torch.from_numpy(np.ascontiguousarray(self._shaped(X), dtype=np.float64))
        return self._frozen(inputs).numpy()

    # ----- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the run directory of this fit to ``path`` (what ``tinydeploy grow --out path`` writes,
        plus ``data.npz``); refused when ``path`` is not empty, unless ``force``."""
        check_is_fitted(self)
        path = Path(path)
        try:
            check_run_dir(path, force)
            make_run_dir(path)
            data = (path / DATA_FILE).resolve()
            source = {**self.metrics_["data_source"], "name": str(data)}
            write_run(path, self.model_, self.spec_, self.growth_log_, {**self.metrics_, "data_source": source})
            with atomic_path(data) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **self._arrays)
        except TinyDeployError as exc:
            raise ValueError(str(exc)) from None
        return path

    def export(
        self,
        path: str | Path,
        formats: Iterable[str] = ("onnx",),
        *,
        force: bool = False,
        opset: int | None = None,
        atol: float = DEFAULT_ATOL,
        rtol: float = DEFAULT_RTOL,
        provider: str = DEFAULT_PROVIDER,
    ) -> ExportResult:
        """Save the run to ``path`` and export it to ``path/artifacts`` (``tinydeploy export path``):
        safetensors and ``formats`` (onnx, torchscript, pt2), each gated on parity; a manifest."""
        run_dir = self.save(path, force=force)
        try:
            return export_run(run_dir, None, formats, opset, True, atol, rtol, f"{type(self).__name__}.export",
                              provider)
        except TinyDeployError as exc:
            raise ValueError(str(exc)) from None


class GrowingClassifier(ClassifierMixin, _GrowingEstimator):
    """A classifier grown from width 1 with TINY (``tinydeploy grow`` as a scikit-learn estimator).

    Parameters are ``tinydeploy grow``'s options (see ``tinydeploy.estimators.growing``), e.g.
    ``GrowingClassifier(max_params=3000, final_epochs=30)``.
    """

    _task = "classification"

    def fit(self, X: Any, y: Any) -> "GrowingClassifier":
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        self._grow(X, labels.astype(np.int64), tuple(str(c) for c in self.classes_))
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the network's outputs, one column per class of ``classes_``."""
        logits = self._outputs(X)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        outputs = self._outputs(X)
        return self.classes_[np.argmax(outputs, axis=1)]


class GrowingRegressor(RegressorMixin, _GrowingEstimator):
    """A regressor grown from width 1 with TINY (``tinydeploy grow`` as a scikit-learn estimator); one
    or several targets.

    Parameters are ``tinydeploy grow``'s options (see ``tinydeploy.estimators.growing``), e.g.
    ``GrowingRegressor(max_params=1000)``.
    """

    _task = "regression"

    def fit(self, X: Any, y: Any) -> "GrowingRegressor":
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True)
        self._single_output = y.ndim == 1
        self._grow(X, np.asarray(y, dtype=np.float32), ())
        return self

    def predict(self, X: Any) -> np.ndarray:
        outputs = self._outputs(X)
        return outputs[:, 0] if self._single_output else outputs

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
