"""Evaluation reports: results.json, a Markdown table and two plots, from `summarize` rows.

    rows = summarize(outcomes, models)                 # lcflow.eval.harness
    paths = write_report(out_dir, rows, outcome_records(outcomes), meta)
    print(markdown_table(rows))

A row is one method's summary: n, em / em_ci, f1 / f1_ci, latency_ms[stage] = {median, p90},
bytes_sent_median and, for adapter methods, adapter_parameters / adapter_mb_bf16. Everything
here is pure formatting over those rows, so it works the same for in-process and service timings.

Every method runs on the same samples, so methods are also compared sample by sample
(`paired_differences`): LCF-X against every other method (each text channel, the receiver,
another sample's packet); without LCF-X, each method against the note.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from lcflow.core.names import STAGE_ORDER
from lcflow.eval.metrics import mean_with_ci

# Not stages: they span them. (The stages' order is core.names.STAGE_ORDER; a stage a backend adds
# goes after those, alphabetically.)
SPANNING = ("time_to_first_token", "total")

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ACCURACY_PLOT = "accuracy_vs_ttft.png"
LATENCY_PLOT = "latency_breakdown.png"


# --- numbers ---------------------------------------------------------------------------------------


def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs to compare: lcfx against each other method where lcfx ran, else
    each method against the note (text)."""
    if "lcfx" in methods:
        return [("lcfx", other) for other in methods if other != "lcfx"]
    if "text" in methods:
        return [(method, "text") for method in methods if method != "text"]
    return []


def paired_differences(records: list[dict]) -> list[dict]:
    """EM (and `contains`) of a method minus its baseline's on the samples both ran,
    d_i = em_i - em_base_i: the mean of d with its 95% CI (normal approximation over the d_i, which
    is tighter than two separate CIs when both methods get the same samples right) and how many
    samples only the method (gained) or only the baseline (lost) answered exactly. On open prompts
    the share of the document's facts stated is compared the same way (facts_stated_difference)."""
    scores: dict[str, dict[str, dict[str, float]]] = {
        "em": defaultdict(dict),
        "contains": defaultdict(dict),
        "facts_stated": defaultdict(dict),
    }
    for record in records:
        for score, by_method in scores.items():
            if record.get(score) is not None:
                by_method[record["method"]][record["sample_id"]] = record[score]
    em = scores["em"]
    rows = []
    for method, baseline in comparisons(list(em)):
        shared = [i for i in em[method] if i in em[baseline]]
        if len(shared) < 2:
            continue
        diffs = [em[method][i] - em[baseline][i] for i in shared]
        mean, low, high = mean_with_ci(diffs, bounds=(-1.0, 1.0))  # a difference of two EMs
        row = {
            "method": method,
            "baseline": baseline,
            "n": len(shared),
            "em_difference": mean,
            "em_difference_ci": [low, high],
            "gained": sum(d > 0 for d in diffs),
            "lost": sum(d < 0 for d in diffs),
        }
        for score in ("contains", "facts_stated"):
            by_sample = scores[score]
            if all(i in by_sample[method] and i in by_sample[baseline] for i in shared):
                mean, low, high = mean_with_ci(
                    [by_sample[method][i] - by_sample[baseline][i] for i in shared], bounds=(-1.0, 1.0)
                )
                row[f"{score}_difference"], row[f"{score}_difference_ci"] = mean, [low, high]
        rows.append(row)
    return rows


def difference_cell(row: dict | None, score: str) -> str:
    """A paired row's difference in `score` (em, contains, facts_stated) with its 95% CI, as
    "+0.120 [+0.050, +0.190]"; "" where the row does not carry it."""
    if not row or f"{score}_difference" not in row:
        return ""
    low, high = row[f"{score}_difference_ci"]
    return f"{row[f'{score}_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def paired_table(paired: list[dict]) -> str:
    open_prompts = any("facts_stated_difference" in row for row in paired)  # its column, only then
    extra = " facts stated difference [95% CI] |" if open_prompts else ""
    lines = [
        "| method | against | n | EM difference [95% CI] | contains difference [95% CI] | gained | lost |"
        + extra,
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if open_prompts else ""),
    ]
    for row in paired:
        lines.append(
            f"| {row['method']} | {row['baseline']} | {row['n']} | {difference_cell(row, 'em')} | "
            f"{difference_cell(row, 'contains')} | {row['gained']} | {row['lost']} |"
            + (f" {difference_cell(row, 'facts_stated')} |" if open_prompts else "")
        )
    return "\n".join(lines)


def stage_names(rows: list[dict]) -> list[str]:
    """Every stage any row timed, in handoff order."""
    seen = {s for row in rows for s in row["latency_ms"] if s not in SPANNING}
    known = [s for s in STAGE_ORDER if s in seen]
    return known + sorted(seen - set(STAGE_ORDER))


def median_ms(row: dict, stage: str) -> float | None:
    timing = row["latency_ms"].get(stage)
    return timing["median"] if timing else None


def ttft_ms(row: dict) -> tuple[float, float]:
    """(median, p90) time to the first answer token; a method that never produced a token
    (every answer empty) has none, and its total time stands in for it."""
    timing = row["latency_ms"].get("time_to_first_token") or row["latency_ms"]["total"]
    return timing["median"], timing["p90"]


def _ci_errors(mean: float, ci: list[float | None]) -> tuple[float, float]:
    """Error-bar lengths below and above the mean; zero where no interval exists (n = 1)."""
    low, high = ci
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return 0.0, 0.0
    return max(mean - low, 0.0), max(high - mean, 0.0)


