"""The scikit-learn estimators: scikit-learn's own estimator checks, Pipeline and cross_val_score, the
parameters as grow options, DataFrame feature names carried into exports, save/export writing what the
CLI writes, and ``import tinydeploy`` staying free of torch and scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from tinydeploy import GrowingClassifier, GrowingRegressor
from tinydeploy.estimators.growing import GROW_PARAMETERS, NOT_PARAMETERS
from tinydeploy.export.verify import verify_export
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.rundir import read_run

REPO = Path(__file__).resolve().parents[1]
#: Small budgets that keep each fit of the checks well under a second: one growth epoch, three final
#: epochs, one thread. scikit-learn's checks still ask for > 0.83 training accuracy on blobs and
#: R^2 > 0.5 on a regression problem, which these fits reach.
FAST = {"max_growth_epochs": 1.0, "final_epochs": 3.0, "threads": 1, "device": "cpu"}


#: No check is expected to fail. scikit-learn itself skips check_array_api_input (it needs
#: SCIPY_ARRAY_API=1 and an array API library; the estimators take numpy arrays) and the sample_weight
#: checks (fit takes no sample_weight: growth statistics and the line search weigh samples equally).
@parametrize_with_checks([GrowingClassifier(**FAST), GrowingRegressor(**FAST)], expected_failed_checks=lambda est: {})
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    check(estimator)


def test_every_grow_option_is_a_parameter_or_said_why_not() -> None:
    options = {f.name for f in fields(GrowConfig)}
    assert options == set(GROW_PARAMETERS) | set(NOT_PARAMETERS)
    assert set(GROW_PARAMETERS) <= set(GrowingClassifier().get_params())
    clf = GrowingClassifier().set_params(max_params=777, init_widths=(2, 3), random_state=5, validation_fraction=0.3)
    cfg = clf.grow_config()
    assert (cfg.max_params, cfg.init_widths, cfg.seed, cfg.split_seed, cfg.val_fraction) == (777, [2, 3], 5, 5, 0.3)
    assert cfg.task == "classification" and GrowingRegressor().grow_config().task == "regression"


def test_bad_parameters_are_value_errors_naming_the_option() -> None:
    X, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2
    with pytest.raises(ValueError, match="unknown method 'magic': use one of tiny"):
        GrowingClassifier(method="magic", **FAST).fit(X, y)
    with pytest.raises(ValueError, match=r"n_samples=5: GrowingClassifier needs at least 10 samples"):
        GrowingClassifier(**FAST).fit(X[:5], y[:5])


@pytest.fixture(scope="module")
def cancer() -> tuple[pd.DataFrame, pd.Series]:
    return load_breast_cancer(return_X_y=True, as_frame=True)


def test_pipeline_and_cross_val_score(cancer) -> None:
    X, y = cancer
    pipeline = make_pipeline(StandardScaler(), GrowingClassifier(**FAST))
    scores = cross_val_score(pipeline, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.85


def test_dataframe_names_reach_the_export_and_the_server_order(cancer, tmp_path: Path) -> None:
    X, y = cancer
    labels = np.where(y == 0, "malignant", "benign")
    clf = GrowingClassifier(**FAST).fit(X, labels)
    assert list(clf.feature_names_in_) == list(X.columns) and clf.n_features_in_ == 30
    assert list(clf.classes_) == ["benign", "malignant"] and clf.score(X, labels) > 0.9
    result = clf.export(tmp_path / "run", formats=("onnx",))
    assert result.out_dir == tmp_path / "run" / "artifacts" and all(r.passed for r in result.parity)
    verify_export(result.out_dir)  # the gate re-runs on the saved arrays
    model = OnnxModel(result.out_dir)
    assert model.feature_names == list(X.columns) and model.classes == ["benign", "malignant"]
    np.testing.assert_allclose(model.predict(X.to_numpy()).probabilities, clf.predict_proba(X), atol=1e-5)
    shuffled = X.columns[::-1]
    reordered = model.match_columns(X[shuffled].to_numpy(), list(shuffled), "test")
    assert model.predict(reordered).labels == list(clf.predict(X))


def test_save_writes_the_run_directory_the_cli_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = X[:, 0] * 3 + 7
    reg = GrowingRegressor(**FAST).fit(X, y)
    run = reg.save(tmp_path / "run")
    names = {p.name for p in run.iterdir()}
    assert names == {"arch.json", "checkpoints", "checkpoints.jsonl", "data.npz", "growth_log.jsonl",
                     "history.jsonl", "metrics.json", "model.safetensors"}
    loaded = read_run(run)
    assert loaded.status == "complete" and loaded.spec.to_json() == reg.spec_.to_json()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "regression" and set(metrics["metrics"]["test"]) >= {"mse", "rmse", "mae", "r2"}
    with pytest.raises(ValueError, match="is not empty: pass a new directory or --force"):
        reg.save(run)
    assert reg.save(run, force=True) == run


def test_import_tinydeploy_needs_neither_torch_nor_sklearn() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sklearn'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tinydeploy\n"
        "print(tinydeploy.__version__)\n"
        "try:\n"
        "    tinydeploy.GrowingClassifier\n"
        "except ImportError as exc:\n"
        "    print('lazy:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    version, lazy = done.stdout.splitlines()
    assert version == "0.1.0" and lazy.startswith("lazy: ") and "is blocked" in lazy
