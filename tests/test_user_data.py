"""User files as a new user brings them: the task (auto-detected or --task), feature names from a CSV
header or an .npz, blank cells refused with their row, and regression scored with RMSE, MAE and R^2
from metrics.json to the export's parity and report (real files, real grows on the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_diabetes
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.data import load_dataset
from tinydeploy.data.arrays import infer_task
from tinydeploy.errors import DataError
from tinydeploy.export.quantize import QuantizationError, quantize_int8
from tinydeploy.model.scores import regression_scores

TINY = ["--max-growth-epochs", "0.5", "--final-epochs", "1", "--threads", "1", "--device", "cpu"]


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _save_npz(path: Path, X: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> Path:
    n = int(len(X) * 0.8)
    np.savez(path, X_train=X[:n], y_train=y[:n], X_test=X[n:], y_test=y[n:], **extra)
    return path


# ----- the task ----------------------------------------------------------------------------------------
def test_task_rule_on_labels_and_quantities() -> None:
    diabetes = load_diabetes().target  # 214 distinct whole numbers among 442 samples
    assert np.array_equal(diabetes, np.round(diabetes)) and infer_task(diabetes) == "regression"
    assert infer_task(np.arange(300) % 10) == "classification"  # 10 values: always labels
    assert infer_task(np.arange(1000) % 100) == "classification"  # 100 values, 10 samples each
    assert infer_task(np.arange(400) % 100) == "regression"  # 100 values, 4 samples each
    assert infer_task(np.array([0.5, 1.0, 2.0] * 10)) == "regression"
    assert infer_task(np.zeros((30, 2))) == "regression"


def test_integer_regression_npz_grows_as_regression_without_options(tmp_path: Path) -> None:
    """sklearn's diabetes saved as .npz: whole-number targets, a regression (issue 15 acceptance)."""
    data = load_diabetes()
    path = _save_npz(tmp_path / "diabetes.npz", data.data.astype(np.float32), data.target,
                     feature_names=np.array(data.feature_names))
    grown = cli("grow", "--dataset", path, "--out", tmp_path / "run", *TINY)
    assert grown.exit_code == 0, grown.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "regression"
    test = metrics["metrics"]["test"]
    assert test["rmse"] == pytest.approx(np.sqrt(test["mse"])) and -5 < test["r2"] <= 1 and test["mae"] > 0
    assert "test  rmse" in grown.stdout and ", r2 " in grown.stdout
    arch = json.loads((tmp_path / "run" / "arch.json").read_text())
    assert arch["feature_names"] == list(data.feature_names)
    exported = cli("export", tmp_path / "run", "--onnx")
    assert exported.exit_code == 0, exported.stderr
    header = next(line for line in exported.stdout.splitlines() if line.startswith("format"))
    assert header.split()[-3:] == ["rmse", "r2", "parity"]
    assert "frozen model on the test split: rmse " in exported.stdout
    parity = json.loads((tmp_path / "run" / "artifacts" / "parity.json").read_text())
    scores = parity["formats"]["onnx"]["metric"]["scores"]
    assert scores["artifact"]["r2"] == pytest.approx(scores["frozen"]["r2"], abs=1e-5)
    assert scores["frozen"]["mse"] == pytest.approx(test["mse"], rel=1e-4)
    report = cli("report", tmp_path / "run" / "artifacts")
    assert all(f"test {name}" in report.stdout for name in ("mse", "rmse", "mae", "r2"))
    try:  # the int8 gate reports the same scores (whether or not int8 passes on this briefly trained model)
        gate = quantize_int8(tmp_path / "run" / "artifacts", latency_iters=3).report["gate"]
    except QuantizationError as exc:
        gate = exc.result["gate"]
    assert gate["scores"]["int8"]["mse"] == gate["int8"] and gate["scores"]["fp32"]["mse"] == gate["fp32"]
    for name in ("rmse", "mae", "r2"):
        assert gate["scores"]["fp32"][name] == pytest.approx(scores["artifact"][name], rel=1e-6, abs=1e-9)


