"""Hostile HTTP clients against a real uvicorn server on loopback (raw sockets where httpx would be polite).

Every rejection must be a 4xx JSON error naming its limit, the server must keep answering correctly
afterwards, /metrics labels must stay within fixed sets, and a client that goes away must be counted
apart from errors.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_fast_fixtures import digit_rows, fast_dir, running_server  # noqa: F401

from tinydeploy.serving.limits import Limits, RequestError, check_json
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.serving.server import create_app

MAX_BATCH = 16
BODY_TIMEOUT = 1.0
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def app(fast_dir: Path):  # noqa: F811
    return create_app(fast_dir, "cpu", MAX_BATCH, body_timeout_s=BODY_TIMEOUT)


@pytest.fixture(scope="module")
def url(app):
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return digit_rows(64)


def _raw(
    url: str, request: bytes, *, read_timeout: float = 10.0, close_after_send: bool = False
) -> tuple[int | None, bytes, float]:
    """Send raw bytes, return (status, body, seconds until the answer); status None if the server closed silently."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(request)
        if close_after_send:
            return None, b"", 0.0
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, data, time.monotonic() - start
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ")[1]), body, time.monotonic() - start


def _request(
    method: str, path: str, body: bytes = b"", length: int | None = None, content_type: str = "application/json"
) -> bytes:
    declared = len(body) if length is None else length
    return (
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {declared}\r\n\r\n"
    ).encode() + body


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _assert_still_correct(url: str, x_test: np.ndarray, model: OnnxModel) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as c:
        answer = c.post("/v1/predict", json={"inputs": x_test[:3].tolist()})
    assert answer.status_code == 200
    np.testing.assert_array_equal(
        np.asarray(answer.json()["outputs"], dtype=np.float32), model.predict(x_test[:3]).outputs
    )


def _hostile_bodies(x_test: np.ndarray) -> list[tuple[str, bytes, int, str, str]]:
    """(name, body, status, code, words of the message naming the limit)."""
    row = x_test[0].tolist()
    big_int = "9" * 5000  # past Python's 4,300-digit int conversion limit
    return [
        (
            "huge integer",
            f'{{"inputs": [{big_int}{", 0" * 63}]}}'.encode(),
            422,
            "number_too_long",
            "5000 characters, over the limit of 64",
        ),
        (
            "integer beyond float32",
            f'{{"inputs": [-{"9" * 40}{", 0" * 63}]}}'.encode(),
            422,
            "out_of_range",
            "has 40 digits: outside float32's range",
        ),
        (
            "float beyond float32",
            f'{{"inputs": [-4e38{", 0" * 63}]}}'.encode(),
            422,
            "non_finite",
            "outside the float32 range",
        ),
        (
            "deep nesting",
            b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "too_deep",
            "100001 levels deep, over the limit of 3",
        ),
        ("nesting in an extra field", b'{"inputs": [[0]], "x": [[[[[[1]]]]]]}', 400, "too_deep", "over the limit of 3"),
        (
            "too many numbers",
            json.dumps({"inputs": [row] * (MAX_BATCH + 1)}).encode(),
            413,
            "too_many_numbers",
            f"over the limit of {MAX_BATCH * 64} ({MAX_BATCH} rows of 64 values)",
        ),
        ("NaN", f'{{"inputs": [NaN{", 0" * 63}]}}'.encode(), 422, "non_finite", "literal NaN"),
        ("Infinity", f'{{"inputs": [[-Infinity{", 0" * 63}]]}}'.encode(), 422, "non_finite", "literal -Infinity"),
        ("1e999", f'{{"inputs": [1e999{", 0" * 63}]}}'.encode(), 422, "non_finite", "NaN or infinite"),
        (
            "numbers hidden in strings do not count",
            json.dumps({"inputs": ["1" * 10_000] * 2}).encode(),
            422,
            "dtype",
            "only numbers",
        ),
        ("long key", json.dumps({"k" * 100_000: 1}).encode(), 422, "missing_inputs", '"inputs"'),
    ]


def test_hostile_bodies_get_4xx_naming_the_limit(url: str, x_test: np.ndarray, fast_dir: Path) -> None:  # noqa: F811
    model = OnnxModel(fast_dir, "cpu")
    with httpx.Client(base_url=url, timeout=10.0) as c:
        for name, body, status, code, words in _hostile_bodies(x_test):
            answer = c.post("/v1/predict", content=body, headers=JSON)
            assert answer.status_code == status, (name, answer.text[:300])
            error = answer.json()["error"]
            assert (error["status"], error["code"]) == (status, code), name
            assert words in error["message"] and len(error["message"]) < 400, (name, error["message"])
    _assert_still_correct(url, x_test, model)


