"""serving.server on the fast export directory: real uvicorn on loopback (httpx, raw sockets) and the ASGI
application called directly where a real HTTP server would never pass the request through (a malformed
Content-Length, a lifespan, a websocket scope); every status, code, message and /metrics line checked."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_fast_fixtures import (
    digit_rows,
    fast_dir,  # noqa: F401
    fast_spec,
    metadata,
    reference,
    running_server,
    weights,
    write_export,
)

from tinydeploy import __version__
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving import server as srv
from tinydeploy.serving.limits import Limits
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.serving.server import Metrics, ServeOptions, app_from_env, create_app, serve

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 8
ROWS = digit_rows(MAX_BATCH)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def app(fast_dir: Path):  # noqa: F811
    return create_app(fast_dir, "cpu", MAX_BATCH, body_timeout_s=0.5)


@pytest.fixture(scope="module")
def url(app):
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str):
    with httpx.Client(base_url=url, timeout=10.0) as c:
        yield c


def _error(answer: httpx.Response, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert (error["status"], error["code"]) == (status, code) and list(answer.json()) == ["error"]
    return error["message"]


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _asgi(app, scope: dict, messages: list[dict], stall: bool = False) -> list[dict]:
    """Run the ASGI application once on ``scope``; the messages it sent. ``stall``: after ``messages``
    the client sends nothing more (receive never returns)."""
    sent: list[dict] = []
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.sleep(20)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def _http(path: str, method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    return {"type": "http", "path": path, "method": method, "headers": headers or []}


def _answer(sent: list[dict]) -> tuple[int, dict[bytes, bytes], bytes]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


# ----- predictions ---------------------------------------------------------------------------------
def test_predict_answers_the_model_outputs(client: httpx.Client, fast_dir: Path, app) -> None:  # noqa: F811
    expected = reference(fast_dir, ROWS)
    answer = client.post("/v1/predict", json={"inputs": ROWS.tolist()})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert int(answer.headers["content-length"]) == len(answer.content) and "connection" not in answer.headers
    body = answer.json()
    assert list(body) == ["outputs", "labels", "indices", "probabilities", "batch_size", "model_sha256"]
    assert body["batch_size"] == MAX_BATCH and body["model_sha256"] == app.model.sha256
    np.testing.assert_allclose(body["outputs"], expected, rtol=1e-5, atol=1e-5)
    assert body["indices"] == expected.argmax(1).tolist() and body["labels"] == [str(i) for i in body["indices"]]
    np.testing.assert_allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-6)
    single = client.post("/v1/predict", json={"inputs": ROWS[3].tolist()}).json()
    assert single["batch_size"] == 1 and single["indices"] == [body["indices"][3]]
    typed = client.post("/v1/predict", content=json.dumps({"inputs": ROWS[:2].tolist()}),
                        headers={"Content-Type": "Application/JSON ; charset=utf-8"})
    assert typed.status_code == 200 and typed.json()["batch_size"] == 2


def test_rows_are_counted_and_in_flight_is_this_request(client: httpx.Client) -> None:
    before = _samples(client.get("/metrics").text)
    assert before["tinydeploy_requests_in_flight"] == 1  # the /metrics request itself
    client.post("/v1/predict", json={"inputs": ROWS[:5].tolist()})
    client.post("/v1/predict", json={"inputs": ROWS[:1].tolist()})
    client.post("/v1/predict", json={"inputs": [[1.0]]})  # refused: no rows predicted
    after = _samples(client.get("/metrics").text)
    assert after["tinydeploy_predicted_rows_total"] - before["tinydeploy_predicted_rows_total"] == 6
    assert after["tinydeploy_requests_in_flight"] == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # softmax of infinite outputs, in the server
def test_non_finite_outputs_get_a_422_naming_the_rows(client: httpx.Client, app) -> None:
    aligned = np.sign(weights(fast_spec())["0.weight"][0])  # every term of the first neuron adds up: overflow
    huge = (3.0e38 * aligned).astype(np.float32)
    rows = np.stack([ROWS[0], huge, ROWS[1], *[huge] * 5])
    with np.errstate(invalid="ignore"):
        outputs = app.model.predict(rows).outputs
    assert np.isfinite(outputs[[0, 2]]).all() and not np.isfinite(outputs[1]).any()
    message = _error(client.post("/v1/predict", json={"inputs": rows.tolist()}), 422, "non_finite_output")
    assert message == ("the model produced non-finite outputs for rows [1, 3, 4, 5, 6]: the inputs are far outside "
                       "the training range")
    assert client.post("/v1/predict", json={"inputs": rows[:1].tolist()}).status_code == 200


# ----- refusals ------------------------------------------------------------------------------------
def test_each_refusal_has_its_status_code_and_message(client: httpx.Client, app) -> None:
    limits = app.limits
    cases = [
        ({"Content-Type": "text/plain"}, b"{}", 415, "unsupported_media_type",
         "Content-Type must be application/json, got 'text/plain'"),
        ({}, b"{}", 415, "unsupported_media_type", "Content-Type must be application/json, got 'none'"),
        ({"Content-Type": "application/" + "x" * 100}, b"{}", 415, "unsupported_media_type",
         f"Content-Type must be application/json, got {('application/' + 'x' * 100)[:60]!r}"),
        ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b--", 415, "unsupported_media_type",
         'this model was not grown on images: send application/json {"inputs": [...]}'),
        (JSON, json.dumps({"inputs": [[0.0] * 64] * (MAX_BATCH + 1)}).encode(), 413, "too_many_numbers",
         "the body holds 576 numbers, over the limit of 512 (8 rows of 64 values): split the batch"),
        (JSON, b'{"inputs": [[1, 2]]}', 422, "shape", "inputs has shape [1, 2]"),
        (JSON, b'{"inputs": []}', 422, "empty", "inputs is empty: send at least one row"),
        (JSON, b'{"inputs": ["a"]}', 422, "dtype", "inputs must contain only numbers, found strings"),
        (JSON, b"{", 400, "malformed_json", "the request body is not valid JSON"),
    ]
    for headers, body, status, code, words in cases:
        message = _error(client.post("/v1/predict", content=body, headers=headers), status, code)
        assert message.startswith(words), (words, message)
    assert limits.max_numbers == MAX_BATCH * 64


def test_a_batch_over_max_batch_is_413_from_the_runtime(fast_dir: Path) -> None:  # noqa: F811
    app = create_app(fast_dir, "cpu", 2)
    app.limits = dataclasses.replace(app.limits, max_numbers=6400)  # the body passes: the runtime's bound answers
    with running_server(app) as base:
        message = _error(httpx.post(f"{base}/v1/predict", json={"inputs": ROWS[:3].tolist()}), 413, "too_large")
    assert message == "batch of 3 rows exceeds the limit of 2: split it"


def test_body_size_limits_are_exact(url: str, app) -> None:
    limit = app.limits.max_body_bytes
    fix = f"send at most {MAX_BATCH} rows per request"
    prefix = json.dumps({"inputs": ROWS[:1].tolist()}).encode()

    def padded(size: int) -> bytes:
        return prefix + b" " * (size - len(prefix))

    assert httpx.post(f"{url}/v1/predict", content=padded(limit), headers=JSON).status_code == 200
    message = _error(httpx.post(f"{url}/v1/predict", content=padded(limit + 1), headers=JSON), 413, "body_too_large")
    assert message == f"the body has {limit + 1} bytes, over the limit of {limit} bytes: {fix}"

    def chunked(body: bytes):  # no Content-Length: the streamed size is what counts
        for start in range(0, len(body), 1 << 16):
            yield body[start:start + (1 << 16)]

    ok = httpx.post(f"{url}/v1/predict", content=chunked(padded(limit)), headers=JSON)
    assert ok.status_code == 200 and "content-length" not in ok.request.headers
    message = _error(httpx.post(f"{url}/v1/predict", content=chunked(padded(limit + 1)), headers=JSON), 413,
                     "body_too_large")
    assert message == f"the body is over the limit of {limit} bytes: {fix}"


def test_content_length_is_checked_before_the_body(app) -> None:
    limit = app.limits.max_body_bytes
    json_type = (b"content-type", b"application/json")
    body = json.dumps({"inputs": ROWS[:1].tolist()}).encode()
    for declared in (b"12x", b"-5", b"", b"1e3", b"x" * 100):
        status, headers, answer = _answer(_asgi(app, _http("/v1/predict", headers=[
            json_type, (b"content-length", declared)]), [{"type": "http.request", "body": body}]))
        error = json.loads(answer)["error"]
        assert (status, error["code"]) == (400, "bad_content_length")
        assert error["message"] == f"Content-Length {declared[:40].decode()!r} is not an integer"
        assert b"connection" not in headers
    status, _, answer = _answer(_asgi(app, _http("/v1/predict", headers=[json_type, (b"content-length", b" %d " % len(
        body))]), [{"type": "http.request", "body": body}]))
    assert status == 200 and json.loads(answer)["batch_size"] == 1
    status, _, answer = _answer(_asgi(app, _http("/v1/predict", headers=[json_type, (b"content-length", str(
        limit + 1).encode())]), [], stall=True))
    assert status == 413 and json.loads(answer)["error"]["code"] == "body_too_large"
    pieces = [{"type": "http.request", "body": body[:10], "more_body": True},
              {"type": "http.request", "body": body[10:], "more_body": True},
              {"type": "http.request", "body": b"", "more_body": False}]
    status, headers, answer = _answer(_asgi(app, _http("/v1/predict", headers=[json_type]), pieces))
    assert status == 200 and json.loads(answer)["batch_size"] == 1
    bare = [{"type": "http.request", "more_body": True}, {"type": "http.request", "body": body}]  # "body" is optional
    status, _, answer = _answer(_asgi(app, _http("/v1/predict", headers=[json_type]), bare))
    assert status == 200 and json.loads(answer)["batch_size"] == 1
    assert headers == {b"content-type": b"application/json", b"content-length": str(len(answer)).encode()}


def test_a_stalled_body_gets_408_and_the_connection_closed(app) -> None:
    start = time.monotonic()
    sent = _asgi(app, _http("/v1/predict", headers=[(b"content-type", b"application/json")]),
                 [{"type": "http.request", "body": b'{"inputs": [', "more_body": True},
                  {"type": "http.request", "body": b"1", "more_body": True}], stall=True)
    seconds = time.monotonic() - start
    status, headers, answer = _answer(sent)
    assert status == 408 and headers[b"connection"] == b"close" and 0.5 <= seconds < 5
    error = json.loads(answer)["error"]
    assert error == {"status": 408, "code": "body_timeout", "message": "the body did not arrive within the limit of "
                     "0.5 s (got 13 bytes): send the whole body at once"}


def test_a_client_that_leaves_is_counted_apart(fast_dir: Path) -> None:  # noqa: F811
    app = create_app(fast_dir, "cpu", MAX_BATCH)
    sent = _asgi(app, _http("/v1/predict", headers=[(b"content-type", b"application/json")]),
                 [{"type": "http.request", "body": b"{", "more_body": True}])
    assert sent == []
    text = app.metrics.render(app.model)
    assert 'tinydeploy_client_disconnects_total{path="/v1/predict"} 1' in text.splitlines()
    assert app.metrics.requests == {} and app.metrics.errors == {} and app.metrics.in_flight == 0


def test_a_cancelled_request_is_counted_as_a_disconnect(fast_dir: Path) -> None:  # noqa: F811
    """uvicorn cancels requests still running when it shuts down: counted apart from errors, nothing in flight."""
    app = create_app(fast_dir, "cpu", MAX_BATCH)

    async def scenario() -> None:
        waiting = asyncio.Event()

        async def receive() -> dict:
            waiting.set()
            await asyncio.sleep(20)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            raise AssertionError(f"nothing may be sent: {message}")

        task = asyncio.create_task(app(_http("/v1/predict", headers=[(b"content-type", b"application/json")]),
                                       receive, send))
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert app.metrics.disconnects == {"/v1/predict": 1} and app.metrics.errors == {} and app.metrics.in_flight == 0
    _asgi(app, _http("/healthz", "GET"), [])
    assert 0 < app.metrics.latency_sum["/healthz"] < 5 and app.metrics.latency_count == {"/healthz": 1}


def test_lifespan_and_other_scopes(fast_dir: Path) -> None:  # noqa: F811
    app = create_app(fast_dir, "cpu", MAX_BATCH)
    sent = _asgi(app, {"type": "lifespan"}, [{"type": "lifespan.startup"}, {"type": "other"},
                                             {"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.startup.complete"},
                    {"type": "lifespan.shutdown.complete"}]
    assert _asgi(app, {"type": "websocket", "path": "/v1/predict"}, []) == []
    assert app.metrics.in_flight == 0 and app.metrics.requests == {}
    with running_server(app, lifespan="on") as base:
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_routes_and_methods(client: httpx.Client, app) -> None:
    routes = "use POST /v1/predict, GET /v1/metadata, /healthz or /metrics"
    assert _error(client.get("/v2/predict"), 404, "not_found") == f"no endpoint /v2/predict: {routes}"
    long = "/" + "a" * 79
    assert _error(client.get(long), 404, "not_found") == f"no endpoint {long}: {routes}"
    longer = "/" + "b" * 80
    assert _error(client.get(longer), 404, "not_found") == f"no endpoint {longer[:77]}...: {routes}"
    for method, path, allowed in (("GET", "/v1/predict", "POST"), ("POST", "/metrics", "GET"),
                                  ("DELETE", "/healthz", "GET"), ("PUT", "/v1/metadata", "GET")):
        answer = client.request(method, path)
        assert _error(answer, 405, "method_not_allowed") == f"{method} is not allowed on {path}: use {allowed}"
        assert answer.headers["allow"] == allowed
    status, headers, body = _answer(_asgi(app, _http("/healthz", "BREW"), []))
    assert status == 405 and headers[b"allow"] == b"GET"
    assert json.loads(body)["error"]["message"] == "this method is not allowed on /healthz: use GET"
    status, _, body = _answer(_asgi(app, {"type": "http"}, []))  # no path, no method
    assert status == 404 and json.loads(body)["error"]["message"] == f"no endpoint : {routes}"


def test_metadata_and_health(client: httpx.Client, app) -> None:
    answer = client.get("/v1/metadata")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    meta = answer.json()
    assert meta == json.loads(json.dumps({**app.model.describe(), **app.limits.describe(), "tinydeploy": __version__}))
    assert meta["max_batch"] == MAX_BATCH and meta["body_timeout_s"] == 0.5
    health = client.get("/healthz")
    assert health.headers["content-type"] == "application/json"
    assert health.json() == {"status": "ok", "model_sha256": app.model.sha256, "providers": ["CPUExecutionProvider"],
                             "pid": os.getpid()}


def test_a_bug_is_a_500_that_closes_the_connection_and_is_logged(
    fast_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    app = create_app(fast_dir, "cpu", MAX_BATCH)
    monkeypatch.setattr(app.model, "predict", lambda *a, **k: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="tinydeploy.serve"):
        status, headers, body = _answer(_asgi(app, _http("/v1/predict", headers=[
            (b"content-type", b"application/json")]), [{"type": "http.request", "body": b'{"inputs": [1]}'}]))
    assert status == 500 and headers[b"connection"] == b"close"
    assert json.loads(body) == {"error": {"status": 500, "code": "internal_error",
                                          "message": "internal error; the server keeps running"}}
    assert [r.getMessage() for r in caplog.records] == ["internal error on POST /v1/predict"]
    assert caplog.records[0].exc_info[0] is ZeroDivisionError
    assert app.metrics.errors == {500: 1} and app.metrics.requests == {("/v1/predict", "POST", 500): 1}

    async def broken(message: dict) -> None:  # the answer itself fails: still counted, nothing raised
        raise ConnectionError("gone")

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}"}

    asyncio.run(app(_http("/healthz", "GET"), receive, broken))
    assert app.metrics.errors == {500: 2} and app.metrics.in_flight == 0


# ----- metrics -------------------------------------------------------------------------------------
def test_metrics_render_every_family_exactly(fast_dir: Path) -> None:  # noqa: F811
    model = OnnxModel(fast_dir, "cpu")
    metrics = Metrics(buckets=(1.0, 0.001, 0.5))
    assert metrics.buckets == (0.001, 0.5, 1.0)
    for _ in range(3):
        metrics.begin()
    metrics.observe("/v1/predict", "POST", 200, 0.001)
    metrics.observe("/v1/predict", "POST", 422, 0.75)
    metrics.observe("/v1/predict", "POST", None, 9.0)
    metrics.begin()
    metrics.observe("other", "other", 399, 2.0)
    metrics.add_rows(5)
    metrics.add_rows(2)
    metrics.begin()
    metrics.started = 1234.5
    lines = metrics.render(model).splitlines()
    samples = [line for line in lines if not line.startswith("#")]
    assert samples == [
        'tinydeploy_requests_total{path="/v1/predict",method="POST",status="200"} 1',
        'tinydeploy_requests_total{path="/v1/predict",method="POST",status="422"} 1',
        'tinydeploy_requests_total{path="other",method="other",status="399"} 1',
        'tinydeploy_errors_total{status="422"} 1',
        'tinydeploy_client_disconnects_total{path="/v1/predict"} 1',
        'tinydeploy_request_duration_seconds_bucket{path="/v1/predict",le="0.001"} 1',
        'tinydeploy_request_duration_seconds_bucket{path="/v1/predict",le="0.5"} 1',
        'tinydeploy_request_duration_seconds_bucket{path="/v1/predict",le="1"} 2',
        'tinydeploy_request_duration_seconds_bucket{path="/v1/predict",le="+Inf"} 2',
        'tinydeploy_request_duration_seconds_sum{path="/v1/predict"} 0.751',
        'tinydeploy_request_duration_seconds_count{path="/v1/predict"} 2',
        'tinydeploy_request_duration_seconds_bucket{path="other",le="0.001"} 0',
        'tinydeploy_request_duration_seconds_bucket{path="other",le="0.5"} 0',
        'tinydeploy_request_duration_seconds_bucket{path="other",le="1"} 0',
        'tinydeploy_request_duration_seconds_bucket{path="other",le="+Inf"} 1',
        'tinydeploy_request_duration_seconds_sum{path="other"} 2.0',
        'tinydeploy_request_duration_seconds_count{path="other"} 1',
        "tinydeploy_predicted_rows_total 7",
        "tinydeploy_requests_in_flight 1",
        (f'tinydeploy_model_info{{sha256="{model.sha256}",task="classification",providers="CPUExecutionProvider",'
        f'verified="true",version="{__version__}"}} 1'),
        "tinydeploy_start_time_seconds 1234.5",
    ]
    assert [line for line in lines if line.startswith("# TYPE")] == [
        "# TYPE tinydeploy_requests_total counter", "# TYPE tinydeploy_errors_total counter",
        "# TYPE tinydeploy_client_disconnects_total counter", "# TYPE tinydeploy_request_duration_seconds histogram",
        "# TYPE tinydeploy_predicted_rows_total counter", "# TYPE tinydeploy_requests_in_flight gauge",
        "# TYPE tinydeploy_model_info gauge", "# TYPE tinydeploy_start_time_seconds gauge"]
    assert [line for line in lines if line.startswith("# HELP")] == [
        "# HELP tinydeploy_requests_total HTTP requests answered, by route, method and status.",
        "# HELP tinydeploy_errors_total HTTP answers with status >= 400, by status.",
        "# HELP tinydeploy_client_disconnects_total Requests whose client went away before the answer (not errors).",
        "# HELP tinydeploy_request_duration_seconds Time from request start to the end of the answer.",
        "# HELP tinydeploy_predicted_rows_total Rows answered by /v1/predict.",
        "# HELP tinydeploy_requests_in_flight Requests being handled now.",
        "# HELP tinydeploy_model_info The served model (value is always 1).",
        "# HELP tinydeploy_start_time_seconds Unix time the server started."]
    assert lines[0].startswith("# HELP tinydeploy_requests_total")
    assert metrics.render(model).endswith("\n")
    model.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # what a CUDA session reports
    model.task, model.manifest = 'odd "task"\n', None
    assert metrics.render(model).splitlines()[-4] == (
        f'tinydeploy_model_info{{sha256="{model.sha256}",task="odd \\"task\\"\\n",'
        f'providers="CUDAExecutionProvider,CPUExecutionProvider",verified="false",version="{__version__}"}} 1')
    assert Metrics().buckets == srv.LATENCY_BUCKETS and abs(Metrics().started - time.time()) < 5


def test_metrics_add_up_repeats_and_count_400_as_an_error() -> None:
    metrics = Metrics()
    for _ in range(5):
        metrics.begin()
    assert metrics.in_flight == 5
    for status in (200, 200, 400, None, None):
        metrics.observe("/healthz", "GET", status, 0.1)
    assert metrics.requests == {("/healthz", "GET", 200): 2, ("/healthz", "GET", 400): 1}
    assert metrics.errors == {400: 1} and metrics.disconnects == {"/healthz": 2} and metrics.in_flight == 0
    assert metrics.latency_count == {"/healthz": 3} and metrics.latency_sum["/healthz"] == pytest.approx(0.3)


def test_metric_values_and_labels_are_escaped() -> None:
    assert [srv._number(v) for v in (float("inf"), float("-inf"), 0.5, 1.0, 10.0, 0.0025)] == [
        "+Inf", "-Inf", "0.5", "1", "10", "0.0025"]
    assert srv._label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    with pytest.raises(ValueError):
        srv._json({"x": float("nan")})


def test_metrics_of_a_served_sequence(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as c:
        before = _samples(c.get("/metrics").text)
        c.get("/healthz")
        c.request("BREW", "/nowhere")
        c.delete("/metrics")
        answer = c.get("/metrics")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    after = _samples(answer.text)
    for key, delta in (('tinydeploy_requests_total{path="/healthz",method="GET",status="200"}', 1),
                       ('tinydeploy_requests_total{path="other",method="other",status="404"}', 1),
                       ('tinydeploy_requests_total{path="/metrics",method="DELETE",status="405"}', 1),
                       ('tinydeploy_requests_total{path="/metrics",method="GET",status="200"}', 1),
                       ('tinydeploy_errors_total{status="404"}', 1), ('tinydeploy_errors_total{status="405"}', 1)):
        assert after[key] - before.get(key, 0) == delta, key


# ----- building and running ------------------------------------------------------------------------
def test_create_app_checks_its_arguments_and_sizes_the_limits(fast_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    for bad in (0, -1):
        with pytest.raises(TinyDeployError) as info:
            create_app(fast_dir, "cpu", bad)
        assert str(info.value) == f"--max-batch must be at least 1, got {bad}"
    for bad in (0, -1.0, 3600.5):
        with pytest.raises(TinyDeployError) as info:
            create_app(fast_dir, "cpu", 4, body_timeout_s=bad)
        assert str(info.value) == f"--body-timeout must be between 0 and 3600 seconds, got {bad}"
    app = create_app(fast_dir, "cpu", 1, body_timeout_s=3600)
    assert app.limits == Limits.for_model(1, 64, 1, 3600.0) and app.limits.max_images == 0
    assert create_app(fast_dir, "auto", 4).model.requested_provider == "auto"
    default = create_app(fast_dir)
    assert default.limits == Limits.for_model(1, 64, srv.DEFAULT_MAX_BATCH, 10.0)
    assert default.model.requested_provider == srv.DEFAULT_PROVIDER
    names = tuple(f"feature {i}" for i in range(64))
    named = create_app(write_export(tmp_path / "named", fast_spec(feature_names=names)), "cpu", 1024)
    name_bytes = sum(len(json.dumps(n)) + 2 for n in names)
    assert named.limits == Limits.for_model(1, 64, 1024, name_bytes=name_bytes)
    assert named.limits.max_body_bytes == 1024 * (64 * 32 + name_bytes) + 4096
    model = OnnxModel(fast_dir, "cpu")
    assert create_app(tmp_path / "ignored", model=model).model is model
    with pytest.raises(TinyDeployError, match="does not exist"):
        create_app(tmp_path / "nope", "cpu", 8)
    broken = write_export(tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"junk")
    with pytest.raises(TinyDeployError, match="changed"):
        create_app(broken, "cpu", 8)
    assert create_app(broken, "cpu", 8, verify=False, model=model).model is model
    with pytest.raises(TinyDeployError, match="onnxruntime cannot load"):
        create_app(broken, "cpu", 8, verify=False)


def _png(value: int = 7) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def test_image_uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    directory = write_export(tmp_path / "images", fast_spec(image=True))
    app = create_app(directory, "cpu", 4)
    assert app.limits == Limits.for_model(3, 64, 4, images=True) and app.limits.max_images == 4
    with running_server(app) as base, httpx.Client(base_url=base, timeout=10.0) as c:
        upload = c.post("/v1/predict", files=[("image", ("a.png", _png(7), "image/png")),
                                              ("image", ("b.png", _png(200), "image/png"))])
        assert upload.status_code == 200, upload.text
        tensors = np.stack([np.full((1, 8, 8), v / 255 * 16, dtype=np.float32) for v in (7, 200)])
        np.testing.assert_allclose(upload.json()["outputs"], reference(directory, tensors), rtol=1e-5, atol=1e-5)
        assert upload.json()["batch_size"] == 2
        bad = c.post("/v1/predict", files=[("image", ("a.png", _png(), "image/png")),
                                           ("image", ("x" * 100 + ".png", b"not an image", "image/png"))])
        assert _error(bad, 422, "undecodable_image").startswith(f"image 1 ({('x' * 100)[:60]!r}) cannot be decoded")
        message = _error(c.post("/v1/predict", content=b"{}", headers={"Content-Type": "text/plain"}), 415,
                         "unsupported_media_type")
        assert message == "Content-Type must be application/json or multipart/form-data (images), got 'text/plain'"
        assert c.post("/v1/predict", json={"inputs": tensors.tolist()}).status_code == 200
        message = _error(c.post("/v1/predict", files=[("image", ("a.png", _png(), "image/png"))] * 5), 413,
                         "too_many_images")
    limit = app.limits.max_upload_bytes
    status, _, answer = _answer(_asgi(app, _http("/v1/predict", headers=[
        (b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", str(limit + 1).encode())]), [],
        stall=True))
    assert status == 413 and json.loads(answer)["error"] == {
        "status": 413, "code": "upload_too_large", "message": f"the body has {limit + 1} bytes, over the limit of "
        f"{limit} bytes: send at most 4 images of at most {app.limits.max_image_bytes} bytes"}
    monkeypatch.setattr(srv, "pillow_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="tinydeploy.serve"):
        no_pillow = create_app(directory, "cpu", 4)
    assert no_pillow.limits.max_images == 0
    assert [r.getMessage() for r in caplog.records] == [
        ("Pillow is not installed: image uploads are refused (415); JSON tensors are served. pip install pillow to "
        "take PNG/JPEG uploads")]
    status, _, answer = _answer(_asgi(no_pillow, _http("/v1/predict", headers=[
        (b"content-type", b"multipart/form-data; boundary=b")]), [{"type": "http.request", "body": b"--b--"}]))
    assert status == 415 and json.loads(answer)["error"]["message"] == (
        "image uploads need Pillow, which this server lacks (pip install pillow): send application/json "
        '{"inputs": [...]}')


def test_a_fixed_batch_of_one_starts_and_serves(tmp_path: Path) -> None:
    app = create_app(write_export(tmp_path / "one", batch=1), "cpu", 4)  # the start-up run uses one row
    status, _, body = _answer(_asgi(app, _http("/v1/predict", headers=[(b"content-type", b"application/json")]),
                                    [{"type": "http.request", "body": json.dumps({"inputs": ROWS[:1].tolist()}).encode()}]))
    assert status == 200 and json.loads(body)["batch_size"] == 1


def test_images_of_a_model_expecting_standardized_inputs_are_not_taken(tmp_path: Path) -> None:
    spec = fast_spec(image=True)
    props = {**metadata(spec), "tinydeploy.inputs": "standardized"}
    app = create_app(write_export(tmp_path / "std", spec, props=props), "cpu", 4)
    assert app.model.image is not None and app.limits.max_images == 0
    status, _, body = _answer(_asgi(app, _http("/v1/predict", headers=[
        (b"content-type", b"multipart/form-data; boundary=b")]), [{"type": "http.request", "body": b"--b--"}]))
    assert status == 415 and json.loads(body)["error"]["message"] == (
        'this model was not grown on images: send application/json {"inputs": [...]}')


def test_app_from_env(fast_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.delenv("TINYDEPLOY_SERVE_OPTIONS", raising=False)
    with pytest.raises(TinyDeployError) as info:
        app_from_env()
    assert str(info.value) == "TINYDEPLOY_SERVE_OPTIONS is not set: start the server with 'tinydeploy serve DIR'"
    monkeypatch.setenv("TINYDEPLOY_SERVE_OPTIONS", "")
    with pytest.raises(TinyDeployError, match="is not set"):
        app_from_env()
    for verify in (False, True):
        options = ServeOptions(str(fast_dir), "cpu", 3, verify, 2.5)
        monkeypatch.setenv("TINYDEPLOY_SERVE_OPTIONS", json.dumps(options.__dict__))
        app = app_from_env()
        assert app.limits.max_batch == 3 and app.limits.body_timeout_s == 2.5
        assert (app.model.manifest is not None) == verify and app.model.requested_provider == "cpu"
    assert ServeOptions("d") == ServeOptions("d", srv.DEFAULT_PROVIDER, 1024, True, 10.0)


def test_serve_checks_its_arguments_first(fast_dir: Path) -> None:  # noqa: F811
    with pytest.raises(TinyDeployError) as info:
        serve(fast_dir, workers=0)
    assert str(info.value) == "--workers must be at least 1, got 0"
    for port in (-1, 65536):
        with pytest.raises(TinyDeployError) as info:
            serve(fast_dir, port=port)
        assert str(info.value) == f"--port must be between 0 and 65535, got {port}"
    for port in (0, 65535):  # valid: the next check (the model and its limits) answers
        with pytest.raises(TinyDeployError, match="max-batch"):
            serve(fast_dir, port=port, max_batch=0)


def test_serve_defaults_to_one_verified_worker_on_loopback() -> None:
    defaults = {name: parameter.default for name, parameter in inspect.signature(serve).parameters.items()}
    assert defaults == {"export_dir": inspect.Parameter.empty, "host": "127.0.0.1", "port": 8000,
                        "provider": srv.DEFAULT_PROVIDER, "workers": 1, "max_batch": 1024, "log_level": "info",
                        "verify": True, "body_timeout_s": 10.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_runs_uvicorn_with_its_banner(fast_dir: Path, tmp_path: Path, workers: int) -> None:  # noqa: F811
    """``serve`` in a process of its own, as ``tinydeploy serve`` runs it (two workers: each its own model), on a
    directory without manifest.json: ``verify=False`` reaches every process that loads the model."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((fast_dir / "model.onnx").read_bytes())
    port = _free_port()
    with pytest.raises(TinyDeployError, match="--port"):  # here too, so that mutation testing runs this test on serve
        serve(fast_dir, port=65536, workers=workers)
    script = ("import sys; from tinydeploy.serving.server import serve; "
              f"serve(sys.argv[1], port={port}, provider='cpu', workers={workers}, max_batch=3, log_level='info', "
              "verify=False, body_timeout_s=4.0)")
    process = subprocess.Popen([sys.executable, "-c", script, str(bare)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                meta = httpx.get(f"{base}/v1/metadata", timeout=5).json()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert meta["max_batch"] == 3 and meta["body_timeout_s"] == 4.0 and meta["verified_manifest"] is False
        assert meta["requested_provider"] == "cpu"
        assert httpx.post(f"{base}/v1/predict", json={"inputs": ROWS[:3].tolist()}).status_code == 200
        assert httpx.post(f"{base}/v1/predict", json={"inputs": ROWS[:4].tolist()}).status_code == 413
        pid = httpx.get(f"{base}/healthz").json()["pid"]
        assert (pid == process.pid) == (workers == 1)  # two workers: a worker process answers
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
    assert '"POST /v1/predict HTTP/1.1"' not in stdout + stderr  # no access log, even at log level info
    assert "Application startup complete." in stderr  # lifespan on, log level info
    sha256 = hashlib.sha256((bare / "model.onnx").read_bytes()).hexdigest()
    lines = stderr.splitlines()
    assert lines[0] == srv.NO_VERIFY_WARNING.format(path=bare / "model.onnx")
    assert lines[1] == (f"tinydeploy: serving {bare / 'model.onnx'} (sha256 {sha256[:12]}, classification, "
                        f"providers CPUExecutionProvider, max batch 3, {workers} worker{'s' if workers > 1 else ''}) "
                        f"on http://127.0.0.1:{port} [POST /v1/predict, GET /v1/metadata, /healthz, /metrics]")