def test_task_option_overrides_and_the_label_error_suggests_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3)).astype(np.float32)
    y = (np.arange(400) % 7) + 3  # 7 whole numbers 3..9: taken for labels, but not 0..C-1
    path = _save_npz(tmp_path / "counts.npz", X, y)
    with pytest.raises(DataError, match=r"labels must be 0\.\.C-1 .*relabel them; if y is a quantity rather than a "
                                        r"class label, pass --task regression$"):
        load_dataset(str(path))
    assert load_dataset(str(path), task="regression").task == "regression"
    assert load_dataset(str(path), task="regression").source["task"] == "regression"
    fractions = _save_npz(tmp_path / "fractions.npz", X, rng.normal(size=400))
    with pytest.raises(DataError, match=r"--task classification: y_train/y_test in .* are not one column of whole "
                                        r"numbers, so they cannot be class labels"):
        load_dataset(str(fractions), task="classification")
    refused = cli("grow", "--dataset", "sine", "--task", "classification", "--out", tmp_path / "r")
    assert refused.exit_code == 2 and refused.stderr.strip() == (
        "error: --task classification: 'sine' is a regression dataset; --task applies to your .npz/.csv files: drop it")
    bad = cli("grow", "--dataset", path, "--task", "ranking", "--out", tmp_path / "r")
    assert bad.exit_code == 2 and "unknown --task 'ranking': use classification or regression" in bad.stderr
    assert not (tmp_path / "r").exists()


def test_csv_numbers_follow_the_same_rule(tmp_path: Path) -> None:
    rows = "\n".join(f"{i % 13},{(i * 37) % 200}" for i in range(100))
    (tmp_path / "q.csv").write_text("x,y\n" + rows + "\n")
    data = load_dataset(str(tmp_path / "q.csv"), target="y")  # 100 distinct values among 100 rows
    assert data.task == "regression" and data.feature_names == ("x",)
    assert load_dataset(str(tmp_path / "q.csv"), target="x").task == "classification"  # 13 values, 7+ each


def test_pickled_arrays_are_refused_by_name_never_loaded(tmp_path: Path) -> None:
    """pandas columns saved as they are become object arrays: refused with the array's name and the fix."""
    X = np.random.default_rng(0).normal(size=(60, 2)).astype(np.float32)
    labels = np.array(["yes", "no"] * 30, dtype=object)
    path = _save_npz(tmp_path / "objects.npz", X, labels)
    with pytest.raises(DataError, match=rf"^y_train in {path} is an array of Python objects \(pickled\), which "
                                        r"tinydeploy never loads: save it as numbers or strings, e\.g\. "
                                        r"np\.asarray\(y_train, dtype=float\) or dtype=str$"):
        load_dataset(str(path))
    path = _save_npz(tmp_path / "names.npz", X, np.arange(60) % 2, feature_names=np.array(["a", "b"], dtype=object))
    with pytest.raises(DataError, match=rf"^feature_names in {path} is an array of Python objects"):
        load_dataset(str(path))


# ----- blank cells -------------------------------------------------------------------------------------
def test_blank_label_cell_is_refused_with_its_row(tmp_path: Path) -> None:
    lines = ["a,b,label"] + [f"{i},{i % 3},{'yes' if i % 2 else 'no'}" for i in range(30)]
    lines[8] = "7,1,"  # line 9 of the file: a blank text label
    path = tmp_path / "blank.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path} row 9: the label column 'label' is blank: fill it in or drop the row$"):
        load_dataset(str(path), target="label")
    lines[8], lines[20] = "7,1,yes", " ,1,no"  # a blank feature cell, line 21
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path} row 21: the feature column 'a' is blank: fill it in or drop the row$"):
        load_dataset(str(path), target="label")


