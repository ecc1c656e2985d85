"""Small helpers shared by the benchmark scripts: results directory, tables, atomic writes, plots.

Every script writes ``benchmarks/results/<name>.json`` (all raw measurements), ``<name>.md``
(the tables it printed) and, where it plots, ``<name>*.png``. Writes go through
``tinydeploy.atomic`` so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tinydeploy.atomic import atomic_path, write_json, write_text

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def results_path(name: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / name


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (the CPU is shared with other users: say so in reports)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "tinydeploy_source": source_info(),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def source_info() -> dict[str, Any]:
    """Which tinydeploy code produced the numbers: the imported package's path, a sha256 over its
    .py files, and (read-only git queries) the checkout's HEAD and its uncommitted library files.

    The library is edited concurrently, so results must say which version they measured."""
    import hashlib
    import subprocess

    import tinydeploy

    package = Path(tinydeploy.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {"package_dir": str(package), "sources_sha256": digest.hexdigest(),
                            "version": getattr(tinydeploy, "__version__", None)}
    snapshot = package.parent / "SNAPSHOT_OF"
    if snapshot.is_file():
        info["snapshot_of"] = snapshot.read_text().strip()
    repo = BENCH_DIR.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    info["checkout_head"] = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "tinydeploy")
    info["checkout_uncommitted_library_files"] = dirty.splitlines() if dirty else []
    return info


def snapshot(ref: str, into: Path, paths: tuple[str, ...] = ("tinydeploy",)) -> Path:
    """The package (and other ``paths``) at git ``ref`` extracted under ``into`` (git archive; the
    checkout is not touched)."""
    import subprocess
    import tarfile

    archive = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "archive", ref, *paths], capture_output=True,
                             check=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as handle:
        handle.extractall(into, filter="data")
    sha = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "rev-parse", ref], capture_output=True, text=True,
                         check=True).stdout.strip()
    (into / "SNAPSHOT_OF").write_text(f"{ref} {sha}\n")
    return into


def thread_kwargs(threads: int) -> dict[str, int]:
    """``threads=`` for GrowConfig when this tinydeploy version has the field (pins the job's CPU threads)."""
    from tinydeploy.training.config import GrowConfig

    return {"threads": threads} if "threads" in GrowConfig.__dataclass_fields__ else {}


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(values: Iterable[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values * scale``."""
    m, s = mean_std(v * scale for v in values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (every cell converted with ``str``)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width table for the terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


class Report:
    """Collects titled tables and notes; prints each table as it is added; writes JSON + Markdown."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.sections: list[str] = []
        self.started = time.perf_counter()

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        print(f"\n== {title} ==")
        print(text_table(headers, rows))
        if note:
            print(note)
        self.sections.append(f"### {title}\n\n{md_table(headers, rows)}\n" + (f"\n{note}\n" if note else ""))

    def note(self, text: str) -> None:
        print(text)
        self.sections.append(text + "\n")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self, data: dict[str, Any], machine: dict[str, Any]) -> None:
        """Write ``<name>.json`` (``data`` + machine + wall time) and ``<name>.md`` (the tables)."""
        doc = {"benchmark": self.name, "machine": machine, "script_wall_time_s": self.elapsed, **data}
        write_json(results_path(f"{self.name}.json"), doc)
        src = machine.get("tinydeploy_source", {})
        code = (f"tinydeploy {src.get('version')} from `{src.get('package_dir')}`"
                + (f" (snapshot of {src['snapshot_of']})" if src.get("snapshot_of") else "")
                + f", sources sha256 {str(src.get('sources_sha256'))[:12]}")
        header = (f"## {self.title}\n\nCommand: `{machine['command']}`  \nCode: {code}  \n"
                  f"Date (UTC): {machine['utc']}  \nMachine: {machine['cpu']}, {machine['cpu_count']} cores "
                  f"(shared with other users; load average at start {fmt_load(machine)}), torch {machine['torch']}, "
                  f"{machine['torch_threads']} torch thread(s)  \nScript wall time: {self.elapsed:.0f} s\n")
        write_text(results_path(f"{self.name}.md"), header + "\n" + "\n".join(self.sections))
        print(f"\nwrote {results_path(self.name + '.json')} and {results_path(self.name + '.md')} "
              f"({self.elapsed:.0f} s)")


def fmt_load(machine: dict[str, Any]) -> str:
    load = machine.get("load_average_at_start")
    return "n/a" if not load else ", ".join(f"{v:.1f}" for v in load)


def save_figure(fig: Any, name: str) -> Path:
    """Save a matplotlib figure atomically under results/ and close it."""
    import matplotlib.pyplot as plt

    path = results_path(name)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_point(ax: Any, records: Sequence[dict[str, Any]], label: str, color: str, marker: str,
                   hollow: bool = False) -> None:
    """One label's test accuracy against parameters: mean ± std over seeds, and each seed faintly."""
    pm, ps = mean_std(r["params"] for r in records)
    am, ast = mean_std(100 * r["test_accuracy"] for r in records)
    ax.errorbar(pm, am, xerr=ps, yerr=ast, fmt=marker, color=color, capsize=3, label=label,
                markerfacecolor="none" if hollow else color, markersize=8)
    ax.scatter([r["params"] for r in records], [100 * r["test_accuracy"] for r in records], s=8, color=color,
               alpha=0.4)


def params_axes(ax: Any, ylabel: str, title: str, log_y: bool = False) -> None:
    """A panel against parameters: log x axis (no minor labels), grid, labels."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("parameters (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