def test_upload_limits_apply_before_the_body_is_read(url: str, app, x_test: np.ndarray, fast_dir: Path) -> None:  # noqa: F811
    limit = app.limits.max_body_bytes
    status, body, seconds = _raw(url, _request("POST", "/v1/predict", b"{", length=100 * limit))
    assert status == 413 and seconds < 2.0  # answered from the header, without waiting for 100x the limit
    assert json.loads(body)["error"]["message"].startswith(
        f"the body has {100 * limit} bytes, over the limit of {limit} bytes"
    )
    chunked = (
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"0," * 65536
    chunks = (
        b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(limit // len(piece) + 2))
        + b"0\r\n\r\n"
    )
    status, body, _ = _raw(url, chunked + chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    status, body, _ = _raw(url, _request("POST", "/v1/predict", b"{}", content_type="text/plain"))
    assert status == 415 and "application/json" in json.loads(body)["error"]["message"]
    _assert_still_correct(url, x_test, OnnxModel(fast_dir, "cpu"))


def test_slow_body_gets_408_within_the_timeout(url: str, x_test: np.ndarray, fast_dir: Path) -> None:  # noqa: F811
    status, body, seconds = _raw(url, _request("POST", "/v1/predict", b'{"inputs": [', length=1000))
    assert status == 408 and BODY_TIMEOUT <= seconds < BODY_TIMEOUT + 3.0
    error = json.loads(body)["error"]
    assert (
        error["code"] == "body_timeout" and f"within the limit of {BODY_TIMEOUT:g} s (got 12 bytes)" in error["message"]
    )
    _assert_still_correct(url, x_test, OnnxModel(fast_dir, "cpu"))


def test_metrics_labels_come_from_fixed_sets(url: str) -> None:
    methods = [f"X{i}FOO" for i in range(20)]
    for method in methods:
        status, body, _ = _raw(url, _request(method, f"/random/{method}"))
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        status, body, _ = _raw(url, _request(method, "/v1/predict"))
        assert (
            status == 405
            and "this method is not allowed on /v1/predict: use POST" in json.loads(body)["error"]["message"]
        )
    text = httpx.get(f"{url}/metrics").text
    labels = {
        line.split("{", 1)[1].split("}")[0]
        for line in text.splitlines()
        if line.startswith("tinydeploy_requests_total")
    }
    assert not any("FOO" in label or "/random" in label for label in labels)
    assert (
        'path="other",method="other",status="404"' in labels
        and 'path="/v1/predict",method="other",status="405"' in labels
    )


def test_client_disconnects_are_counted_apart_from_errors(url: str, x_test: np.ndarray, fast_dir: Path) -> None:  # noqa: F811
    before = _samples(httpx.get(f"{url}/metrics").text)
    for _ in range(3):  # announce 1000 bytes, send 12, hang up
        _raw(url, _request("POST", "/v1/predict", b'{"inputs": [', length=1000), close_after_send=True)
    deadline = time.monotonic() + 5.0
    key = 'tinydeploy_client_disconnects_total{path="/v1/predict"}'
    while True:
        after = _samples(httpx.get(f"{url}/metrics").text)
        if after.get(key, 0) - before.get(key, 0) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after.get(key, 0) - before.get(key, 0) == 3
    errors = {k: v for k, v in after.items() if k.startswith("tinydeploy_errors_total")}
    assert errors == {k: v for k, v in before.items() if k.startswith("tinydeploy_errors_total")}
    assert not any(k.startswith('tinydeploy_errors_total{status="5') for k in after)
    _assert_still_correct(url, x_test, OnnxModel(fast_dir, "cpu"))


def test_a_bug_answers_500_json_and_the_server_keeps_running(
    fast_dir: Path, x_test: np.ndarray, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The one path that may answer 5xx: an exception in the server's own code."""
    app = create_app(fast_dir, "cpu", MAX_BATCH)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=10.0) as c:
        monkeypatch.setattr(app.model, "predict", lambda *a, **k: 1 / 0)
        answer = c.post("/v1/predict", json={"inputs": x_test[:1].tolist()})
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
        assert "ZeroDivision" not in answer.text  # no internals leak to the client
        monkeypatch.undo()
        assert c.post("/v1/predict", json={"inputs": x_test[:1].tolist()}).status_code == 200
        assert _samples(c.get("/metrics").text)['tinydeploy_errors_total{status="500"}'] == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[" * 4 + b"]" * 4, "too_deep"),
        (b"[" + b"1," * 1025 + b"1]", "too_many_numbers"),
        (b"[" + b"1" * 65 + b"]", "number_too_long"),
        (b"[1, -" + b"9" * 40 + b"]", "out_of_range"),
    ],
)
def test_check_json_bounds_each_limit(body: bytes, code: str) -> None:
    limits = Limits(max_batch=16, max_body_bytes=1 << 20, max_depth=3, max_numbers=1024)
    with pytest.raises(RequestError) as info:
        check_json(body, limits)
    assert info.value.code == code and 400 <= info.value.status < 500
    check_json(b'{"inputs": [[' + b"1.5," * 1023 + b'1], "x\\"[[[[": "1111"}', limits)  # at the limits: accepted
    check_json(b"[-" + b"9" * 39 + b", 1e" + b"9" * 60 + b"]", limits)  # 39 digits and a long float: the runtime decides
