"""Width report: where the network grew, what each layer costs, and how it compares.

Per weight layer (hidden, output, or a conv1d/conv2d block): kind, fan-in (channels in for a conv),
kernel and stride, initial and final width (channels out), neurons/channels added and at which growth
steps, parameters, multiply-accumulates per sample, share of all parameters and the last measured
bottleneck Psi. Totals for the grown net, the initial net and, when the run trained one, a
reference fixed-width net. Written as width_report.json / .md / .png.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tinydeploy.atomic import write_json, write_text
from tinydeploy.errors import TinyDeployError
from tinydeploy.model.scores import score_names
from tinydeploy.model.spec import ArchSpec
from tinydeploy.serving.manifest import read_file

REPORT_JSON = "width_report.json"
REPORT_MD = "width_report.md"
REPORT_PNG = "width_report.png"
REPORT_FORMAT = "tinydeploy.width_report/1"


# ----- building ------------------------------------------------------------------------------------
def _layer_costs(spec: ArchSpec, index: int) -> dict[str, int]:
    return {"width": spec.width(index), "params": spec.layer_params(index), "macs": spec.layer_macs(index)}


def _kind(spec: ArchSpec, index: int, hidden: int | None) -> str:
    layer = spec.layers[index]
    if layer["kind"] == "conv":
        return f"conv{layer['dims']}d"
    if layer["kind"] == "resblock":
        return "resblock"
    return "hidden" if hidden is not None else "output"


def _following_activation(spec: ArchSpec, index: int) -> str | None:
    if spec.layers[index]["kind"] == "resblock":
        return spec.layers[index]["activation"]
    following = spec.layers[index + 1] if index + 1 < len(spec.layers) else {}
    return following.get("name") if following.get("kind") == "activation" else None


def _net_totals(spec: ArchSpec) -> dict[str, Any]:
    """Widths, parameters (``deployed_params``: after folding every BatchNorm into its convolution) and MACs."""
    return {"hidden_widths": spec.hidden_widths, "params": spec.n_params(),
            "deployed_params": spec.n_params(folded=True), "macs": spec.macs()}


def _last_psi(metrics: dict[str, Any], log: list[dict[str, Any]], hidden: int) -> float | None:
    """Psi of hidden layer ``hidden``: metrics' final_bottleneck, else the last growth event measuring it."""
    final = metrics.get("final_bottleneck")
    if isinstance(final, list) and hidden < len(final) and final[hidden] is not None:
        return float(final[hidden])
    for event in reversed(log):
        value = event.get("psi_after")
        if isinstance(value, list) and hidden < len(value):
            return float(value[hidden])
        if isinstance(value, (int, float)) and event.get("hidden_index") == hidden:
            return float(value)
    return None


def _metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "mse"


