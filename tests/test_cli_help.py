"""What the CLI shows a new user: switches shown as switches, usage lines naming arguments, a
version, one --provider default, one example per command, a progress display whose totals do not
jump or overshoot, a summary title on one line, and int8 that gains nothing said plainly."""

from __future__ import annotations

import importlib
import io

import pytest
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from cli.app import COMMANDS, app
from cli.grow import _COLUMNS, _Bars
from tinydeploy.export.quantize import int8_gain
from tinydeploy.serving.providers import DEFAULT_PROVIDER
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import Progress as GrowProgress

ARGUMENTS = {"export": "RUN_DIR", "verify": "DIRECTORY", "report": "DIRECTORY", "serve": "EXPORT_DIR",
             "predict": "EXPORT_DIR", "bench": "EXPORT_DIR", "grow": ""}


def cli(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=120)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_switches_arguments_and_an_example(command: str) -> None:
    shown = cli(command, "--help")
    assert shown.exit_code == 0, shown.stderr
    text = shown.stdout
    assert "<bool>" not in text and "{" not in text.split("\n\n")[0] + text.splitlines()[1]
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert usage.split("Usage:")[1].split() == ["tinydeploy", command, "[OPTIONS]", *ARGUMENTS[command].split()]
    assert f"Example: tinydeploy {command} " in " ".join(text.split())


def test_version_and_the_group_help() -> None:
    assert cli("--version").stdout == "tinydeploy 0.1.0\n"
    shown = cli("--help")
    assert "--version" in shown.stdout and "<bool>" not in shown.stdout


def test_every_provider_option_has_the_same_default() -> None:
    for module in {module for module, _ in COMMANDS.values()}:
        importlib.import_module(module)
    commands = {info.name or info.callback.__name__: info for info in app.registered_commands}
    defaults = {}
    for name in ("export", "verify", "serve", "predict", "bench"):
        command = cli_command(commands[name])
        defaults[name] = next(p.default for p in command.params if p.name == "provider")
    assert set(defaults.values()) == {DEFAULT_PROVIDER} == {"cpu"}, defaults


def cli_command(info):
    import typer

    return typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode="rich")


def _events(cfg: GrowConfig, stop: float) -> list[GrowProgress]:
    """What the job reports when growth stops early at epoch ``stop``, then trains ``final_epochs``."""
    grow = [GrowProgress("grow", e, cfg.max_growth_epochs + cfg.final_epochs, 1.0, 1.0, 0.5, "val accuracy", [2], 9)
            for e in (0.0, 0.25, stop)]
    final = [GrowProgress("final", stop + e + 0.004, stop + cfg.final_epochs, 1.0, 1.0, 0.5, "val accuracy", [2], 9)
             for e in range(1, int(cfg.final_epochs) + 1)]
    return grow + final


def test_progress_totals_do_not_jump_and_counts_do_not_overshoot() -> None:
    """Growth stops at epoch 17.43 of 40, then 60 final epochs: the final bar counts to exactly 60 of 60."""
    cfg = GrowConfig(max_growth_epochs=40, final_epochs=60)
    with Progress(*_COLUMNS, console=Console(file=io.StringIO()), auto_refresh=False) as bar:
        bars = _Bars(bar, cfg)
        seen = []
        for event in _events(cfg, 17.43):
            bars(event)
            seen.append([(t.description, t.total, t.completed) for t in bar.tasks])
        grow, final = bar.tasks
    growing = [state[0] for state in seen if state[0][0] == "growing"]
    assert {total for _, total, _ in growing} == {40}
    assert grow.description == "grown" and grow.completed == grow.total == pytest.approx(17.43)
    finals = [state[1] for state in seen if len(state) > 1]
    assert {total for _, total, _ in finals} == {60} and all(done <= 60 for _, _, done in finals)
    assert final.completed == 60


def test_the_summary_title_is_one_line(tmp_path) -> None:
    grown = CliRunner().invoke(app, ["grow", "--dataset", "moons", "--max-growth-epochs", "0.25", "--final-epochs",
                                     "0.25", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert grown.exit_code == 0, grown.stderr
    title = grown.stdout.splitlines()[0]
    assert title.startswith("grown moons network (tiny, stop: ") and title.endswith(")")


def test_int8_that_gains_nothing_says_so() -> None:
    report = {"size": {"fp32_bytes": 12800, "int8_bytes": 12300, "ratio": 12300 / 12800},
              "latency_p50_ms": {"threads": 1, "batch_1": {"fp32": 0.02, "int8": 0.03, "ratio": 1.5},
                                 "batch_256": {"fp32": 0.2, "int8": 0.25, "ratio": 1.25}}}
    gains, verdict = int8_gain(report)
    assert not gains and verdict.startswith("int8 gains nothing on this model (12.0 KB vs 12.5 KB, median latency "
                                            "1.50x fp32 at batch 1, 1.25x fp32 at batch 256): serve model.onnx")
    report["size"].update(int8_bytes=3200, ratio=0.25)
    assert int8_gain(report) == (True, "int8 is smaller (3.1 KB vs 12.5 KB, median latency 1.50x fp32 at batch 1, "
                                       "1.25x fp32 at batch 256)")
    report["latency_p50_ms"]["batch_256"]["ratio"] = 0.5
    assert int8_gain(report)[1].startswith("int8 is smaller and faster at batch 256")

