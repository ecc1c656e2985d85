"""A real uvicorn server on a loopback port, real HTTP with httpx, real onnxruntime."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_fixtures import export_dir, exported, running_server, trained_run  # noqa: F401

from tinydeploy.data import load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.serving.server import create_app

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 64
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model(export_dir: Path) -> OnnxModel:
    return OnnxModel(export_dir, "cpu")


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return load_dataset("digits").X_test


@pytest.fixture(scope="module")
def url(export_dir: Path):
    with running_server(create_app(export_dir, "cpu", MAX_BATCH)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str):
    with httpx.Client(base_url=url, timeout=10.0) as c:
        yield c


def post(client: httpx.Client, inputs) -> httpx.Response:
    return client.post("/v1/predict", json={"inputs": inputs})


def test_predict_matches_the_runtime(client: httpx.Client, model: OnnxModel, x_test: np.ndarray) -> None:
    expected = model.predict(x_test[:MAX_BATCH])
    answer = post(client, x_test[:MAX_BATCH].tolist())
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["batch_size"] == MAX_BATCH and body["model_sha256"] == model.sha256
    np.testing.assert_array_equal(np.asarray(body["outputs"], dtype=np.float32), expected.outputs)
    assert body["labels"] == expected.labels
    assert body["indices"] == expected.indices.tolist()
    np.testing.assert_allclose(body["probabilities"], expected.probabilities, rtol=1e-6)
    single = post(client, x_test[7].tolist()).json()
    assert single["batch_size"] == 1 and single["labels"] == [expected.labels[7]]
    np.testing.assert_array_equal(np.asarray(single["outputs"][0], dtype=np.float32), expected.outputs[7])


def test_400_requests_from_8_concurrent_clients(url: str, model: OnnxModel, x_test: np.ndarray) -> None:
    expected = model.predict(x_test).outputs

    def client_loop(worker: int) -> list[tuple[int, bool]]:
        results = []
        with httpx.Client(base_url=url, timeout=10.0) as c:
            for k in range(50):
                start = (worker * 50 + k) % (len(x_test) - 8)
                size = 1 + (worker + k) % 8
                answer = post(c, x_test[start : start + size].tolist())
                ok = answer.status_code == 200 and np.allclose(
                    np.asarray(answer.json()["outputs"], dtype=np.float32), expected[start : start + size],
                    rtol=1e-5, atol=1e-5,
                )
                results.append((answer.status_code, ok))
        return results

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(client_loop, worker) for worker in range(8)]
        results = [r for f in futures for r in f.result(timeout=120)]
    assert len(results) == 400
    assert all(status == 200 for status, _ in results)
    assert all(ok for _, ok in results)


def _bad_requests(x_test: np.ndarray) -> list[tuple[str, dict, bytes, int, str]]:
    row = json.dumps(x_test[0].tolist())
    return [
        ("malformed json", JSON, b'{"inputs": [1, 2', 400, "not valid JSON"),
        ("empty body", JSON, b"", 400, "empty"),
        ("not utf-8", JSON, b'{"inputs": "\xff"}', 400, "UTF-8"),
        ("wrong content type", {"Content-Type": "text/plain"}, f'{{"inputs": {row}}}'.encode(), 415, "application/json"),
        ("no content type", {}, f'{{"inputs": {row}}}'.encode(), 415, "application/json"),
        ("form content type", {"Content-Type": "application/x-www-form-urlencoded"}, b"inputs=1", 415, "application/json"),
        ("body is a list", JSON, row.encode(), 422, "JSON object"),
        ("missing inputs", JSON, b'{"input": [1]}', 422, '"inputs"'),
        ("extra field", JSON, f'{{"inputs": {row}, "x": 1}}'.encode(), 422, "unknown field"),
        ("wrong width", JSON, b'{"inputs": [[1, 2, 3]]}', 422, "[1, 3]"),
        ("wrong ndim", JSON, json.dumps({"inputs": [[[0.0] * 64]] * 2}).encode(), 400, "4 levels deep, over the limit of 3"),
        ("ragged", JSON, json.dumps({"inputs": [[0.0] * 64, [0.0] * 63]}).encode(), 422, "ragged"),
        ("strings", JSON, json.dumps({"inputs": ["a"] * 64}).encode(), 422, "strings"),
        ("string inputs", JSON, b'{"inputs": "1,2,3"}', 422, "string"),
        ("nulls", JSON, json.dumps({"inputs": [None] * 64}).encode(), 422, "nulls"),
        ("booleans", JSON, json.dumps({"inputs": [True] * 64}).encode(), 422, "booleans"),
        ("NaN literal", JSON, f'{{"inputs": [NaN{", 0" * 63}]}}'.encode(), 422, "NaN"),
        ("Infinity literal", JSON, f'{{"inputs": [[-Infinity{", 0" * 63}]]}}'.encode(), 422, "Infinity"),
        ("overflowing number", JSON, f'{{"inputs": [1e999{", 0" * 63}]}}'.encode(), 422, "NaN or infinite"),
        ("empty batch", JSON, b'{"inputs": []}', 422, "empty"),
        ("scalar", JSON, b'{"inputs": 5}', 422, "single number"),
        ("oversized batch", JSON, json.dumps({"inputs": [[0.0] * 64] * (MAX_BATCH + 1)}).encode(), 413, f"({MAX_BATCH} rows of 64 values)"),
        ("oversized body", JSON, b'{"inputs": [' + b"0," * 2_000_000 + b"0]}", 413, "bytes"),
    ]


def test_bad_inputs_get_4xx_json_naming_the_problem(client: httpx.Client, x_test: np.ndarray) -> None:
    good = x_test[:2].tolist()
    for name, headers, content, status, words in _bad_requests(x_test):
        answer = client.post("/v1/predict", content=content, headers=headers)
        assert answer.status_code == status, (name, answer.text[:300])
        error = answer.json()["error"]
        assert error["status"] == status and error["code"], name
        assert words in error["message"], (name, error["message"])
        after = post(client, good)
        assert after.status_code == 200 and after.json()["batch_size"] == 2, name


def test_unknown_routes_and_methods_answer_json(client: httpx.Client) -> None:
    missing = client.get("/v2/predict")
    assert missing.status_code == 404 and "/v1/predict" in missing.json()["error"]["message"]
    wrong = client.get("/v1/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_metadata_and_health(client: httpx.Client, export_dir: Path, model: OnnxModel) -> None:
    meta = client.get("/v1/metadata").json()
    arch = json.loads((export_dir / "arch.json").read_text())
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert meta["spec"] == arch and meta["classes"] == arch["classes"]
    assert meta["widths"]["hidden"] == model.hidden_widths and meta["widths"]["hidden"]
    assert meta["sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert meta["providers"] == ["CPUExecutionProvider"] and meta["max_batch"] == MAX_BATCH
    assert meta["input"]["shape"] == ["batch", 64] and meta["verified_manifest"] is True
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_requests_errors_and_latency(url: str, x_test: np.ndarray) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as c:
        before = _samples(c.get("/metrics").text)
        for _ in range(3):
            assert post(c, x_test[:1].tolist()).status_code == 200
        assert c.post("/v1/predict", content=b"{", headers=JSON).status_code == 400
        answer = c.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    after = _samples(text)
    ok = 'tinydeploy_requests_total{path="/v1/predict",method="POST",status="200"}'
    assert after[ok] - before.get(ok, 0) == 3
    assert after['tinydeploy_errors_total{status="400"}'] - before.get('tinydeploy_errors_total{status="400"}', 0) == 1
    count = after['tinydeploy_request_duration_seconds_count{path="/v1/predict"}']
    assert after['tinydeploy_request_duration_seconds_bucket{path="/v1/predict",le="+Inf"}'] == count
    buckets = [v for k, v in after.items() if k.startswith('tinydeploy_request_duration_seconds_bucket{path="/v1/predict"')]
    assert buckets == sorted(buckets)  # cumulative
    assert after["tinydeploy_predicted_rows_total"] >= 3
    for family in ("requests_total counter", "errors_total counter", "request_duration_seconds histogram"):
        assert f"# TYPE tinydeploy_{family}" in text
    assert re.search(r'tinydeploy_model_info\{sha256="[0-9a-f]{64}"', text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_layout(root: Path) -> Path:
    """The package as deployment/Dockerfile copies it: only the files and folders its COPY lines name."""
    dockerfile = (REPO / "deployment" / "Dockerfile").read_text()
    copies = [block for block in re.split(r"\n(?=[A-Z]+ )", dockerfile) if block.startswith("COPY tinydeploy/")]
    sources = [path for block in copies for path in re.findall(r"(tinydeploy/[\w/]*(?:\.py|/))", block)]
    files = [f for s in sources for f in ((REPO / s).glob("*.py") if s.endswith("/") else [REPO / s])]
    names = {f.relative_to(REPO).as_posix() for f in files}
    assert {"tinydeploy/serving/server.py", "tinydeploy/serving/edge.py"} <= names
    for file in files:
        target = root / file.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
    return root


def _wait_healthy(process: subprocess.Popen, base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=5.0) as c:
        while True:
            try:
                if c.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's shared library mapped (Linux)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_cli_serve_with_two_workers(export_dir: Path, x_test: np.ndarray, model: OnnxModel) -> None:
    """``tinydeploy serve --workers 2``: two worker processes both answer, and none of them loads torch."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", str(export_dir), "--port", str(port), "--provider", "cpu",
         "--workers", "2", "--max-batch", "4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(process, base)
        pids: set[int] = set()

        def health(_: int) -> int:
            with httpx.Client(base_url=base, timeout=5.0) as c:  # a new connection each time
                return c.get("/healthz").json()["pid"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(40):
                pids |= set(pool.map(health, range(16)))
                if len(pids) == 2:
                    break
        assert len(pids) == 2 and process.pid not in pids
        with httpx.Client(base_url=base, timeout=5.0) as c:
            for i in range(8):
                body = post(c, x_test[i : i + 2].tolist()).json()
                assert body["labels"] == model.predict(x_test[i : i + 2]).labels
            assert c.get("/v1/metadata").json()["max_batch"] == 4
            assert post(c, x_test[:5].tolist()).status_code == 413
        if sys.platform.startswith("linux"):
            assert not any(_maps_torch(pid) for pid in [*pids, process.pid])
    finally:
        _stop(process)


def test_edge_entry_point_serves_without_torch(export_dir: Path, x_test: np.ndarray, model: OnnxModel, tmp_path: Path) -> None:
    """``python -m tinydeploy.serving.edge`` from the Docker image's file set, where importing torch fails."""
    site = image_layout(tmp_path / "opt")
    port = _free_port()
    blocker = (
        "import importlib.abc, runpy, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'): raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "sys.argv = ['serve_edge'] + sys.argv[1:]\n"
        f"import tinydeploy; assert tinydeploy.__file__.startswith({str(site)!r}), tinydeploy.__file__\n"
        "runpy.run_module('tinydeploy.serving.edge', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    process = subprocess.Popen(
        [sys.executable, "-c", blocker, str(export_dir), "--port", str(port), "--provider", "cpu", "--max-batch", "8",
         "--log-level", "warning"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(process, base, 30.0)
        with httpx.Client(base_url=base, timeout=5.0) as c:
            body = post(c, x_test[:3].tolist()).json()
            assert body["labels"] == model.predict(x_test[:3]).labels
            assert c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 9}).status_code == 413
    finally:
        _stop(process)


@pytest.mark.parametrize("module", ["tinydeploy.serving.edge", "tinydeploy.serve_edge"])
def test_edge_entry_point_reports_a_bad_directory_in_one_line(tmp_path: Path, module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1


def test_create_app_validates_arguments(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TinyDeployError, match="max-batch"):
        create_app(export_dir, "cpu", 0)
    with pytest.raises(TinyDeployError, match="does not exist"):
        create_app(tmp_path / "nope", "cpu", 8)


def test_dockerignore_sends_exactly_what_the_image_copies() -> None:
    dockerfile = (REPO / "deployment" / "Dockerfile").read_text()
    sources = re.findall(r"(?<![\w/])((?:deployment|tinydeploy)/[\w./-]*)", "\n".join(
        line for line in re.split(r"\n(?=[A-Z]+ )", dockerfile) if line.startswith("COPY ")
    ))
    copied = {f.relative_to(REPO).as_posix() for s in sources
              for f in ((REPO / s).glob("*.py") if s.endswith("/") else [REPO / s])}
    ignore = (REPO / "deployment" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {f.relative_to(REPO).as_posix() for line in ignore if line.startswith("!") for f in REPO.glob(line[1:])}
    assert "**" in ignore and copied == allowed
    assert "tinydeploy/serving/runtime.py" in copied and not any(p.startswith("tinydeploy/training") for p in copied)
    for path in copied:
        assert (REPO / path).is_file(), path
