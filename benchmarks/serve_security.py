"""Serving under hostile clients, and start-up cost, before and after the security work, side by side.

Both library versions run from their source trees with the same interpreter (``PYTHONPATH``), on the
same export directory (a digits MLP written by this checkout's ``export_run``), alternating
before/after for every timed measure:

* CLI start-up (the ``tinydeploy`` console script): wall time of ``tinydeploy --help`` (median of 5) and whether it imports torch
  (``python -X importtime``); ``tinydeploy predict`` on 5 rows (median of 3);
* ``tinydeploy serve``: time from process start to the first ``/healthz`` 200 (median of 3) and the
  resident memory of the serving process; with ``--workers 2``, the time until two workers answered
  (after: by pid; before: ``/healthz`` carries no pid), each worker's resident memory and how many
  worker processes the supervisor started in 40 s (restarts show up as extra ones);
* load: ``--clients`` concurrent keep-alive clients (raw asyncio HTTP/1.1, in this process) send
  ``--requests`` valid predictions of 1-8 digits rows; requests/s, 5xx, and wrong answers (every
  answer is compared with onnxruntime run here on the same model file, labels exactly, outputs to
  1e-5);
* fuzz: a fixed corpus of crafted hostile requests (huge and out-of-range numbers, deep nesting,
  oversized and chunked bodies, slow bodies, disconnects, bad headers, odd methods and paths) plus
  seeded random mutations of valid bodies, sent by the same number of concurrent clients, each
  interleaved with a valid request whose answer is checked; counted: status classes, 5xx, hangs
  (no answer within the body timeout + 5 s), wrong answers, and whether the server still answers.

Usage:
    .venv/bin/python benchmarks/serve_security.py --before /tmp/sec-base        # a checkout of main
    .venv/bin/python benchmarks/serve_security.py --before /tmp/sec-base --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info  # noqa: E402

NAME = "serve_security"
REPO = Path(__file__).resolve().parents[1]
BODY_TIMEOUT = 2.0  # the after-server's --body-timeout here (default 10 s), to keep the run short
HANG_AFTER = BODY_TIMEOUT + 5.0


# ----- the model ------------------------------------------------------------------------------------
def build_export(work: Path) -> Path:
    """A digits MLP [32, 16] trained for 5 epochs, exported to ONNX by this checkout."""
    import torch

    from tinydeploy.data import apply_standardizer, fit_standardizer, load_dataset
    from tinydeploy.export.pipeline import export_run
    from tinydeploy.model.build import build_model
    from tinydeploy.model.spec import ArchSpec
    from tinydeploy.training.rundir import write_run

    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    prep = fit_standardizer(data.X_train)
    spec = ArchSpec.mlp(task="classification", input_shape=data.input_shape, hidden_widths=[32, 16],
                        n_outputs=len(data.classes), classes=data.classes, preprocessing=prep, dataset="digits")
    model = build_model(spec)
    X, y = torch.from_numpy(apply_standardizer(data.X_train, prep)), torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        for batch in torch.randperm(len(X)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
            optimizer.step()
    run = write_run(work / "run", model.eval(), spec, [], {"dataset": "digits", "task": "classification",
                                                           "data_source": data.source})
    return export_run(run, work / "export", formats=("onnx",), command="benchmarks/serve_security.py").out_dir


# ----- processes ------------------------------------------------------------------------------------
def env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


#: The ``tinydeploy`` console script of this interpreter's environment (what users run; its module is
#: re-imported by uvicorn's spawned workers), else ``python -m cli``.
SCRIPT = Path(sys.executable).with_name("tinydeploy")


def cli(root: Path, *args: str) -> list[str]:
    return [str(SCRIPT), *args] if SCRIPT.is_file() else [sys.executable, "-m", "cli", *args]


def timed(root: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(cli(root, *args), cwd=root, env=env(root), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed: {done.stderr[-500:]}")
    return time.perf_counter() - start


def imports(root: Path) -> dict[str, Any]:
    """Whether ``tinydeploy --help`` imports torch, and the summed top-level import time (importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cli", "--help"], cwd=root, env=env(root),
                          capture_output=True, text=True, timeout=300)
    top, modules = 0, set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        modules.add(name.strip())
        if not name[1:].startswith(" "):  # top level: one space before the name, nested ones are indented
            top += int(cumulative)
    return {"imports_torch": "torch" in modules, "imports_onnxruntime": "onnxruntime" in modules,
            "top_level_import_us": top}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def is_worker(pid: int) -> bool:
    """A uvicorn worker: a multiprocessing spawn child (not its resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def healthz(port: int) -> dict[str, Any] | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        return json.loads(body) if b" 200 " in head.split(b"\r\n")[0] else None
    except (OSError, ValueError):
        return None


class Server:
    """``tinydeploy serve`` of one side in a subprocess."""

    def __init__(self, root: Path, export: Path, side: str, workers: int = 1, wait: bool = True) -> None:
        self.port = free_port()
        extra = ["--body-timeout", str(BODY_TIMEOUT)] if side == "after" else []
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            cli(root, "serve", str(export), "--port", str(self.port), "--provider", "cpu", "--workers", str(workers),
                "--max-batch", "64", *extra),
            cwd=root, env=env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.startup_s: float | None = None
        while wait and healthz(self.port) is None:
            if self.process.poll() is not None or time.perf_counter() - self.start > 120:
                self.stop()
                raise RuntimeError(f"the {side} server did not start")
            time.sleep(0.01)
        if wait:
            self.startup_s = time.perf_counter() - self.start

    def stop(self) -> None:
        """Interrupt the server's process group (supervisor and workers); kill it if it lingers."""
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def workers_report(root: Path, export: Path, side: str, watch_s: float = 40.0) -> dict[str, Any]:
    """Start ``serve --workers 2`` and watch it for ``watch_s`` seconds: when it first answered, which
    pids answered, how many worker processes the supervisor started (restarts show as extra ones)."""
    server = Server(root, export, side, workers=2, wait=False)
    try:
        seen_workers: set[int] = set()
        answered: set[int] = set()
        first = two_at = None
        while time.perf_counter() - server.start < watch_s:
            seen_workers |= {pid for pid in children(server.process.pid) if is_worker(pid)}
            answer = healthz(server.port)
            if answer is not None:
                first = first or time.perf_counter() - server.start
                if "pid" in answer:
                    answered.add(answer["pid"])
                    if len(answered) == 2 and two_at is None:
                        two_at = time.perf_counter() - server.start
            time.sleep(0.02)
        workers = [pid for pid in children(server.process.pid) if is_worker(pid)]
        return {
            "watched_s": watch_s,
            "first_healthz_s": first,
            "two_workers_answered_s": two_at,
            "pids_answered": len(answered),
            "worker_processes_started": len(seen_workers),
            "worker_rss_mb": [round(rss_mb(pid), 1) for pid in workers],
            "supervisor_rss_mb": round(rss_mb(server.process.pid), 1),
        }
    finally:
        server.stop()


