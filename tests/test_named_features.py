"""Features by name, end to end: a model grown on a CSV with a header (sklearn's breast_cancer, 30
named columns) keeps the names in its spec, ONNX metadata and /v1/metadata; ``predict`` puts a
reordered CSV's columns back in order and refuses missing or unknown columns by name; the server takes
rows as objects within its pre-parse limits (a full batch of named rows is not a 413)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pandas as pd
import pytest
from serving_fixtures import running_server
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.serving.server import create_app

MAX_BATCH = 1024


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A CSV of breast_cancer with text labels, grown briefly and exported to ONNX."""
    work = tmp_path_factory.mktemp("named")
    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = np.where(frame.pop("target") == 0, "malignant", "benign")
    frame.to_csv(work / "cancer.csv", index=False)
    grown = cli("grow", "--dataset", work / "cancer.csv", "--target", "diagnosis", "--out", work / "run",
                "--max-growth-epochs", "1", "--final-epochs", "2", "--threads", "1", "--device", "cpu")
    assert grown.exit_code == 0, grown.stderr
    exported = cli("export", work / "run", "--onnx")
    assert exported.exit_code == 0, exported.stderr
    return work, frame.drop(columns="diagnosis")


def test_names_are_in_the_spec_and_the_onnx_metadata(cancer) -> None:
    work, features = cancer
    names = list(features.columns)
    assert json.loads((work / "run" / "arch.json").read_text())["feature_names"] == names
    props = {p.key: p.value for p in onnx.load(str(work / "run" / "artifacts" / "model.onnx")).metadata_props}
    assert json.loads(props["tinydeploy.feature_names"]) == names
    assert OnnxModel(work / "run" / "artifacts").describe()["feature_names"] == names


def test_reordered_csv_columns_give_the_same_predictions(cancer) -> None:
    work, features = cancer
    rows = features.head(40)
    rows.to_csv(work / "rows.csv", index=False)
    rows[list(reversed(rows.columns))].to_csv(work / "reversed.csv", index=False)
    rows.to_csv(work / "no_header.csv", index=False, header=False)
    straight = cli("predict", work / "run" / "artifacts", "--input", work / "rows.csv")
    reversed_ = cli("predict", work / "run" / "artifacts", "--input", work / "reversed.csv")
    unnamed = cli("predict", work / "run" / "artifacts", "--input", work / "no_header.csv")
    assert straight.exit_code == reversed_.exit_code == unnamed.exit_code == 0, reversed_.stderr
    assert straight.stdout == reversed_.stdout == unnamed.stdout
    labels = [line.split(",")[0] for line in straight.stdout.splitlines()[1:]]
    assert len(labels) == 40 and {"benign", "malignant"} == set(labels)  # both classes among the first rows


def test_missing_or_unknown_columns_are_refused_by_name(cancer) -> None:
    work, features = cancer
    bad = features.head(5).drop(columns=["worst area", "mean radius"]).assign(patient_id=1)
    bad.to_csv(work / "bad.csv", index=False)
    refused = cli("predict", work / "run" / "artifacts", "--input", work / "bad.csv")
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"error: --input {work / 'bad.csv'}: missing feature(s) 'mean radius', 'worst area'; unknown feature(s) "
        "'patient_id': the model takes the 30 columns it was trained on, in any order (GET /v1/metadata lists "
        "feature_names)")


@pytest.fixture(scope="module")
def client(cancer):
    work, _ = cancer
    with running_server(create_app(work / "run" / "artifacts", "cpu", MAX_BATCH)) as base:
        with httpx.Client(base_url=base, timeout=30.0) as c:
            yield c