def json_safe(value):
    """NaN / infinity -> None, recursively: JSON has no NaN (a 1-sample CI has no bounds)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# --- Markdown --------------------------------------------------------------------------------------


def _score(mean: float, ci: list[float | None]) -> str:
    low, high = ci
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{mean:.3f} [n/a]"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _bytes(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} MB"
    if value >= 1e3:
        return f"{value / 1e3:.1f} kB"
    return f"{value:.0f} B"


def markdown_table(rows: list[dict]) -> str:
    """One line per method: scores with 95% CIs, latency in ms (median unless marked), sizes."""
    stages = stage_names(rows)
    open_prompts = any("facts_stated" in row for row in rows)  # their two columns, only then
    header = (
        [
            "method",
            "n",
            "EM [95% CI]",
            "contains [95% CI]",
            "F1 [95% CI]",
        ]
        + (["facts stated [95% CI]", "empty answers"] if open_prompts else [])
        + [
            "TTFT ms",
            "TTFT p90 ms",
            "total ms",
        ]
        + [f"{s} ms" for s in stages]
        + ["bytes sent", "adapter params", "adapter MB (bf16)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        ttft, ttft_p90 = ttft_ms(row)
        no_token = " (no token: total)" if "time_to_first_token" not in row["latency_ms"] else ""
        params = row.get("adapter_parameters")
        cells = (
            [row["method"], str(row["n"]), _score(row["em"], row["em_ci"])]
            + [_score(row["contains"], row.get("contains_ci", [None, None])) if "contains" in row else ""]
            + [_score(row["f1"], row["f1_ci"])]
            + (
                [_score(row["facts_stated"], row["facts_stated_ci"]) if "facts_stated" in row else ""]
                + [f"{row.get('empty_rate', 0.0):.3f}"]
                if open_prompts
                else []
            )
            + [_ms(ttft) + no_token, _ms(ttft_p90), _ms(median_ms(row, "total"))]
            + [_ms(median_ms(row, s)) for s in stages]
            + [
                _bytes(row["bytes_sent_median"]),
                f"{params:,}" if params is not None else "",
                f"{row['adapter_mb_bf16']:.2f}" if params is not None else "",
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_label(machine: dict) -> str:
    """Short machine description for titles: '2 CPUs (torch 2 threads), cpu'."""
    label = f"{machine.get('cpu_count')} CPUs (torch {machine.get('torch_threads')} threads)"
    accelerator = machine.get("accelerator") or machine.get("device", "")
    return f"{label}, {accelerator}" if accelerator else label


def title(meta: dict) -> str:
    models = meta["models"]
    return f"{meta['task']}: {models['sharer']} -> {models['receiver']}\n{machine_label(meta['machine'])}"


def markdown_report(rows: list[dict], meta: dict, paired: list[dict] | None = None) -> str:
    """results.md: what was run, on what, the table, the paired comparisons, and the methods skipped."""
    models, adapters = meta["models"], meta.get("adapters", {})
    lines = [
        f"# lcflow eval: {meta['task']} ({meta['split']}, n={meta['n']}, seed {meta['seed']})",
        "",
        f"- sharer: `{models['sharer']}`; receiver: `{models['receiver']}`",
        f"- machine: {machine_label(meta['machine'])}; {meta['machine'].get('platform', '')}",
        f"- latency: {meta['latency']}; milliseconds, median over samples unless marked p90",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
    ]
    for method, info in adapters.items():
        lines.append(f"- adapter {method}: `{info['path']}` ({info['parameters']:,} parameters)")
    lines += ["", markdown_table(rows)]
    if paired:
        lines += [
            "",
            "Paired on the same samples (EM of the method minus the other's):",
            "",
            paired_table(paired),
        ]
    skipped = meta.get("skipped", {})
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {method}: {reason}" for method, reason in skipped.items()]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_ttft(rows: list[dict], path: Path, plot_title: str) -> Path:
    """EM with its 95% CI against median time to first token (log x), one labelled point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        ttft = max(ttft_ms(row)[0], 1e-3)  # a log axis cannot show 0
        low, high = _ci_errors(row["em"], row["em_ci"])
        ax.errorbar([ttft], [row["em"]], yerr=[[low], [high]], fmt="o", capsize=4)
        # Staggered label heights keep methods with similar scores and latencies readable.
        ax.annotate(
            row["method"], (ttft, row["em"]), xytext=(6, 4 + 10 * (i % 3)), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("median time to first token (ms, log scale)")
    ax.set_ylabel("exact match (95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(plot_title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency_breakdown(rows: list[dict], path: Path, plot_title: str) -> Path:
    """A stacked bar per method of its median stage times (medians do not add up to the median total)."""
    plt = _pyplot()
    stages = stage_names(rows)
    methods = [row["method"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 3), 4.5))
    bottoms = [0.0] * len(rows)
    for stage in stages:
        heights = [median_ms(row, stage) or 0.0 for row in rows]
        ax.bar(methods, heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xlabel("method")
    ax.set_ylabel("median time per stage (ms)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(plot_title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- files -----------------------------------------------------------------------------------------


def write_report(out_dir: str | Path, rows: list[dict], records: list[dict], meta: dict) -> dict[str, Path]:
    """results.json (summary, per-sample records, meta), results.md and both plots in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paired = paired_differences(records)
    report = {"meta": meta, "summary": rows, "paired": paired, "samples": records}
    paths = {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD}
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_report(rows, meta, paired))
    plot_title = title(meta)
    paths["accuracy_plot"] = plot_accuracy_vs_ttft(rows, out / ACCURACY_PLOT, plot_title)
    paths["latency_plot"] = plot_latency_breakdown(rows, out / LATENCY_PLOT, plot_title)
    return paths