def build_width_report(spec: ArchSpec, growth_log: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The width report of a run; raises if the growth log does not add up to the final widths."""
    final_widths = spec.hidden_widths
    initial_widths = [int(w) for w in metrics.get("initial_widths", final_widths)]
    if len(initial_widths) != len(final_widths):
        raise TinyDeployError(
            f"metrics.json lists {len(initial_widths)} initial widths for {len(final_widths)} hidden layers"
        )
    initial_spec = spec.with_hidden_widths(initial_widths)
    reference = metrics.get("reference")
    reference_spec = None
    if reference and len(reference.get("widths", [])) == len(final_widths):
        reference_spec = spec.with_hidden_widths([int(w) for w in reference["widths"]])
    total = spec.n_params()
    metric = _metric_name(spec.task)
    layers = []
    for index in spec.weight_indices:
        hidden = spec.growable_indices.index(index) if index in spec.growable_indices else None
        costs = _layer_costs(spec, index)
        events = [e for e in growth_log if hidden is not None and e.get("hidden_index") == hidden]
        added = sum(int(e.get("neurons_added", 0)) for e in events)
        initial = _layer_costs(initial_spec, index)
        if initial["width"] + added != costs["width"]:
            raise TinyDeployError(
                f"growth_log.jsonl adds {added} neurons to hidden layer {hidden} but metrics.json says it grew "
                f"from {initial['width']} to {costs['width']}: the run directory is inconsistent"
            )
        layer = spec.layers[index]
        conv = layer["kind"] in ("conv", "resblock")
        tensors = spec.layer_tensors(index)
        weight_name = f"{index}.conv1.weight" if layer["kind"] == "resblock" else f"{index}.weight"
        layers.append({
            "name": str(index),
            "module_index": index,
            "hidden_index": hidden,
            "kind": _kind(spec, index, hidden),
            "activation": _following_activation(spec, index),
            "fan_in": spec.in_channels(index) if conv else spec.in_features(index),
            "kernel": layer.get("kernel", 3) if conv else None,
            "stride": layer["stride"] if conv else None,
            "padding": layer.get("padding", 1) if conv else None,
            "weight_shape": tensors[weight_name],
            "tensors": tensors,
            "deployed_tensors": spec.layer_tensors(index, folded=True),
            "initial_width": initial["width"],
            "final_width": costs["width"],
            "neurons_added": added,
            "growth_steps": [e.get("step") for e in events],
            "params": costs["params"],
            "macs": costs["macs"],
            "param_share": costs["params"] / total,
            "bottleneck_psi": _last_psi(metrics, growth_log, hidden) if hidden is not None else None,
            "initial": initial,
            "reference": _layer_costs(reference_spec, index) if reference_spec else None,
        })
    test_metrics = metrics.get("metrics", {}).get("test", {})
    scores = score_names(spec.task)
    totals: dict[str, Any] = {
        "final": {**_net_totals(spec), **{f"test_{name}": test_metrics.get(name) for name in scores}},
        "initial": _net_totals(initial_spec),
        "reference": None,
    }
    if reference:
        ref_totals = _net_totals(reference_spec) if reference_spec else {"hidden_widths": reference.get("widths")}
        totals["reference"] = {**ref_totals, "params": reference.get("params", ref_totals.get("params")),
                               f"test_{metric}": reference.get(f"test_{metric}")}
    # one entry per growth step (a step may grow several layers: its last event holds the widths after it)
    by_step = {e.get("step"): {"step": e.get("step"), "widths": e.get("widths"), "params": e.get("params")} for e in growth_log}
    steps = [{"step": 0, "widths": initial_widths, "params": initial_spec.n_params()}, *by_step.values()]
    history = [
        {"epoch": h.get("epoch"), "params": h.get("params"), f"val_{metric}": h.get(f"val_{metric}")}
        for h in metrics.get("history", [])
    ]
    return {
        "format": REPORT_FORMAT,
        "dataset": metrics.get("dataset", spec.dataset),
        "task": spec.task,
        "metric": metric,
        "scores": list(scores),
        "layers": layers,
        "totals": totals,
        "growth_steps": steps,
        "history": history,
        "checked_against": None,
    }


def add_latency(report: dict[str, Any], spec: ArchSpec, per_module: dict[str, dict[str, float]], source: str) -> None:
    """Add per-layer latency to ``report``: for each weight layer and batch size (``per_module``: batch ->
    top-level module -> microseconds per run, ``tinydeploy.export.profile.layer_latency``), the time of
    its module and of the channel-wise modules after it up to the next weight layer (the optimiser fuses
    a conv with its ReLU into one kernel, named after the ReLU)."""
    weights = spec.weight_indices
    for layer in report["layers"]:
        start = layer["module_index"]
        end = next((j for j in weights if j > start), len(spec.layers))
        layer["latency_us"] = {batch: sum(v for k, v in modules.items() if k.isdigit() and start <= int(k) < end)
                               for batch, modules in per_module.items()}
    report["latency"] = {"source": source, "per_module_us": per_module}


def check_widths(report: dict[str, Any], shapes: dict[str, list[int]], source: str, folded: bool = False) -> None:
    """Raise unless every layer's tensors (width, fan-in; a block's convolutions; the BatchNorms after a
    layer unless ``folded``, that is folded into it at export) match the shapes stored in ``source``."""
    stored_params = 0
    for layer in report["layers"]:
        weight = layer.get("weight_shape") or [layer["final_width"], layer["fan_in"]]
        expected = layer.get("deployed_tensors" if folded else "tensors") or {
            f"{layer['name']}.weight": list(weight), f"{layer['name']}.bias": [layer["final_width"]]}
        for name, shape in expected.items():
            if shapes.get(name) != shape:
                raise TinyDeployError(
                    f"width report does not match {source}: {name} should have shape {shape} but has "
                    f"{shapes.get(name, 'no such tensor')}"
                )
            stored_params += math.prod(shape)
    final = report["totals"]["final"]
    reported = final.get("deployed_params", final["params"]) if folded else final["params"]
    if stored_params != reported:
        raise TinyDeployError(
            f"width report does not match {source}: {stored_params} weights stored, {reported} reported"
        )
    report["checked_against"] = source


# ----- rendering ---------------------------------------------------------------------------------------
_COLUMNS = ("layer", "kind", "fan-in", "initial", "final", "added", "grown at steps", "params", "MACs", "share", "Psi")
#: CNN reports: channels in, and each conv's kernel/stride (k x k / s) in a last column.
_CNN_COLUMNS = ("layer", "kind", "in", "initial", "final", "added", "grown at steps", "params", "MACs", "share", "Psi",
                "kernel/stride")


def _has_convs(report: dict[str, Any]) -> bool:
    return any(layer.get("kernel") is not None for layer in report["layers"])


def _columns(report: dict[str, Any]) -> tuple[str, ...]:
    return _CNN_COLUMNS if _has_convs(report) else _COLUMNS


def _ranges(steps: list[int]) -> str:
    """Sorted step numbers as compact ranges: [1, 2, 3, 5] -> "1-3,5"."""
    parts: list[list[int]] = []
    for step in sorted(set(steps)):
        if parts and step == parts[-1][1] + 1:
            parts[-1][1] = step
        else:
            parts.append([step, step])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    convs = _has_convs(report)
    for layer in report["layers"]:
        psi = layer["bottleneck_psi"]
        steps = _ranges(layer["growth_steps"]) or "-"
        row = [
            layer["name"], layer["kind"], str(layer["fan_in"]), str(layer["initial_width"]),
            str(layer["final_width"]), f"+{layer['neurons_added']}", steps, f"{layer['params']:,}",
            f"{layer['macs']:,}", f"{layer['param_share']:.1%}", "-" if psi is None else f"{psi:.3g}",
        ]
        if convs:
            kernel = layer.get("kernel")
            row.append("-" if kernel is None else f"{kernel} / {layer['stride']}")
        rows.append(row)
    return rows


def _report_scores(report: dict[str, Any]) -> list[str]:
    """The test scores a report shows (reports written before RMSE/MAE/R^2 existed show their one metric)."""
    return list(report.get("scores") or [report["metric"]])


def _total_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in ("final", "initial", "reference"):
        net = report["totals"].get(name)
        if not net:
            continue
        values = [net.get(f"test_{score}") for score in _report_scores(report)]
        params, macs = net.get("params"), net.get("macs")
        rows.append([
            name, str(net.get("hidden_widths")), "-" if params is None else f"{params:,}",
            "-" if macs is None else f"{macs:,}", *("-" if value is None else f"{value:.4g}" for value in values),
        ])
    return rows


def _text_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [list(header), *rows]]
    return "\n".join(lines)


def _md_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _total_header(report: dict[str, Any]) -> list[str]:
    return ["net", "widths" if _has_convs(report) else "hidden widths", "params", "MACs",
            *(f"test {score}" for score in _report_scores(report))]


def render_markdown(report: dict[str, Any]) -> str:
    checked = report.get("checked_against")
    return "\n\n".join([
        f"# Width report: {report['dataset']} ({report['task']})",
        _md_table(_columns(report), _rows(report)),
        _md_table(_total_header(report), _total_rows(report)),
        f"Widths checked against {checked}." if checked else "Widths not checked against an exported file.",
        *_latency_md(report),
    ]) + "\n"


def _latency_md(report: dict[str, Any]) -> list[str]:
    """The per-layer latency table, when the report has one."""
    latency = report.get("latency")
    if not latency:
        return []
    batches = list(latency["per_module_us"])
    rows = [[layer["name"], layer["kind"], *(f"{layer['latency_us'][b]:,.1f}" for b in batches)]
            for layer in report["layers"]]
    return [f"Latency per layer, microseconds per run ({latency['source']}):",
            _md_table(["layer", "kind", *(b.replace("_", " ") for b in batches)], rows)]


def render_text(report: dict[str, Any]) -> str:
    return "\n\n".join([
        f"Width report: {report['dataset']} ({report['task']})",
        _text_table(_columns(report), _rows(report)),
        _text_table(_total_header(report), _total_rows(report)),
    ])


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """PNG: hidden widths over growth steps, and validation metric against parameters over training."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    widths_ax, metric_ax = figure.subplots(1, 2)
    steps = report["growth_steps"]
    x = [step["step"] for step in steps]
    for layer in (layer for layer in report["layers"] if layer["hidden_index"] is not None):
        widths = [step["widths"][layer["hidden_index"]] for step in steps]
        name = layer["kind"] if layer["kind"] != "hidden" else "hidden"
        widths_ax.step(x, widths, where="post", marker="o", label=f"{name} {layer['hidden_index']} (module {layer['name']})")
    widths_ax.set(xlabel="growth step", ylabel="width", title="Width per growable layer")
    widths_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    widths_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    widths_ax.legend(fontsize=8)
    metric = report["metric"]
    points = [(h["params"], h[f"val_{metric}"]) for h in report["history"] if h["params"] and h[f"val_{metric}"] is not None]
    if points:
        metric_ax.plot(*zip(*points), marker=".", label=f"grown net (val {metric})")
    params = [p for p, _ in points] + [report["totals"]["final"]["params"]]
    for name, style in (("final", "o"), ("reference", "*")):
        net = report["totals"].get(name)
        if net and net.get("params") and net.get(f"test_{metric}") is not None:
            metric_ax.plot([net["params"]], [net[f"test_{metric}"]], style, markersize=10, label=f"{name} (test {metric})")
            params.append(net["params"])
    metric_ax.set(xlabel="parameters", ylabel=metric, title=f"{metric} against parameters")
    if max(params) > 20 * min(params):
        metric_ax.set_xscale("log")
    metric_ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def write_width_report(directory: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write width_report.json, .md and .png into ``directory``."""
    directory = Path(directory)
    write_json(directory / REPORT_JSON, report)
    write_text(directory / REPORT_MD, render_markdown(report))
    plot_report(report, directory / REPORT_PNG)


def report_table(directory: str | os.PathLike[str]) -> str:
    """The width report of an export directory (its width_report.json) or of a run directory, as text."""
    directory = Path(directory)
    if (directory / REPORT_JSON).is_file():
        try:  # untrusted like the rest of the directory: no links followed, anything malformed is one line
            return render_text(json.loads(read_file(directory, REPORT_JSON, 1 << 26).decode("utf-8")))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):
            raise TinyDeployError(f"{directory / REPORT_JSON} is malformed: re-run 'tinydeploy export'") from None
    elif (directory / "checkpoints.jsonl").is_file() or (
        (directory / "metrics.json").is_file() and (directory / "model.safetensors").is_file()
    ):
        from tinydeploy.training.rundir import read_run  # torch: only for a run directory

        run = read_run(directory)
        report = build_width_report(run.spec, run.growth_log, run.metrics)
    elif not directory.is_dir():
        raise TinyDeployError(f"{directory} does not exist: pass an export directory or a run directory")
    else:
        raise TinyDeployError(
            f"{directory} has no {REPORT_JSON} and is not a run directory: pass an export directory or a run directory"
        )
    return render_text(report)