# ----- HTTP clients ---------------------------------------------------------------------------------
async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
    return int(lines[0].split(b" ")[1]), await reader.readexactly(length)


def post(body: bytes, content_type: bytes = b"application/json", length: int | None = None) -> bytes:
    declared = len(body) if length is None else length
    return (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type
            + f"\r\nContent-Length: {declared}\r\n\r\n".encode() + body)


class Checker:
    """Expected answers for valid requests, from onnxruntime run in this process on the same model."""

    def __init__(self, export: Path) -> None:
        import onnxruntime as ort

        from tinydeploy.data import load_dataset

        self.X = load_dataset("digits").X_test.astype(np.float32)
        session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
        self.outputs = session.run(None, {"input": self.X})[0]
        self.classes = json.loads((export / "arch.json").read_text())["classes"]

    def request(self, k: int) -> tuple[bytes, int, int]:
        start, size = (k * 7) % (len(self.X) - 8), 1 + k % 8
        return post(json.dumps({"inputs": self.X[start : start + size].tolist()}).encode()), start, size

    def correct(self, status: int, body: bytes, start: int, size: int) -> bool:
        if status != 200:
            return False
        answer = json.loads(body)
        outputs = np.asarray(answer["outputs"], dtype=np.float32)
        expected = self.outputs[start : start + size]
        return (outputs.shape == expected.shape and bool(np.allclose(outputs, expected, rtol=1e-5, atol=1e-5))
                and answer["labels"] == [self.classes[i] for i in expected.argmax(1)])


