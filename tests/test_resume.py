"""Exact resume: a grow killed (SIGKILL, in a real process) during training, during a growth step, in the
middle of a checkpoint write or of a log line, or stopped by SIGTERM, and resumed, ends with exactly the
weights, widths, metrics and logs of the uninterrupted run; after every kill the run directory reads as
one whole generation; ``--resume``'s one-line errors."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import process_helpers
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.data import apply_standardizer, load_dataset
from tinydeploy.export.width_report import report_table
from tinydeploy.model.losses import per_sample_loss
from tinydeploy.training.checkpoint import restore_rng, rng_state
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import prepare_resume, run_grow
from tinydeploy.training.rundir import COMMIT_LOG, Run, read_checkpoint, read_commits, read_run
from tinydeploy.training.trainer import evaluate

#: checkpoint_every 0: a timed checkpoint after every slice of training, the final phase included.
CFG = {"device": "cpu", "max_params": 600, "max_growth_epochs": 1.5, "final_epochs": 3.0, "checkpoint_every": 0.0}
#: (crash point, resume?) applied one after the other to the same run: each resume is killed again.
CHAIN = [
    ("grow:3", False),  # inside the third growth step
    ("generation-written:3", True),  # a checkpoint file written, its commit line not yet
    ("append:2", True),  # half a line of a log
    ("slice:3:TERM", True),  # SIGTERM (pre-emption notice): stops at the next boundary, status interrupted
    ("slice:2", True),  # during training in the final phase
    ("commit-line:2", True),  # half a commit line
    ("committed:2", True),  # after a commit, before old generations are removed
]
WALL_CLOCK = ("wall_time_s", "command")


def assert_one_generation(run: Run) -> None:
    """Weights, spec, metrics, growth log and history all belong to the same step."""
    m = run.metrics
    assert run.spec.hidden_widths == m["final_widths"] and run.spec.n_params() == m["params"]
    assert len(run.growth_log) == m["growth_events"]
    if run.growth_log:
        assert run.growth_log[-1]["widths"] == m["final_widths"]
    if m["history"]:
        assert m["history"][-1]["epoch"] <= m["epochs"] and m["history"][-1]["widths"] == m["final_widths"]
    data = load_dataset("digits")
    X = torch.from_numpy(apply_standardizer(data.X_val, run.spec.preprocessing))
    loss, accuracy = evaluate(run.model, X, torch.from_numpy(data.y_val), per_sample_loss("classification"),
                              "classification")
    assert (loss, accuracy) == (m["metrics"]["val"]["loss"], m["metrics"]["val"]["accuracy"])  # the same weights


def assert_same_run(a: Path, b: Path) -> None:
    run_a, run_b = read_run(a), read_run(b)
    state_a, state_b = run_a.model.state_dict(), run_b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert max(float((state_a[k] - state_b[k]).abs().max()) for k in state_a) == 0.0
    assert run_a.growth_log == run_b.growth_log
    strip = lambda m: {k: v for k, v in m.items() if k not in WALL_CLOCK}  # noqa: E731
    assert strip(run_a.metrics) == strip(run_b.metrics)
    for name in ("metrics.json", "growth_log.jsonl", "history.jsonl", "arch.json"):
        text_a, text_b = ((d / name).read_text() for d in (a, b))
        if name == "metrics.json":
            text_a, text_b = (json.dumps(strip(json.loads(t))) for t in (text_a, text_b))
        assert text_a == text_b, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    run_grow(GrowConfig(**CFG), out)
    return out


def test_killed_runs_resume_to_exactly_the_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "killed"
    generations = []
    for crash, resume in CHAIN:
        process = process_helpers.start(process_helpers.grow, CFG, str(out), crash, resume)
        code = process_helpers.join_all([process])[0]
        run = read_run(out)
        if crash.endswith(":TERM"):
            assert code == 0 and run.status == "interrupted", crash
        else:
            assert code == -signal.SIGKILL and run.status == "running", (crash, code)
        assert_one_generation(run)
        assert str(run.spec.hidden_widths[0]) in report_table(out)  # `tinydeploy report` reads a killed run
        generations.append(run.generation)
    assert generations == sorted(generations) and len(set(generations)) > 4
    assert read_run(out).metrics["phase"] == "final"  # the final phase was killed and checkpointed too
    result = CliRunner().invoke(app, ["grow", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(reference, out)
    assert len(list((out / "checkpoints").iterdir())) <= 3  # current, previous and the last durable one


def _bad_resumes(tmp: Path, reference: Path) -> list[tuple[list[str], str]]:
    stopped = tmp / "stopped"
    shutil.copytree(reference, stopped)
    commits = (stopped / COMMIT_LOG).read_text().splitlines()
    (stopped / COMMIT_LOG).write_text("\n".join(commits[:-1]) + "\n")  # as if it had stopped before the end
    old = tmp / "old"
    shutil.copytree(stopped, old)
    (old / COMMIT_LOG).write_text((old / COMMIT_LOG).read_text().replace('"tinydeploy-run/1"', '"tinydeploy-run/0"'))
    (tmp / "empty").mkdir()
    return [
        (["--resume", str(reference)], f"--resume {reference}: the run is already complete; export it with"),
        (["--resume", str(tmp / "empty")], f"--resume {tmp / 'empty'}: not a resumable tinydeploy run (no {COMMIT_LOG})"),
        (["--resume", str(tmp / "nowhere")], f"--resume {tmp / 'nowhere'}: no such directory"),
        (["--resume", str(old)], f"{old} holds a run in format 'tinydeploy-run/0'; this tinydeploy (0.1.0) reads "
                                 "'tinydeploy-run/1': use the version that wrote it, or start a new run"),
        (["--resume", str(stopped), "--max-params", "900", "--seed", "0", "--lr", "0.01"],
         "--max-params 900 (the run has 600); --lr 0.01 (the run has 0.003) contradict(s) the saved run: drop the "
         "option(s) to resume, or start a new run"),
        (["--resume", str(stopped), "--out", str(tmp / "x")], "--resume continues the run in its own directory: drop --out"),
        (["--resume", str(stopped), "--checkpoint-every", "-1"], "--checkpoint-every is in minutes and must be >= 0"),
    ]


def test_bad_resumes_fail_with_one_line(tmp_path, reference):
    before = (reference / COMMIT_LOG).read_bytes()
    for args, message in _bad_resumes(tmp_path, reference):
        result = CliRunner().invoke(app, ["grow", *args])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
        assert lines[0].startswith("error: ") and message in lines[0], (args, lines[0])
    assert (reference / COMMIT_LOG).read_bytes() == before
    assert len(read_commits(tmp_path / "stopped")) == len(before.splitlines()) - 1  # refused resumes wrote nothing


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, reference):
    """As after a power loss that kept a commit line but not its file's data: readers and --resume use
    the generation before (with its own log lengths), and the resumed run still ends identical."""
    out = tmp_path / "damaged"
    process = process_helpers.start(process_helpers.grow, CFG, str(out), "grow:4", False)
    assert process_helpers.join_all([process]) == [-signal.SIGKILL]
    commits = read_commits(out)
    last = out / commits[-1]["file"]
    last.write_bytes(last.read_bytes()[:100])
    ckpt = read_checkpoint(out, resume=True)
    assert ckpt.commit["generation"] == commits[-2]["generation"] and "cannot be read" in ckpt.notices[0]
    assert read_run(out).generation == commits[-2]["generation"]
    job = prepare_resume(out)
    assert any("resumed from generation" in n for n in job.notices)
    job.run()
    assert_same_run(reference, out)


def test_every_random_generator_round_trips():
    generator = torch.Generator().manual_seed(5)
    random.seed(3), np.random.seed(4), torch.manual_seed(6)
    tensors, state = rng_state({"g": generator})
    json.dumps(state)  # the non-tensor part is JSON
    draw = lambda: (random.random(), float(np.random.randn()), torch.randn(2, generator=generator).tolist(),  # noqa: E731
                    torch.rand(1).item())
    first = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    restore_rng({"g": generator}, tensors, state)
    assert draw() == first