# ----- scores ------------------------------------------------------------------------------------------
def test_regression_scores_equal_scikit_learn_metrics() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 2))
    out = y + rng.normal(scale=0.3, size=(50, 2))
    scores = regression_scores(out, y)
    assert scores["mse"] == pytest.approx(mean_squared_error(y, out))
    assert scores["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, out)))
    assert scores["mae"] == pytest.approx(mean_absolute_error(y, out))
    assert scores["r2"] == pytest.approx(r2_score(y, out))
    constant = np.ones((10, 1))
    assert regression_scores(constant, constant)["r2"] == 1.0 and regression_scores(constant * 2, constant)["r2"] == 0.0


def test_flat_image_side_recognises_square_pixel_rows_only() -> None:
    """s x s features of pixel values ([0, 1], or whole numbers in [0, 255]) are s x s images; anything else is not."""
    from tinydeploy.data import flat_image_side

    rng = np.random.default_rng(0)
    unit = rng.uniform(0, 1, size=(5, 64))
    assert flat_image_side(unit) == 8 and flat_image_side(np.round(255 * unit)) == 8
    assert flat_image_side(rng.integers(0, 256, size=(3, 784)).astype(np.float32)) == 28
    assert flat_image_side(unit[:, :63]) is None  # not a square
    assert flat_image_side(unit[:, :49]) is None  # 7 x 7: below MIN_IMAGE_SIDE
    assert flat_image_side(unit - 0.5) is None  # negative values are not intensities
    assert flat_image_side(unit * 3) is None  # above 1 and not whole numbers
    assert flat_image_side(unit * 1.5) is None and flat_image_side(np.minimum(np.round(unit * 300), 256)) is None
    assert flat_image_side(np.round(unit * 300)) is None  # whole numbers above 255
    assert flat_image_side(unit.reshape(5, 8, 8)) is None and flat_image_side(unit[:0]) is None


def test_flat_pixels_in_the_unit_interval_load_as_images_of_max_value_one(tmp_path: Path) -> None:
    """Pixels in [0, 1] (the brightest exactly 1) become 1 x s x s images whose 8-bit files scale to 1, not 255."""
    X = np.random.default_rng(0).uniform(0, 1, size=(60, 64)).astype(np.float32)
    X[0, 0] = 1.0
    path = _save_npz(tmp_path / "unit.npz", X, np.arange(60) % 3)
    data = load_dataset(str(path), as_images=True)
    assert data.X_train.shape[1:] == (1, 8, 8) and data.X_test.shape == (12, 1, 8, 8)
    assert data.image == {"mode": "L", "size": [8, 8], "max_value": 1.0}


def test_whole_number_pixels_above_one_load_with_max_value_255(tmp_path: Path) -> None:
    X = np.random.default_rng(2).integers(0, 3, size=(60, 64)).astype(np.float32)  # 0, 1, 2: 8-bit values
    data = load_dataset(str(_save_npz(tmp_path / "dim.npz", X, np.arange(60) % 3)), as_images=True)
    assert data.image == {"mode": "L", "size": [8, 8], "max_value": 255.0}


def test_default_budgets_follow_the_dataset_the_inputs_and_the_architecture(tmp_path: Path) -> None:
    """Built-in sets keep their own budgets (digits: 3,000 params, no MAC budget; mnist5k: 400,000 MACs), a
    user file's MLP gets the larger of 4 per sample and a 64-unit layer, its images 4 per sample, and a
    ResNet no budget (its blocks stop at their full width)."""
    from tinydeploy.training.config import GrowConfig, default_max_params
    from tinydeploy.training.job import prepare_grow

    assert default_max_params("digits", 10, 64, 10) == 3000
    assert default_max_params("x.npz", 1000, 3, 2) == 4000 and default_max_params("x.npz", 10, 3, 2) == 64 * 6
    assert default_max_params("x.npz", 10, 784, 10, images=True) == 40
    digits = prepare_grow(GrowConfig(dataset="digits", device="cpu"), tmp_path / "d")
    assert (digits.max_params, digits.max_macs) == (3000, None)
    assert prepare_grow(GrowConfig(dataset="mnist5k", device="cpu"), tmp_path / "m").max_macs == 400000
    resnet = prepare_grow(GrowConfig(dataset="digits", arch="resnet10", device="cpu"), tmp_path / "r")
    assert (resnet.max_params, resnet.max_macs) == (None, None)
    split = prepare_grow(GrowConfig(dataset="moons", device="cpu", split_seed=3, val_fraction=0.3), tmp_path / "s")
    assert (split.data.source["split_seed"], split.data.source["val_fraction"]) == (3, 0.3)


def test_as_images_none_lets_a_user_files_rows_decide(tmp_path: Path) -> None:
    """``as_images=None``: flat square pixels load as images, recorded in ``source`` (which reloads them the
    same); other flat features stay flat, and ``source`` says nothing."""
    rng = np.random.default_rng(1)
    pixels = _save_npz(tmp_path / "px.npz", rng.uniform(0, 1, size=(60, 64)).astype(np.float32), np.arange(60) % 3)
    data = load_dataset(str(pixels), as_images=None)
    assert data.X_train.shape[1:] == (1, 8, 8) and data.source["as_images"] is True
    np.testing.assert_array_equal(load_dataset(**data.source).X_train, data.X_train)
    features = _save_npz(tmp_path / "f.npz", rng.normal(size=(60, 64)).astype(np.float32), np.arange(60) % 3)
    flat = load_dataset(str(features), as_images=None)
    assert flat.X_train.shape[1:] == (64,) and "as_images" not in flat.source
    X = rng.uniform(0, 1, size=(60, 64)).astype(np.float32)
    X[-1, 0] = -0.5  # the test rows are not pixel values: both splits stay flat
    mixed = load_dataset(str(_save_npz(tmp_path / "mixed.npz", X, np.arange(60) % 3)), as_images=None)
    assert mixed.X_train.shape[1:] == (64,) and "as_images" not in mixed.source


def test_flat_pixel_npz_grows_a_cnn_on_images_by_default_and_serves_flat_rows(tmp_path: Path) -> None:
    """sklearn's digits flattened (64 features, whole numbers 0..16) in a user .npz: the job loads them as
    1x8x8 images, grows a CNN, says so and states both budgets; --arch mlp keeps the flat MLP. The exported
    CNN answers flat rows of 64 values like the trained model."""
    from sklearn.datasets import load_digits

    from tinydeploy.training.config import USER_IMAGE_MACS_PER_PARAM, USER_PARAMS_PER_SAMPLE, GrowConfig
    from tinydeploy.training.job import prepare_grow

    X, y = load_digits(return_X_y=True)
    path = tmp_path / "digits_flat.npz"
    np.savez(path, X_train=X[:400].astype(np.float32), y_train=y[:400], X_test=X[400:500].astype(np.float32),
             y_test=y[400:500])
    job = prepare_grow(GrowConfig(dataset=str(path), device="cpu"), tmp_path / "cnn")
    assert job.arch == "cnn" and job.data.X_train.shape[1:] == (1, 8, 8) and job.spec.input_shape == (1, 8, 8)
    assert job.data.source["as_images"] is True and job.data.image == {"mode": "L", "size": [8, 8], "max_value": 255.0}
    params = USER_PARAMS_PER_SAMPLE * 320
    assert (job.max_params, job.max_macs) == (params, USER_IMAGE_MACS_PER_PARAM * params)
    assert job.notices == [
        "the 64 features of each row are 8x8 pixel values: growing a CNN on 1x8x8 images (pass --arch mlp for an "
        "MLP on the flat features)",
        f"no --max-params: the budget is {params:,} parameters ({USER_PARAMS_PER_SAMPLE} per training sample; pass "
        "--max-params to change it)",
        f"no --max-macs: the budget is {USER_IMAGE_MACS_PER_PARAM * params:,} multiply-accumulates per sample "
        f"({USER_IMAGE_MACS_PER_PARAM} per budgeted parameter; pass --max-macs to change it)"]
    mlp = prepare_grow(GrowConfig(dataset=str(path), arch="mlp", device="cpu"), tmp_path / "mlp")
    assert mlp.arch == "mlp" and mlp.data.X_train.shape[1:] == (64,) and mlp.max_macs is None
    assert not any("pixel" in n for n in mlp.notices)
    chosen = prepare_grow(GrowConfig(dataset=str(path), arch="cnn", device="cpu"), tmp_path / "chosen")
    assert chosen.data.X_train.shape[1:] == (1, 8, 8) and not any("pixel" in n for n in chosen.notices)

    run, out = tmp_path / "run", tmp_path / "export"
    grown = cli("grow", "--dataset", str(path), "--out", str(run), "--max-growth-epochs", "1", "--final-epochs", "1",
                "--threads", "1")
    assert grown.exit_code == 0, grown.output
    assert "growing a CNN on 1x8x8 images" in " ".join(grown.output.split())
    assert cli("export", str(run), "--formats", "onnx", "--out", str(out)).exit_code == 0
    from tinydeploy.serving.runtime import load

    model = load(out)
    assert model.input_shape == (1, 8, 8)
    rows = X[400:410].astype(np.float32)
    flat, images = model.predict(rows), model.predict(rows.reshape(10, 1, 8, 8))
    np.testing.assert_array_equal(flat.outputs, images.outputs)
    assert flat.labels == images.labels and len(flat) == 10