def test_the_server_takes_named_rows_in_any_order(cancer, client: httpx.Client) -> None:
    _, features = cancer
    rows = features.head(8)
    plain = client.post("/v1/predict", json={"inputs": rows.to_numpy().tolist()})
    shuffled = rows[list(reversed(rows.columns))]
    named = client.post("/v1/predict", json={"inputs": shuffled.to_dict(orient="records")})
    one = client.post("/v1/predict", json={"inputs": shuffled.iloc[0].to_dict()})
    assert plain.status_code == named.status_code == one.status_code == 200, named.text
    assert named.json()["outputs"] == plain.json()["outputs"] and one.json()["labels"] == plain.json()["labels"][:1]
    assert client.get("/v1/metadata").json()["feature_names"] == list(features.columns)


def test_a_full_batch_of_named_rows_fits_the_limits(cancer, client: httpx.Client) -> None:
    """1,024 named rows of 30 features at full float precision take ~1.4 MB: over the 1 MiB that a
    batch of plain rows is allowed."""
    _, features = cancer
    jitter = 1 + 1e-9 * np.random.default_rng(0).random(features.shape)
    records = (features * jitter).to_dict(orient="records")
    body = json.dumps({"inputs": (records * 2)[:MAX_BATCH]}).encode()
    assert len(body) > 1 << 20
    answer = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["batch_size"] == MAX_BATCH


@pytest.mark.parametrize(("row", "message"), [
    ({"mean radius": 1.0}, "inputs row 0: missing feature(s) 'mean texture', 'mean perimeter', 'mean area', "
                           "'mean smoothness', 'mean compactness', 'mean concavity', 'mean concave points', "
                           "'mean symmetry' and 21 more: send the model's 30 features by name"),
    ("extra", "inputs row 0: unknown feature(s) 'radius': send the model's 30 features by name"),
    ("text", "inputs must contain only numbers, found strings"),
])
def test_bad_named_rows_get_a_422_listing_the_names(cancer, client: httpx.Client, row, message: str) -> None:
    _, features = cancer
    if row == "extra":
        row = {**features.iloc[0].to_dict(), "radius": 2.0}
    elif row == "text":
        row = {**features.iloc[0].to_dict(), "mean radius": "big"}
    answer = client.post("/v1/predict", json={"inputs": [row]})
    assert answer.status_code == 422
    assert answer.json()["error"]["message"].startswith(message)


def test_npz_and_json_inputs_are_matched_by_name_too(cancer) -> None:
    work, features = cancer
    rows = features.head(12)
    shuffled = rows[list(reversed(rows.columns))]
    rows.to_csv(work / "rows12.csv", index=False)
    np.savez(work / "rows.npz", X=shuffled.to_numpy(), feature_names=np.array(shuffled.columns, dtype=str))
    (work / "rows.json").write_text(json.dumps({"inputs": shuffled.to_dict(orient="records")}))
    answers = [cli("predict", work / "run" / "artifacts", "--input", work / name)
               for name in ("rows12.csv", "rows.npz", "rows.json")]
    assert [a.exit_code for a in answers] == [0, 0, 0], answers[1].stderr + answers[2].stderr
    assert answers[0].stdout == answers[1].stdout == answers[2].stdout
    np.savez(work / "pickled.npz", X=shuffled.to_numpy(), feature_names=shuffled.columns.to_numpy())  # object dtype
    pickled = cli("predict", work / "run" / "artifacts", "--input", work / "pickled.npz")
    assert pickled.exit_code == 2 and pickled.stderr.strip() == (
        f"error: --input {work / 'pickled.npz'}: array 'feature_names' holds Python objects (pickled), which are "
        "never loaded: save it as numbers or strings, e.g. np.asarray(feature_names, dtype=float) or dtype=str")
    np.savez(work / "bad.npz", X=shuffled.to_numpy(), feature_names=np.array(["radius", *shuffled.columns[1:]], dtype=str))
    refused = cli("predict", work / "run" / "artifacts", "--input", work / "bad.npz")
    assert refused.exit_code == 2 and refused.stderr.strip() == (
        f"error: --input {work / 'bad.npz'}: missing feature(s) 'worst fractal dimension'; unknown feature(s) 'radius': "
        "the model takes the 30 columns it was trained on, in any order (GET /v1/metadata lists feature_names)")
