"""Render the channel comparisons in docs/results/channels-*.json into docs/results.md and the
README's headline tables, and the shipped adapters' model cards into adapters/README.md, so that
every number shown has its file (never typed by hand).

    python scripts/render_results.py          # rewrite them
    python scripts/render_results.py --check  # exit 1 if one is out of date (the tests run this)

Each input is an `lcflow eval` results.json (summary rows, per-sample records, paired
differences, meta), copied to docs/results/channels-<pair>-<task>.json. The README shows the
files listed in README_TABLES, between the markers <!-- channels:NAME --> and <!-- /channels -->.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lcflow.eval.report import difference_cell  # noqa: E402  (after the path: run as a script)

RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
ADAPTERS = ROOT / "adapters"
# What each shipped adapter is for, in a few words (its numbers come from its model card).
PURPOSE = {
    "gemma3-to-gemma3-lcfx": "the full-width span packet the compressed one is distilled from",
    "gemma3-to-gemma3-lcfx-compressed": "the demo's LCF-X adapter: its packet 224 numbers a row, int4 in groups of 32 "
    "where quantizing pays on the link (docs/lcfx.md 13.3)",
    "gemma3-to-gemma3-lcfx-general": "LCF-X for open prompts too (never an empty answer; a sentence on most) and unseen tasks: "
    "refined on a mix (docs/measurements.md)",
    "gemma3-to-gemma3-lcfx-twohop": "LCF-X refined for two-hop questions",
    "gemma3-to-gemma3-lcfx-long": "LCF-X for documents of thousands of tokens (128 positions, chunked selection)",
    "gemma3-to-gemma3-lcf": "the demo's same-context part",
    "gemma3-to-gemma3-reader-selected": "the control: a text reader of LCF-X's selected sentences",
    "gemma3-to-gemma3-reader-forward": "the control: a text reader of the forwarded document",
    "gemma3-to-gemma3-reader-general": "the general adapter's control: the selected-sentence reader refined on its mix",
    "smollm2-to-gemma3-reader-selected": "the control, for the bridge: its selected sentences as text",
    "smollm2-to-gemma3-reader-forward": "the control, for the bridge: the forwarded document",
    "smollm2-to-gemma3-lcf": "same context across families",
    "smollm2-to-gemma3-c2c": "the C2C baseline, re-implemented",
    "smollm2-to-gemma3-lcfx-bridge": "LCF-X across families (soft tokens)",
    "smollm2-to-gemma3-lcfx-bridge-twohop": "the bridge read by the two-hop adapter",
    "gemma3-to-smollm2-lcf": "same context, the reverse direction",
    "gemma3-to-smollm2-lcfx-bridge": "LCF-X across families, the reverse direction",
    "smollm2-to-smollm2-lcfx": "SmolLM2's own span reader (the reverse bridge reads with it)",
}
# The README's headline tables, one per shipped pair: marker name -> the results files it puts side
# by side (held-out questions of the training family, then the unseen family).
README_TABLES = {
    pair: {
        "facts-cross": f"channels-{pair}-facts-cross.json",
        "ships (unseen)": f"channels-{pair}-ships.json",
    }
    for pair in ("gemma3-to-gemma3", "smollm2-to-gemma3")
}
# What each method is, in a few words, for the tables.
DESCRIBE = {
    "receiver": "receiver alone",
    "forward": "document forwarded as text",
    "text": "note (one sentence)",
    "text-c2c": "note, C2C's wording",
    "forward-selected": "LCF-X's sentences forwarded as text",
    "forward+reader": "document, trained text reader",
    "forward-selected+reader": "LCF-X's sentences, trained text reader",
    "kvcomm": "KVComm: the document's KV, chosen layers",
    "lcfx": "**LCF-X packet**",
    "lcfx-wrong": "LCF-X, another sample's packet",
}


# Files whose first samples informed design choices: re-scored without them too (start, stop).
RESCORED = {
    "channels-gemma3-to-gemma3-ships.json": (60, 200),
    "channels-smollm2-to-gemma3-ships.json": (60, 200),
}


def rescored(results: dict, start: int, stop: int) -> dict:
    """The same results on samples start..stop-1 of the run's order only: summary rows and LCF-X's
    paired differences recomputed from the per-sample records (latency and bytes kept per method)."""
    from lcflow.eval.metrics import mean_with_ci
    from lcflow.eval.report import paired_differences

    order = list(dict.fromkeys(r["sample_id"] for r in results["samples"]))[start:stop]
    keep = set(order)
    records = [r for r in results["samples"] if r["sample_id"] in keep]
    summary = []
    for row in results["summary"]:
        mine = [r for r in records if r["method"] == row["method"]]
        em, em_lo, em_hi = mean_with_ci([r["em"] for r in mine])
        contains, c_lo, c_hi = mean_with_ci([r["contains"] for r in mine])
        f1 = sum(r["f1"] for r in mine) / len(mine)
        summary.append({**row, "n": len(mine), "em": em, "em_ci": [em_lo, em_hi], "contains": contains,
                        "contains_ci": [c_lo, c_hi], "f1": f1})  # fmt: skip
    meta = {
        **results["meta"],
        "n": len(order),
        "split": f"{results['meta']['split']}, samples {start}-{stop - 1}",
    }
    return {**results, "summary": summary, "paired": paired_differences(records), "meta": meta}


def _ci(mean: float, ci: list) -> str:
    low, high = ci
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{mean:.3f}"


def _bytes(value: float) -> str:
    return f"{value / 1e3:.1f} kB" if value >= 1e3 else f"{value:.0f} B"


def _ttft(row: dict) -> str:
    timing = row["latency_ms"].get("time_to_first_token") or row["latency_ms"]["total"]
    return f"{timing['median']:.0f}"


def open_cells(row: dict, paired: dict | None) -> str:
    """An open-prompt run's cells: facts stated, LCF-X's paired difference in it, empty answers."""
    difference = difference_cell(paired, "facts_stated")
    return f" {_ci(row['facts_stated'], row['facts_stated_ci'])} | {difference} | {row['empty_rate']:.3f} |"


def channel_table(results: dict) -> str:
    """One line per method: EM and contains with 95% CIs, LCF-X's paired EM difference over it,
    bytes sent and median time to first token."""
    paired = {p["baseline"]: p for p in results.get("paired", []) if p["method"] == "lcfx"}
    # Open prompts (facts-open): the share of the document's facts stated, and of empty answers.
    open_prompts = any("facts_stated" in row for row in results["summary"])
    extra = (
        " facts stated [95% CI] | LCF-X facts stated minus this, paired | empty answers |"
        if open_prompts
        else ""
    )
    lines = [
        "| channel | method | EM [95% CI] | contains [95% CI] | F1 | LCF-X EM minus this, paired [95% CI] | bytes | TTFT ms |"
        + extra,
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (3 if open_prompts else 0),
    ]
    for row in results["summary"]:
        method = row["method"]
        difference = difference_cell(paired.get(method), "em")
        contains = _ci(row["contains"], row["contains_ci"]) if "contains_ci" in row else ""
        lines.append(
            f"| {DESCRIBE.get(method, method)} | `{method}` | {_ci(row['em'], row['em_ci'])} | {contains} | "
            f"{row['f1']:.3f} | {difference} | {_bytes(row['bytes_sent_median'])} | {_ttft(row)} |"
            + (open_cells(row, paired.get(method)) if open_prompts else "")
        )
    return "\n".join(lines)


def caption(results: dict, path: Path) -> str:
    meta = results["meta"]
    models = meta["models"]
    machine = meta["machine"]
    return (
        f"{meta['task']} ({meta['split']}, n={meta['n']}), {models['sharer']} -> {models['receiver']}, "
        f"in-process on {machine['cpu_count']} CPU cores ({machine['accelerator']}, {machine['torch_threads']} "
        f"torch thread{'s' if machine['torch_threads'] != 1 else ''}), greedy, "
        f"{meta['date'][:10]}; file: [docs/results/{path.name}](results/{path.name})"
    )


def render_doc(files: list[Path]) -> str:
    parts = [
        "# Measured: LCF-X against every text channel",
        "",
        "Generated by `python scripts/render_results.py` from the files named under each table; "
        "do not edit by hand. Every method ran on the same samples in one run; paired differences "
        "are LCF-X's EM minus the method's, sample by sample, with a 95% normal-approximation CI. "
        "`contains`: the answer's first line contains an accepted answer. TTFT: median time to the "
        "first answer token, in-process (no network), including the sharer's work (the note's "
        "generation, the selection). What each method is: `lcflow eval --help` and lcflow/eval/harness.py.",
    ]
    for path in files:
        results = json.loads(path.read_text())
        parts += ["", f"## {results['meta']['task']}: {results['meta']['models']['pair'] or ''}", ""]
        if path.stem.endswith("-kvcomm"):  # a run of KVComm beside forward and LCF-X only
            parts[-2] += " (KVComm's run)"
        if path.stem.endswith("-trained"):  # LCF-X and its text reader refined on the family itself
            parts[-2] += " (LCF-X and its text reader refined on this family, the same budget)"
        if path.stem.endswith("-64-positions"):  # the shipped adapter copied with slots 64
            parts[-2] += " (64 positions selected for both LCF-X and the selected text)"
        parts += [caption(results, path), "", channel_table(results)]
        if path.name in RESCORED:
            start, stop = RESCORED[path.name]
            again = rescored(results, start, stop)
            parts += ["", f"Re-scored on samples {start}-{stop - 1} only (the first {start} informed design "
                      f"choices before this family was held out), n={again['meta']['n']}:", ""]  # fmt: skip
            parts += [channel_table(again)]
        skipped = results["meta"].get("skipped", {})
        if skipped:
            parts += ["", "Not run: " + "; ".join(f"`{m}`: {why}" for m, why in skipped.items())]
    return "\n".join(parts) + "\n"


def pair_table(named: list[tuple[str, dict]]) -> str:
    """The README's compact table for one pair: per method, each task's EM and contains with their
    CIs and LCF-X's paired EM difference over it, then the first task's bytes and TTFT
    (docs/results.md has the rest)."""
    header = ["channel"]
    for label, _ in named:
        header += [f"{label}: EM [95% CI]", f"{label}: contains [95% CI]", f"{label}: LCF-X EM minus this"]
    lines = ["| " + " | ".join(header + ["bytes", "TTFT ms"]) + " |", "|" + " --- |" * (len(header) + 2)]
    rows = [{row["method"]: row for row in results["summary"]} for _, results in named]
    paired = [
        {p["baseline"]: p for p in results.get("paired", []) if p["method"] == "lcfx"} for _, results in named
    ]
    for method, first in rows[0].items():
        cells = [f"{DESCRIBE.get(method, method)} (`{method}`)"]
        for by_method, by_baseline in zip(rows, paired, strict=True):
            row, p = by_method.get(method), by_baseline.get(method)
            cells.append(_ci(row["em"], row["em_ci"]) if row else "")
            cells.append(_ci(row["contains"], row["contains_ci"]) if row else "")
            cells.append(difference_cell(p, "em"))
        cells += [_bytes(first["bytes_sent_median"]), _ttft(first)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pair_caption(named: list[tuple[str, dict, Path]]) -> str:
    meta = named[0][1]["meta"]
    machine = meta["machine"]
    tasks = ", ".join(f"{label} n={r['meta']['n']} ({r['meta']['split']})" for label, r, _ in named)
    files = ", ".join(f"[{path.name}](docs/results/{path.name})" for _, _, path in named)
    return (
        f"{meta['models']['sharer']} -> {meta['models']['receiver']}; {tasks}; in-process on "
        f"{machine['cpu_count']} CPU cores ({machine['torch_threads']} torch thread"
        f"{'s' if machine['torch_threads'] != 1 else ''}), greedy, {meta['date'][:10]}; LCF-X minus this: "
        f"paired on the same samples; bytes and TTFT (median): {named[0][0]}. Files: {files}"
    )


def render_readme(text: str) -> str:
    for name, files in README_TABLES.items():
        named = [
            (label, json.loads((RESULTS / file).read_text()), RESULTS / file)
            for label, file in files.items()
            if (RESULTS / file).is_file()
        ]
        if not named:
            continue
        block = f"<!-- channels:{name} -->\n{pair_caption(named)}\n\n"
        block += pair_table([(label, results) for label, results, _ in named]) + "\n<!-- /channels -->"
        text = re.sub(
            rf"<!-- channels:{re.escape(name)} -->.*?<!-- /channels -->",
            lambda _, block=block: block,
            text,
            flags=re.S,
        )
    return text


def adapter_index() -> str:
    """adapters/README.md: one line per shipped adapter, its numbers from its model card."""
    lines = [
        "# Shipped adapters",
        "",
        "Generated by `python scripts/render_results.py` from each adapter's `model_card.json`; do not "
        "edit by hand. Each directory's README.md is its model card: provenance, the eval it was "
        "measured on (held-out samples), how to rebuild it. `tests/real_model/test_shipped_adapters.py` replays "
        "each card's answers.",
        "",
        "| adapter | sharer -> receiver | mode | card's eval: task, n | EM | weights | what it is for |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for card_path in sorted(ADAPTERS.glob("*/model_card.json")):
        card = json.loads(card_path.read_text())
        evaluated = card.get("eval") or {}
        row = (card.get("results") or {}).get(evaluated.get("method") or card["mode"]) or {}
        em = f"{row['em']:.3f}" if "em" in row else ""
        size = sum(p.stat().st_size for p in card_path.parent.glob("*.safetensors")) / 1e6
        name = card_path.parent.name
        lines.append(
            f"| [`{name}`]({name}/README.md) | {card['sharer']} -> {card['receiver']} | {card['mode']} | "
            f"{evaluated.get('task', '')}, {evaluated.get('n', '')} | {em} | {size:.1f} MB | {PURPOSE.get(name, '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that both files are up to date")
    args = parser.parse_args()
    files = sorted(RESULTS.glob("channels-*.json"))
    outputs = {
        DOC: render_doc(files),
        README: render_readme(README.read_text()),
        ADAPTERS / "README.md": adapter_index(),
    }
    stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is out of date: run python scripts/render_results.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.write_text(outputs[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