async def load(port: int, checker: Checker, clients: int, requests: int) -> dict[str, Any]:
    counts = {"ok": 0, "wrong": 0, "5xx": 0, "errors": 0}
    queue = iter(range(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for k in queue:
            raw, start, size = checker.request(k)
            try:
                writer.write(raw)
                status, body = await asyncio.wait_for(read_answer(reader), HANG_AFTER)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                counts["errors"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            counts["5xx"] += status >= 500
            counts["ok" if checker.correct(status, body, start, size) else "wrong"] += 1
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - began
    return {**counts, "requests": requests, "seconds": seconds, "requests_per_s": requests / seconds}


def fuzz_corpus(checker: Checker, n_random: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(kind, raw request, how to send it: "answer", "slow" or "hang up")."""
    row = json.dumps(checker.X[0].tolist())
    zeros = ", 0" * 63
    crafted = {
        "huge integer": post(f'{{"inputs": [{"9" * 5000}{zeros}]}}'.encode()),
        "integer beyond float32": post(f'{{"inputs": [{"9" * 40}{zeros}]}}'.encode()),
        "deep nesting": post(b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "too many numbers": post(json.dumps({"inputs": [checker.X[0].tolist()] * 65}).encode()),
        "NaN": post(f'{{"inputs": [NaN{zeros}]}}'.encode()),
        "Infinity": post(f'{{"inputs": [-Infinity{zeros}]}}'.encode()),
        "1e999": post(f'{{"inputs": [1e999{zeros}]}}'.encode()),
        "strings": post(json.dumps({"inputs": ["a"] * 64}).encode()),
        "nulls": post(json.dumps({"inputs": [None] * 64}).encode()),
        "booleans": post(json.dumps({"inputs": [True] * 64}).encode()),
        "wrong content type": post(row.encode(), b"text/plain"),
        "empty body": post(b""),
        "not utf-8": post(b'{"inputs": "\xff"}'),
        "malformed": post(b'{"inputs": [1, 2'),
        "wrong width": post(b'{"inputs": [[1, 2, 3]]}'),
        "ragged": post(json.dumps({"inputs": [[0.0] * 64, [0.0] * 63]}).encode()),
        "extra field": post(f'{{"inputs": {row}, "x": 1}}'.encode()),
        "oversized declared": post(b"{", length=1 << 30),
        "bad content-length": b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: abc\r\n\r\n{}",
        "chunked oversized": (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n"
                              + b"".join(b"10000\r\n" + b"0," * 32768 + b"\r\n" for _ in range(40)) + b"0\r\n\r\n"),
        "odd method": b"FOO /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "unknown path": b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "metrics": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    corpus = [(kind, raw, "answer") for kind, raw in crafted.items()]
    corpus += [("slow body", post(b'{"inputs": [', length=1000), "slow")] * 2
    corpus += [("disconnect mid-body", post(b'{"inputs": [', length=1000), "hang up")] * 4
    rng = random.Random(seed)
    for _ in range(n_random):
        raw, _, _ = checker.request(rng.randrange(10_000))
        head, body = raw.split(b"\r\n\r\n", 1)
        body = bytearray(body)
        mutation = rng.choice(("truncate", "flip", "insert", "number", "brackets"))
        if mutation == "truncate":
            body = body[: rng.randrange(len(body))]
        elif mutation == "flip":
            for _ in range(rng.randint(1, 5)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif mutation == "insert":
            at = rng.randrange(len(body))
            body[at:at] = rng.choice([b"[", b"]", b"{", b'"', b",", b"null", b"-", b"1e400", b"\x00", b"9" * 400])
        elif mutation == "number":
            text = body.decode()
            at = text.index(",") + 1
            body = bytearray((text[:at] + rng.choice(["1" * 400, "-1e39", "1e-400", "0x10", ".5", "1.", "--1"])
                              + text[at:]).encode())
        else:
            body = bytearray(b"[" * rng.randint(1, 50)) + body
        corpus.append((f"mutation: {mutation}", post(bytes(body)), "answer"))
    return corpus


async def fuzz(port: int, checker: Checker, clients: int, corpus: list[tuple[str, bytes, str]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    counts = {"5xx": 0, "hangs": 0, "closed_without_answer": 0, "valid_ok": 0, "valid_wrong": 0}
    fivexx: dict[str, int] = {}
    items = iter(enumerate(corpus))

    async def send(raw: bytes, how: str) -> tuple[int | None, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            if how == "hang up":
                return None, b""
            return await asyncio.wait_for(read_answer(reader), HANG_AFTER)
        finally:
            writer.close()

    async def client() -> None:
        for k, (kind, raw, how) in items:
            try:
                status, _ = await send(raw, how)
            except asyncio.TimeoutError:
                counts["hangs"] += 1
                status = None
            except (OSError, asyncio.IncompleteReadError):
                counts["closed_without_answer"] += 1
                status = None
            if status is not None:
                statuses[f"{status // 100}xx"] = statuses.get(f"{status // 100}xx", 0) + 1
                if status >= 500:
                    counts["5xx"] += 1
                    fivexx[kind] = fivexx.get(kind, 0) + 1
            raw, start, size = checker.request(k)  # a valid request after each hostile one
            try:
                status, body = await send(raw, "answer")
                counts["valid_ok" if checker.correct(status, body, start, size) else "valid_wrong"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                counts["valid_wrong"] += 1

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"requests": len(corpus), **counts, "statuses": statuses, "5xx_by_kind": fivexx,
            "seconds": time.perf_counter() - began}


# ----- the run ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree of the code before (e.g. a worktree of main)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000, help="valid requests per load round")
    parser.add_argument("--rounds", type=int, default=2, help="load rounds per side (alternating)")
    parser.add_argument("--mutations", type=int, default=300, help="random mutations in the fuzz corpus")
    parser.add_argument("--quick", action="store_true", help="1 round of 500 requests, 50 mutations")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.mutations = 500, 1, 50
    sides = {"before": args.before.resolve(), "after": REPO}
    report = Report(NAME, "Serving under hostile clients; CLI and server start-up (before / after)")
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="serve-security-"))
    export = build_export(work)
    checker = Checker(export)
    rows = work / "x5.csv"
    np.savetxt(rows, checker.X[:5], delimiter=",")
    results: dict[str, dict[str, Any]] = {side: {"help_s": [], "predict_s": [], "startup_s": [], "rss_mb": [],
                                                 "load": []} for side in sides}
    for _ in range(5):
        for side, root in sides.items():
            results[side]["help_s"].append(timed(root, "--help"))
    for _ in range(3):
        for side, root in sides.items():
            results[side]["predict_s"].append(timed(root, "predict", str(export), "-i", str(rows), "--provider", "cpu"))
            server = Server(root, export, side)
            results[side]["startup_s"].append(server.startup_s)
            time.sleep(0.5)
            results[side]["rss_mb"].append(rss_mb(server.process.pid))
            server.stop()
    for side, root in sides.items():
        results[side]["imports"] = imports(root)
        results[side]["workers"] = workers_report(root, export, side)
    corpus = fuzz_corpus(checker, args.mutations)
    for _ in range(args.rounds):
        for side, root in sides.items():
            server = Server(root, export, side)
            try:
                results[side]["load"].append(asyncio.run(load(server.port, checker, args.clients, args.requests)))
            finally:
                server.stop()
    for side, root in sides.items():
        server = Server(root, export, side)
        try:
            results[side]["fuzz"] = asyncio.run(fuzz(server.port, checker, args.clients, corpus))
            results[side]["alive_after_fuzz"] = healthz(server.port) is not None
        finally:
            server.stop()

    med = statistics.median
    b, a = results["before"], results["after"]

    def row(name: str, before: float, after: float, unit: str, digits: int = 2) -> list[str]:
        ratio = f"{after / before:.2f}" if before else "-"
        return [name, f"{before:.{digits}f} {unit}", f"{after:.{digits}f} {unit}", ratio]

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f} s"

    rps = {side: statistics.fmean(r["requests_per_s"] for r in results[side]["load"]) for side in sides}
    report.table("Start-up and memory", ["measure", "before", "after", "after / before"], [
        row("tinydeploy --help (median of 5)", med(b["help_s"]), med(a["help_s"]), "s"),
        ["tinydeploy --help imports torch", str(b["imports"]["imports_torch"]), str(a["imports"]["imports_torch"]), "-"],
        row("tinydeploy predict, 5 rows (median of 3)", med(b["predict_s"]), med(a["predict_s"]), "s"),
        row("tinydeploy serve: start to first /healthz 200 (median of 3)", med(b["startup_s"]), med(a["startup_s"]), "s"),
        row("tinydeploy serve: resident memory, 1 worker (median of 3)", med(b["rss_mb"]), med(a["rss_mb"]), "MB", 0),
        ["--workers 2: resident memory per worker", str(b["workers"]["worker_rss_mb"]) + " MB",
         str(a["workers"]["worker_rss_mb"]) + " MB", "-"],
        ["--workers 2: first /healthz 200", seconds(b["workers"]["first_healthz_s"]),
         seconds(a["workers"]["first_healthz_s"]), "-"],
        [f"--workers 2: worker processes started in {b['workers']['watched_s']:g} s",
         str(b["workers"]["worker_processes_started"]), str(a["workers"]["worker_processes_started"]), "-"],
        ["--workers 2: distinct pids answering /healthz", "n/a (no pid in /healthz)",
         f"{a['workers']['pids_answered']} (both by {seconds(a['workers']['two_workers_answered_s'])})", "-"],
    ], note="Medians of runs alternating before/after. Resident memory: VmRSS of the serving process once healthy.")
    load_rows = []
    for side in sides:
        for i, r in enumerate(results[side]["load"]):
            load_rows.append([side, i + 1, f"{r['requests_per_s']:,.0f}", r["ok"], r["wrong"], r["5xx"], r["errors"]])
    report.table(f"Load: {args.clients} concurrent keep-alive clients, {args.requests} valid requests per round",
                 ["code", "round", "requests/s", "correct", "wrong", "5xx", "transport errors"], load_rows,
                 note=f"Mean requests/s: before {rps['before']:,.0f}, after {rps['after']:,.0f} "
                      f"(after / before {rps['after'] / rps['before']:.2f}). Client and server share the 2 cores.")
    fuzz_rows = []
    for side in sides:
        f = results[side]["fuzz"]
        fuzz_rows.append([side, f["requests"], json.dumps(f["statuses"]), f["5xx"], json.dumps(f["5xx_by_kind"]) or "-",
                          f["hangs"], f["closed_without_answer"], f"{f['valid_ok']}/{f['valid_ok'] + f['valid_wrong']}",
                          results[side]["alive_after_fuzz"]])
    report.table(f"Fuzz: {len(corpus)} hostile requests from {args.clients} concurrent clients, each followed by a valid one",
                 ["code", "hostile", "statuses", "5xx", "5xx by kind", f"hangs (> {HANG_AFTER:g} s)",
                  "closed without answer", "valid answers correct", "alive after"], fuzz_rows,
                 note="4 of the hostile clients hang up mid-body on purpose (not counted above); the after-server runs "
                      f"with --body-timeout {BODY_TIMEOUT:g} (default 10 s); the before-server has no body timeout.")
    report.write({"sides": {side: str(root) for side, root in sides.items()}, "settings": vars(args) | {
        "before": str(args.before), "body_timeout_s": BODY_TIMEOUT, "hang_after_s": HANG_AFTER},
        "results": results}, machine)


if __name__ == "__main__":
    main()
