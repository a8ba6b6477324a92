"""A bench run's report: markdown tables, plots, and several runs compared side by side."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..jsonl import write_json
from .metrics import REFERENCE, BenchError

RESULTS_JSON_NAME = "results.json"
RESULTS_MD_NAME = "results.md"
# What tables and plots call the two plain modes; the others go by their labels.
MODE_NAMES = {REFERENCE: "plain, stock Transformers", "ar": "plain, hf_fastmtp kernels"}


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- reports


def write_reports(results: dict, output_dir: Path) -> list[Path]:
    """results.json, results.md and the plots; returns the paths written."""
    write_json(output_dir / RESULTS_JSON_NAME, results)
    (output_dir / RESULTS_MD_NAME).write_text(render_markdown(results), encoding="utf-8")
    return [output_dir / RESULTS_JSON_NAME, output_dir / RESULTS_MD_NAME, *write_plots(results, output_dir)]


def render_markdown(results: dict) -> str:
    settings, model = results["settings"], results["settings"]["model"]
    per_category = "all" if settings["per_category"] is None else settings["per_category"]
    sections = [
        "# fastmtp bench",
        (
            f"Greedy, batch 1, at most {settings['max_new_tokens']} new tokens; {model['base'] or 'unnamed base'} "
            f"(head {model['head_sha256']}, {model['dtype']}); questions {settings['questions']}, "
            f"{per_category} per category."
        ),
        summary_table(results),
        (
            f"Speedup: {reference_name(results)}'s total seconds over the mode's, on the same prompts. tok/s: total "
            "new tokens over total seconds. tau: tokens per verification pass."
        ),
    ]
    if any(entry["overall"].get("tau") is not None for entry in results["by_mode"].values()):
        sections += ["## Acceptance by draft position (cumulative / conditional)", acceptance_table(results)]
    if results.get("forward_ms"):
        sections += ["## Verification cost on this hardware", verification_cost_table(results["forward_ms"])]
    sections += [lossless_line(results), hardware_line(results["hardware"])]
    return "\n\n".join(sections) + "\n"


def mode_name(mode: str) -> str:
    """A mode as tables and plots show it: the plain modes by what they run, the others by their labels."""
    return MODE_NAMES.get(mode, mode)


def reference_name(results: dict) -> str:
    """The mode the speedups are over, named and labelled: "plain, stock Transformers (`ar-stock`)"."""
    return f"{mode_name(results['reference'])} (`{results['reference']}`)"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table, readable in a terminal too."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """Rows: categories and overall; columns: speedup (but the reference's), tau (FastMTP) and tok/s of each mode."""
    columns = []  # (mode, metric)
    for mode in results["modes"]:
        entry = results["by_mode"][mode]
        if mode != results["reference"]:
            columns.append((mode, "speedup"))
        if entry["overall"].get("tau") is not None:
            columns.append((mode, "tau"))
        columns.append((mode, "tokens_per_second"))
    names = {"speedup": "speedup", "tau": "tau", "tokens_per_second": "tok/s"}
    header = ["category", *(f"{mode_name(mode)} {names[metric]}" for mode, metric in columns)]
    rows = []
    for category in [*results["categories"], "overall"]:
        cells = [category]
        for mode, metric in columns:
            entry = results["by_mode"][mode]
            summary = entry["overall"] if category == "overall" else entry["categories"].get(category, {})
            cells.append(_format(metric, summary.get(metric)))
        rows.append(cells)
    return format_table(header, rows)


def acceptance_table(results: dict) -> str:
    fastmtp = {
        mode: entry["overall"] for mode, entry in results["by_mode"].items() if entry["overall"].get("tau") is not None
    }
    positions = max(len(summary["acceptance_cumulative"]) for summary in fastmtp.values())
    with_lookup = any(summary.get("lookup_cycles") for summary in fastmtp.values())
    header = ["mode", "tau", "cycles", "draft ms/step", *(f"k={k}" for k in range(1, positions + 1))]
    if with_lookup:  # the positions are the head's own cycles'
        header.append("lookup cycles: drafts accepted")
    rows = []
    for mode, summary in fastmtp.items():
        row = [
            mode,
            _format("tau", summary["tau"]),
            str(summary["cycles"]),
            "-" if summary.get("draft_ms_per_step") is None else f"{summary['draft_ms_per_step']:.1f}",
            *(
                f"{_percent(cumulative)} / {_percent(conditional)}"
                for cumulative, conditional in zip(summary["acceptance_cumulative"], summary["acceptance_conditional"])
            ),
            *[""] * (positions - len(summary["acceptance_cumulative"])),
        ]
        if with_lookup:
            row.append(lookup_cell(summary))
        rows.append(row)
    return format_table(header, rows)


def lookup_cell(summary: dict) -> str:
    """How many cycles drafted by prompt lookup, and the share of their drafts the model accepted."""
    if not summary.get("lookup_cycles"):
        return "-"
    accepted = summary["lookup_accepted"] / summary["lookup_drafted"]
    return f"{summary['lookup_cycles']}: {_percent(accepted)} of {summary['lookup_drafted']}"


def verification_cost_table(forward_ms: dict) -> str:
    """One base forward over n new tokens: verifying K drafts costs the n = K + 1 column, a plain step n = 1."""
    stock = {int(n): ms for n, ms in forward_ms["stock"].items()}  # (JSON keys are strings)
    chosen = {int(n): ms for n, ms in forward_ms["chosen"].items()}
    table = format_table(
        ["new tokens n", *map(str, chosen)],
        [
            ["ms, stock Transformers", *(f"{ms:.1f}" for ms in stock.values())],
            ["ms, calibrated kernels", *(f"{ms:.1f}" for ms in chosen.values())],
            ["x one stock token", *(f"{ms / stock[1]:.2f}x" for ms in chosen.values())],
        ],
    )
    return (
        f"{table}\n\nFrom this machine's calibration (`fastmtp calibrate`): best of repeated base-model forwards "
        "after a 256-token cache. A FastMTP cycle with K drafts costs one n = K + 1 forward plus K head steps and "
        "yields tau tokens; plain decoding costs one n = 1 forward per token."
    )


def lossless_line(results: dict) -> str:
    check, reference = results["lossless"], reference_name(results)
    if not check["compared"]:
        return f"**Lossless**: not checked (no outputs to compare with {reference})."
    if check["identical"]:
        return f"**Lossless**: yes, all {check['compared']} outputs are identical to {reference}."
    shown = check["mismatches"][:20]
    listed = "; ".join(
        f"question {m['question_id']} ({m['category']}, {m['mode']}, from token {m['first_difference']})"
        for m in shown
    )
    more = (
        f"; and {len(check['mismatches']) - len(shown)} more (see results.json)"
        if len(check["mismatches"]) > len(shown)
        else ""
    )
    counts = f"{len(check['mismatches'])} of {check['compared']} outputs differ from {reference}"
    return f"**Lossless**: NO, {counts}: {listed}{more}."


def hardware_line(hardware: dict) -> str:
    return (
        f"**Hardware**: {hardware['cpu']}, device {hardware['device']}, torch threads {hardware['threads']}, "
        f"torch {hardware['torch']}, transformers {hardware['transformers']}"
        + (f"; kernels: {hardware['kernels']}" if hardware.get("kernels") else "")
        + "."
    )


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return {"speedup": f"{value:.2f}x", "tau": f"{value:.2f}", "tokens_per_second": f"{value:.1f}"}[metric]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


# ---------------------------------------------------------------------------------------------- plots


def write_plots(results: dict, output_dir: Path) -> list[Path]:
    """The PNG plots that the results support; none, with a warning, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend state
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib).")
        return []
    plots = {"speedup.png": plot_speedup, "acceptance.png": plot_acceptance}
    plots.update({"k_sweep.png": plot_k_sweep, "vocab_sweep.png": plot_vocab_sweep})
    written = []
    for name, plot in plots.items():
        figure = Figure(figsize=(9, 4.5), layout="constrained")
        if plot(figure, results):
            figure.savefig(output_dir / name, dpi=120)
            written.append(output_dir / name)
    return written


def plot_speedup(figure, results: dict) -> bool:
    """Grouped bars: one group per category (and overall), one bar per mode."""
    modes = [mode for mode in results["modes"] if mode != results["reference"]]
    if not modes:
        return False
    groups = [*results["categories"], "overall"]
    axes = figure.subplots()
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        entry = results["by_mode"][mode]
        values = [
            (entry["overall"] if group == "overall" else entry["categories"].get(group, {})).get("speedup") or 0.0
            for group in groups
        ]
        offsets = [g + (index - (len(modes) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(offsets, values, width, label=mode_name(mode))
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylabel(f"speedup over {mode_name(results['reference'])}")
    axes.legend(fontsize="small")
    return True


def plot_acceptance(figure, results: dict) -> bool:
    """Cumulative and conditional acceptance by draft position, one line per FastMTP mode."""
    fastmtp = {m: e["overall"] for m, e in results["by_mode"].items() if e["overall"].get("tau") is not None}
    if not fastmtp:
        return False
    for axes, key in zip(figure.subplots(1, 2, sharey=True), ("acceptance_cumulative", "acceptance_conditional")):
        for mode, summary in fastmtp.items():
            values = [value if value is not None else float("nan") for value in summary[key]]
            axes.plot(range(1, len(values) + 1), values, marker="o", label=mode)
        axes.set_title(key.removeprefix("acceptance_"))
        axes.set_xlabel("draft position k")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_ylim(0, 1)
    figure.axes[0].set_ylabel("acceptance")
    figure.axes[0].legend(fontsize="small")
    return True


def plot_k_sweep(figure, results: dict) -> bool:
    """tau and tok/s against K, one line per draft vocabulary (and confidence threshold)."""
    # ("auto" has no place on a K axis: its K changes from cycle to cycle)
    lines = {
        name: fixed
        for name, points in _sweep(results, along="num_draft_tokens").items()
        if (fixed := [(k, summary) for k, summary in points if k != "auto"])
    }
    if not lines:
        return False
    for axes, metric in zip(figure.subplots(1, 2), ("tau", "tokens_per_second")):
        for name, points in lines.items():
            axes.plot([k for k, _ in points], [summary[metric] for _, summary in points], marker="o", label=name)
        axes.set_xlabel("K (drafts per cycle)")
        axes.set_ylabel("tau" if metric == "tau" else "tok/s")
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.axes[0].legend(fontsize="small")
    return True


def plot_vocab_sweep(figure, results: dict) -> bool:
    """tau, draft ms per head step and tok/s against the draft vocabulary (ordered by size), one line per K."""
    lines = _sweep(results, along="draft_vocab")
    if not lines:
        return False
    order = list(_vocab_sizes(results))
    metrics = {"tau": "tau", "draft_ms_per_step": "draft ms per head step", "tokens_per_second": "tok/s"}
    for axes, (metric, label) in zip(figure.subplots(1, 3), metrics.items()):
        for name, points in lines.items():
            points = sorted(points, key=lambda point: order.index(point[0]))
            axes.plot([order.index(v) for v, _ in points], [s[metric] for _, s in points], marker="o", label=name)
        axes.set_xticks(range(len(order)), [str(v) for v in order], rotation=30, ha="right")
        axes.set_xlabel("draft vocabulary")
        axes.set_ylabel(label)
        if metric != "tokens_per_second":  # from 1 token / 0 ms: small differences stay small
            top = max(summary[metric] for points in lines.values() for _, summary in points)
            axes.set_ylim(1.0 if metric == "tau" else 0.0, 1.15 * top)
    figure.axes[0].legend(fontsize="small")
    return True


SWEEP_NAMES = {
    "num_draft_tokens": "K={}",
    "draft_vocab": "vocab {}",
    "draft_confidence_threshold": "confidence {}",
    "prompt_lookup_num_tokens": "lookup {}",
}


def _sweep(results: dict, along: str) -> dict:
    """
    `{the other options, named: [(value of along, overall summary)]}` over the FastMTP modes, if `along` takes several
    values.
    """
    fastmtp = [entry for entry in results["by_mode"].values() if entry["method"] == "fastmtp"]
    if len({entry["options"][along] for entry in fastmtp}) < 2:
        return {}
    lines: dict = {}
    for entry in fastmtp:
        others = {key: value for key, value in entry["options"].items() if key != along}
        name = ", ".join(SWEEP_NAMES.get(key, key + " {}").format(value) for key, value in others.items())
        lines.setdefault(name, []).append((entry["options"][along], entry["overall"]))
    return lines


def _vocab_sizes(results: dict) -> dict:
    """`{draft vocabulary: mean size in the stats}`, small to large; sizes the stats do not give count as infinite."""
    sizes = {}
    for entry in results["by_mode"].values():
        if entry["method"] == "fastmtp":
            size = entry["overall"].get("mean_draft_vocab_size")
            sizes[entry["options"]["draft_vocab"]] = float("inf") if size is None else size
    return dict(sorted(sizes.items(), key=lambda item: (item[1], str(item[0]))))


# ---------------------------------------------------------------------------------------------- comparing runs


COMPARE_MD_NAME = "comparison.md"
COMPARE_PNG_NAME = "comparison.png"


def load_results(folder: str | os.PathLike) -> dict:
    """The results.json of a finished `fastmtp bench --output folder` run."""
    path = Path(folder) / RESULTS_JSON_NAME
    if not path.is_file():
        raise BenchError(f"{folder} has no {RESULTS_JSON_NAME}: run `fastmtp bench --output {folder}` first.")
    return json.loads(path.read_text(encoding="utf-8"))


def fastmtp_lines(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """
    `{label: FastMTP overall summaries with their options, by K}`; a run with several vocabularies, thresholds or
    lookup lengths gets a line for each.
    """
    lines: dict[str, list[dict]] = {}
    for label, results in runs.items():
        entries = [entry for entry in results["by_mode"].values() if entry["method"] == "fastmtp"]
        keys = {key for entry in entries for key in entry["options"]} - {"num_draft_tokens"}
        varying = [key for key in sorted(keys) if len({entry["options"].get(key) for entry in entries}) > 1]
        for entry in entries:
            named = [
                SWEEP_NAMES.get(key, key + " {}").format(entry["options"][key])
                for key in varying
                if key in entry["options"]
            ]
            name = f"{label} ({', '.join(named)})" if named else label
            lines.setdefault(name, []).append({**entry["overall"], **entry["options"]})
    return {
        name: sorted(points, key=lambda point: k_order(point["num_draft_tokens"])) for name, points in lines.items()
    }


def k_order(num_draft_tokens: int | str) -> tuple[int, int]:
    """Fixed Ks in order, then "auto"."""
    return (1, 0) if num_draft_tokens == "auto" else (0, num_draft_tokens)


def comparison_table(runs: dict[str, dict]) -> str:
    """
    One row per run (and vocabulary): tau and speedup (over the run's own reference) at each K, acceptance by position
    at the largest K.
    """
    lines = fastmtp_lines(runs)
    ks = sorted({point["num_draft_tokens"] for points in lines.values() for point in points}, key=k_order)
    header = ["run", *[f"K={k} {metric}" for k in ks for metric in ("tau", "speedup")], "acceptance at the largest K"]
    rows = []
    for name, points in lines.items():
        by_k = {point["num_draft_tokens"]: point for point in points}
        cells = [name]
        for k in ks:
            cells += (
                [_format("tau", by_k[k]["tau"]), _format("speedup", by_k[k]["speedup"])] if k in by_k else ["-"] * 2
            )
        cells.append(" / ".join(_percent(rate) for rate in points[-1]["acceptance_cumulative"]))
        rows.append(cells)
    return format_table(header, rows)


def plot_comparison(figure, runs: dict[str, dict]) -> bool:
    """tau against K, and cumulative acceptance by draft position at the largest K, one line per run."""
    lines = fastmtp_lines(runs)
    if not lines:
        return False
    tau_axes, acceptance_axes = figure.subplots(1, 2)
    for name, points in lines.items():
        fixed = [p for p in points if p["num_draft_tokens"] != "auto"]
        tau_axes.plot([p["num_draft_tokens"] for p in fixed], [p["tau"] for p in fixed], marker="o", label=name)
        rates = points[-1]["acceptance_cumulative"]
        acceptance_axes.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    tau_axes.set_xlabel("K (drafts per cycle)")
    tau_axes.set_ylabel("tau")
    acceptance_axes.set_xlabel("draft position k (at the largest K)")
    acceptance_axes.set_ylabel("P(drafts 1..k accepted)")
    for axes in (tau_axes, acceptance_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
    tau_axes.legend(fontsize="small")
    return True


def write_comparison(runs: dict[str, dict], output_dir: str | os.PathLike) -> list[Path]:
    """comparison.md (the table, and each run's settings) and comparison.png in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = [
        f"- {label}: head {results['settings']['head'] or 'shipped'}, "
        f"{results['by_mode'][results['reference']]['overall']['prompts']} prompts, "
        f"{results['settings']['max_new_tokens']} new tokens, speedups over {reference_name(results)}"
        for label, results in runs.items()
    ]
    text = "# FastMTP runs compared\n\n" + comparison_table(runs) + "\n\n" + "\n".join(settings) + "\n"
    (output_dir / COMPARE_MD_NAME).write_text(text, encoding="utf-8")
    written = [output_dir / COMPARE_MD_NAME]
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib).")
        return written
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    if plot_comparison(figure, runs):
        figure.savefig(output_dir / COMPARE_PNG_NAME, dpi=120)
        written.append(output_dir / COMPARE_PNG_NAME)
    return written


__all__ = [
    "RESULTS_JSON_NAME",
    "RESULTS_MD_NAME",
    "comparison_table",
    "format_table",
    "mode_name",
    "render_markdown",
    "write_comparison",
    "write_reports",
]
