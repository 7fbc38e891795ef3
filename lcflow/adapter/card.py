"""Model cards for shipped adapters: model_card.json (machine-readable) and README.md.

    python -m lcflow.adapter.card adapters/gemma3-to-gemma3-lcfx --eval runs/cross/results.json \
        --method lcfx --command "bash scripts/build_adapters.sh"
    python -m lcflow.adapter.card adapters/smollm2-to-gemma3-lcf --method lcf \
        --codec-eval bf16=runs/b/results.json --codec-eval int8=... --codec-eval int4=...

The card records the pair, the training provenance (from adapter_config.json), the exact eval
it was measured with (task, split, seed, n, max_new_tokens), the result with its 95% CI, and
each sample's answer (`eval.answers`), so tests/real_model/test_shipped_adapters.py can replay some of
those samples and check the adapter gives the same answers. A card written before answers were
recorded gets them from a fresh run of its eval, which must reproduce its EM:

    python -m lcflow.adapter.card adapters/X --method lcfx --answers-from runs/x/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lcflow.core.names import DEFAULT_INT4_GROUP, canonical_wire_name, split_group

CARD_JSON = "model_card.json"
CARD_README = "README.md"
CARD_FILES = (CARD_JSON, CARD_README)  # what a copy of an adapter leaves behind: it describes the source
READER_CONFIG = "reader_config.json"  # lcflow.adapter.reader (not imported: this module stays light)
# The wire codecs a card may choose, smallest last; "none" is bf16 (lcflow.transport.quantize).
# int4-hadamard is as small as int4 and costs a rotation at each end, so int4 wins a tie. An int4
# one may also name its group size (int4-hadamard-g32): smaller groups, more scales (by_size).
CODECS_BY_SIZE = ("none", "int8", "int4-hadamard", "int4")
CODEC_TOLERANCE = 0.01  # the rule: the smallest codec within 1 EM point of bf16


def is_card_codec(name: str) -> bool:
    """One of CODECS_BY_SIZE, or an int4 one of them with its group size named."""
    return split_group(name)[0] in CODECS_BY_SIZE


def bytes_per_number(name: str) -> float:
    """What a card codec costs a latent number on the wire, scales included (float16 scales;
    int8's one scale a row counted as nothing): bf16 2, int8 1, int4 1/2 + 2/g."""
    base, group = split_group(name)
    if base in ("none", "int8"):
        return 2.0 if base == "none" else 1.0
    return 0.5 + 2 / (group or DEFAULT_INT4_GROUP)


def by_size(names) -> list[str]:
    """Card codecs largest first; of two the same size, the rotated one first (the other wins a tie)."""
    return sorted(
        names, key=lambda name: (-bytes_per_number(name), not name.startswith("int4-hadamard"), name)
    )


def accurate_codecs(em: dict[str, float], tolerance: float = CODEC_TOLERANCE) -> list[str]:
    """The measured codecs whose EM is within `tolerance` of bf16's ("none"), smallest last."""
    if "none" not in em:
        raise ValueError("choosing a codec needs the bf16 eval (--codec-eval bf16=...)")
    return [c for c in by_size(em) if is_card_codec(c) and em[c] >= em["none"] - tolerance - 1e-9]


def choose_codec(em: dict[str, float], tolerance: float = CODEC_TOLERANCE) -> str:
    """The smallest codec whose EM is within `tolerance` of bf16's ("none"), of those measured."""
    return accurate_codecs(em, tolerance)[-1]


def add_codec(adapter_dir: Path, method: str, evals: dict[str, Path]) -> dict:
    """Record in the adapter's card the codec its measurements choose: EM of `method` per codec
    (`lcflow eval --wire` results on the same samples), the rule, and the choice, which a sharer
    with --quantize card (the default) sends this adapter's latents with."""
    path = adapter_dir / CARD_JSON
    card = json.loads(path.read_text())
    em, metas = {}, {}
    for codec, results_path in evals.items():
        name = "none" if codec == "bf16" else canonical_wire_name(codec)
        if not is_card_codec(name):
            raise ValueError(
                f"--codec-eval {codec}=...: the codecs are bf16, {', '.join(CODECS_BY_SIZE[1:])} "
                "(an int4 one may name its group size: int4-hadamard-g32)"
            )
        results = json.loads(Path(results_path).read_text())
        row = next((r for r in results["summary"] if r["method"] == method), None)
        if row is None:
            raise ValueError(f"{results_path} has no {method!r} row")
        wire = results["meta"].get("wire")  # runs before the field: trusted as labelled
        if wire is not None and canonical_wire_name(wire) != ("bf16" if name == "none" else name):
            raise ValueError(f"--codec-eval {codec}=...: {results_path} ran with --wire {wire}, not {codec}")
        em[name] = row["em"]
        metas[codec] = eval_spec(results, method)
    if len({json.dumps(m, sort_keys=True) for m in metas.values()}) > 1:  # the rule compares like with like
        raise ValueError(f"the codec evals were not run on the same samples: {metas}")
    meta = next(iter(metas.values()))
    card["codec"] = {
        "default": choose_codec(em),
        "rule": f"the smallest codec within {CODEC_TOLERANCE * 100:g} EM point of bf16 (none = bf16)",
        "em": em,
        **meta,
    }
    path.write_text(json.dumps(card, indent=2) + "\n")
    (adapter_dir / CARD_README).write_text(render_markdown(card, adapter_dir))
    return card["codec"]


def eval_spec(results: dict, method: str) -> dict:
    """Which eval `results` holds for `method`: what a card records, and what a re-run must match."""
    meta = results["meta"]
    row = next(row for row in results["summary"] if row["method"] == method)
    return {
        "task": meta.get("task"),
        "split": meta.get("split"),
        "seed": meta.get("seed"),
        "n": row["n"],
        "max_new_tokens": meta.get("max_new_tokens"),
    }


def card_answers(results: dict, method: str) -> list[dict]:
    """Each sample's answer from `method`, in the eval's order: {"id", "prediction", "em"}."""
    return [
        {"id": record["sample_id"], "prediction": record["prediction"], "em": record["em"]}
        for record in results.get("samples", [])
        if record["method"] == method
    ]


def add_answers(adapter_dir: Path, results_path: Path, method: str) -> dict:
    """Record in an existing card each sample's answer, from a fresh run of the card's own eval.

    The run must be the card's eval (models, adapter, task, split, seed, n, max_new_tokens, one
    answer a sample) and reproduce it (EM inside the card's 95% CI), else nothing is written; the
    card's results are kept as they were measured, and the answers are labelled with the machine
    and date of the run that gave them.
    """
    path = adapter_dir / CARD_JSON
    card = json.loads(path.read_text())
    results = json.loads(Path(results_path).read_text())
    spec, meta = card["eval"], results["meta"]
    rows = {row["method"]: row for row in results["summary"]}
    if method != spec["method"] or method not in rows:
        raise ValueError(f"the card's method is {spec['method']!r}; {results_path} has {sorted(rows)}")
    models, adapter = meta.get("models", {}), meta.get("adapters", {}).get(method, {}).get("path", "")
    ran_eval = eval_spec(results, method)
    ran = ran_eval | {
        "sharer": models.get("sharer"),
        "receiver": models.get("receiver"),
        "adapter": Path(adapter).name,
    }
    wanted = {key: spec[key] for key in ran_eval} | {
        "sharer": card["sharer"],
        "receiver": card["receiver"],
        "adapter": card["adapter"],
    }
    if ran != wanted:
        raise ValueError(f"{results_path} is not the card's eval: ran {ran}, the card has {wanted}")
    answers = card_answers(results, method)
    if len(answers) != spec["n"]:
        raise ValueError(
            f"{results_path} holds {len(answers)} {method} answers; the card's eval has {spec['n']}"
        )
    low, high = card["results"][method]["em_ci"]
    if not low - 1e-9 <= rows[method]["em"] <= high + 1e-9:
        raise ValueError(
            f"the run does not reproduce the card: EM {rows[method]['em']:.3f} outside [{low:.3f}, {high:.3f}]"
        )
    spec["answers"] = answers
    spec["answers_run"] = {"em": rows[method]["em"], "machine": meta.get("machine"), "date": meta.get("date")}
    path.write_text(json.dumps(card, indent=2) + "\n")
    return spec["answers_run"]


def build_card(
    adapter_dir: Path, results: dict, method: str, command: str, diagnostics: dict | None = None
) -> dict:
    meta = results["meta"]
    rows = {row["method"]: row for row in results["summary"]}
    if method not in rows:
        raise SystemExit(f"method {method!r} is not in the eval results (have {sorted(rows)})")
    evaluated = {
        "method": method,
        **eval_spec(results, method),
        "machine": meta.get("machine"),
        "latency": meta.get("latency", "in-process"),
        # the latents' number format on the way (lcflow eval --wire): a replay goes through it too
        "wire": meta.get("wire", "exact"),
        # replayed in part by tests/real_model/test_shipped_adapters.py
        "answers": card_answers(results, method),
    }
    results_by_method = {
        name: {k: row[k] for k in ("n", "em", "em_ci", "f1", "f1_ci")} for name, row in rows.items()
    }
    if (adapter_dir / READER_CONFIG).is_file():  # a text reader: PEFT's files and ours
        reader = json.loads((adapter_dir / READER_CONFIG).read_text())
        return {
            "adapter": adapter_dir.name,
            "mode": reader["mode"],
            "sharer": meta["models"]["sharer"],  # the pair it was evaluated with
            "receiver": reader["receiver"]["name"],
            "build_command": command,
            "eval": evaluated,
            "results": results_by_method,
        }
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {
        "adapter": adapter_dir.name,
        "mode": config["mode"],
        "sharer": config["sharer"]["name"],
        "receiver": config["receiver"]["name"],
        "build_command": command,
        "eval": evaluated,
        "results": results_by_method,
        # `lcflow bench packets` (span-packet LCF-X): is the packet about its document, and read?
        "packet_diagnostics": {**diagnostics["summary"], "task": diagnostics.get("meta", {}).get("task")}
        if diagnostics
        else None,
    }


def _training_lines(training: dict) -> list[str]:
    """How the weights came about: a training run, or a closed form with no task training."""
    if "steps_done" not in training:  # lcflow align: a fitted (or exact) map, nothing trained
        lines = [f"- {training.get('method', 'no training recorded')}"]
        if "held_out" in training:  # lcflow bridge: the translator's fit, on documents it never saw
            held = training["held_out"]
            lines.append(
                f"- translator fitted on {training['documents']} corpus documents ({training.get('tokens')} "
                f"tokens), {training.get('steps')} MLP steps; held-out R^2 {held['r2']}, nearest token "
                f"right {held['nearest_token']} (ridge alone: {training['held_out_ridge']['nearest_token']})"
            )
            lines.append(f"- reader: `{training.get('reader')}`, copied in")
            if "translator_from" in training:  # lcflow bridge --translator-from: the reader swapped
                lines[-1] += (
                    f" in place of the one the translator of `{training['translator_from']}` came with"
                )
        elif training.get("documents"):
            lines.append(
                f"- fitted on {training['documents']} corpus documents, ridge {training.get('ridge')}; "
                f"mean held-out R^2 {training.get('held_out_r2_mean')}"
            )
        return lines
    # a text reader (a LoRA) has no gates
    gates = "" if training.get("mode") == "text-reader" else f" (gates {training.get('gate_lr')})"
    return [
        f"- task: {training.get('task')}; steps: {training.get('steps_done')} x batch {training.get('batch_size')}; "
        f"lr {training.get('lr')}{gates}; seed {training.get('seed')}",
        f"- time: {training.get('train_seconds')} s ({training.get('seconds_per_step')} s/step) on the CPU of the "
        "development machine (2 cores)",
        f"- loss: {training.get('first_loss_mean_first_10')} (first 10 steps) -> "
        f"{training.get('final_loss_mean_last_10')} (last 10)",
        *_distillation_lines(training),
    ]


def _distillation_lines(training: dict) -> list[str]:
    """Where the training started and whom it learned from, where it did (`lcflow train
    --init-adapter --teacher-adapter`, e.g. a narrowed packet distilled from the full one)."""
    if not training.get("teacher_adapter"):
        return []
    wire = training.get("wire", "exact")
    return [
        f"- started from `{training.get('init_adapter')}`, distilled from `{training.get('teacher_adapter')}` "
        f"(KL weight {training.get('kl_weight')})"
        + ("" if wire == "exact" else f", through {wire} while training")
    ]


def _reader_header(card: dict) -> list[str]:
    lora = card["lora"]
    selection = (
        f", the sentences `{card['selection_adapter']}` selects" if card.get("selection_adapter") else ""
    )
    training = card["training"]
    copied = training.get("copied_from")
    summary = (
        # a reader shipped for a second pair with the same receiver: its weights are another pair's
        f"Text reader of receiver `{card['receiver']}` for the `{card['channel']}` channel{selection}: the "
        f"weights of `{copied}` (LoRA r={lora['rank']}, alpha={lora['alpha']}), copied with no further "
        f"training. {training.get('copy_reason', '')}"
        if copied
        else f"Text reader of receiver `{card['receiver']}`: LoRA (r={lora['rank']}, alpha={lora['alpha']}, "
        f"on {', '.join(lora['target_modules'])}) trained to read the `{card['channel']}` channel{selection}, "
        "with the same data, steps, batch, learning rate and loss as the LCF-X adapter it is compared with "
        "(lcflow.adapter.reader)."
    )
    return [
        f"# {card['adapter']}",
        "",
        summary.strip(),
        "",
        "## Training" + (f" (of `{copied}`)" if copied else ""),
        "",
        *_training_lines(training),
        f"- rebuild: `{card['build_command']}`",
    ]


def _through(spec: dict) -> str:
    """How the eval's latents travelled, where not as encoded (`lcflow eval --wire`)."""
    wire = spec.get("wire", "exact")
    return "" if wire == "exact" else f", the latents through {wire} as a sharer sends them"


def _evaluation_lines(card: dict) -> list[str]:
    spec = card["eval"]
    lines = [
        "",
        "## Evaluation",
        "",
        f"Task {spec['task']}, split {spec['split']}, seed {spec['seed']}, n={spec['n']}, greedy, "
        f"{spec['max_new_tokens']} new tokens{_through(spec)}; EM and token F1 with 95% CIs.",
        "",
        "| method | n | EM [95% CI] | F1 [95% CI] |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in card["results"].items():
        em_lo, em_hi = row["em_ci"]
        f1_lo, f1_hi = row["f1_ci"]
        lines.append(
            f"| {name} | {row['n']} | {row['em']:.3f} [{em_lo:.3f}, {em_hi:.3f}] | "
            f"{row['f1']:.3f} [{f1_lo:.3f}, {f1_hi:.3f}] |"
        )
    return lines


def config_view(adapter_dir: Path) -> dict:
    """What a card shows of the adapter's own files (its architecture, its training), read from
    them when the card is rendered: the card holds provenance and results only, never a copy of the
    config that could go stale."""
    if (adapter_dir / READER_CONFIG).is_file():
        reader = json.loads((adapter_dir / READER_CONFIG).read_text())
        return {
            "channel": reader["channel"],
            "selection_adapter": reader.get("selection_adapter") or None,
            "lora": {k: reader[k] for k in ("rank", "alpha", "target_modules")},
            "training": reader.get("training", {}),
        }
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    packet = config.get("packet") if config["mode"] == "lcfx" else None
    bridge = packet == "bridge"
    return {
        "bottleneck": config["bottleneck"],
        "slots": config["slots"] if config["mode"] == "lcfx" else None,
        # span and bridge packets: which positions travel (lcflow.adapter.spans, .bridge)
        "packet": packet,
        "selection": config.get("selection") if packet in ("spans", "bridge") else None,
        "selection_heads": config.get("selection_heads") or None,
        "selection_chunk": config.get("selection_chunk") or None,  # 0: one softmax over the context
        # bridge packets: how the text is cut into receiver tokens, and the packet's most rows
        "bridge_tokens": config.get("bridge_tokens", "whole") if bridge else None,
        "bridge_rows": (config.get("bridge_rows") or config["slots"]) if bridge else None,
        "bridge_snap": config.get("bridge_snap", False) if bridge else None,
        "retained_layers": config["retained_layers"],
        "training": config.get("training", {}),
    }


def render_markdown(card: dict, adapter_dir: Path | None = None) -> str:
    """The card's README.md; with `adapter_dir`, what it shows of the config is read from there."""
    if adapter_dir is not None:
        card = {**config_view(Path(adapter_dir)), **card}
    training = card["training"]
    if card["mode"] == "text-reader":
        return "\n".join(_reader_header(card) + _evaluation_lines(card)) + "\n"
    lines = [
        f"# {card['adapter']}",
        "",
        f"{card['mode'].upper()} adapter: sharer `{card['sharer']}` -> receiver `{card['receiver']}`"
        + (f", bottleneck b={card['bottleneck']}" if card["mode"] != "c2c" else " (the C2C baseline fuser)")
        + (f", {card['slots']} slots" if card["slots"] else "")
        + (
            f" ({card.get('packet', 'span')} packet, selection `{card['selection']}`"
            if card.get("selection")
            else ""
        )
        + (
            f" by the sharer's heads {card['selection_heads']} (layer, head)"
            if card.get("selection_heads")
            else ""
        )
        + (
            f", their attention normalised in chunks of {card['selection_chunk']} positions"
            if card.get("selection_chunk")
            else ""
        )
        + (")" if card.get("selection") else "")
        + ".",
        "",
        "## Training",
        "",
        *_training_lines(training),
        f"- retained receiver layers: {card['retained_layers']}",
        f"- rebuild: `{card['build_command']}`",
        *_evaluation_lines(card),
    ]
    if card.get("codec"):
        codec = card["codec"]
        measured = ", ".join(f"{'bf16' if c == 'none' else c} {e:.3f}" for c, e in codec["em"].items())
        lines += [
            "",
            "## Wire codec",
            "",
            f"Sent as **{'bf16' if codec['default'] == 'none' else codec['default']}** by a sharer with "
            f"`--quantize card` (the default): {codec['rule']}. EM on {codec['task']} (n={codec['n']}, "
            f"the same samples for each): {measured}. With `--codec auto` (the default) the sharer may "
            "send bf16 or another codec measured within the point instead, where that costs less time "
            "on its link.",
        ]
    if card.get("packet_diagnostics"):
        found = card["packet_diagnostics"]
        lines += [
            "",
            "## Packet diagnostics",
            "",
            f"`lcflow bench packets` on {found.get('task')}: the share of the packet's variance between "
            "samples (0 = one packet for every document), the attention the receiver's last prompt token "
            "puts on the packet, and the answer's NLL, with the sample's own packet and another sample's.",
            "",
            diagnostics_markdown(found),
        ]
    return "\n".join(lines) + "\n"


def write_card(
    adapter_dir: Path, results_path: Path, method: str, command: str, diagnostics_path: Path | None = None
) -> dict:
    diagnostics = json.loads(diagnostics_path.read_text()) if diagnostics_path else None
    card = build_card(adapter_dir, json.loads(results_path.read_text()), method, command, diagnostics)
    (adapter_dir / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (adapter_dir / CARD_README).write_text(render_markdown(card, adapter_dir))
    return card


def diagnostics_markdown(summary: dict) -> str:
    """`lcflow bench packets`' summary (lcflow.research.diagnostics) as a one-row table."""
    share, attn, nll = summary["between_sample_share"], summary["prefix_attention"], summary["answer_nll"]
    recall = summary.get("answer_recall") or {"share": None, "counted": 0}
    recalled = f"{recall['share']:.3f} of {recall['counted']}" if recall["share"] is not None else "-"
    return "\n".join(
        [
            "| n | rows | between-sample share (mean, min layer) | prefix attention right / wrong "
            "| answer NLL right / wrong | answer selected |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {summary['n']} | {summary['rows_median']:g} | {share['mean']:.3f}, {share['min']:.3f} "
            f"| {attn['right']:.3f} / {attn['wrong']:.3f} | {nll['right']:.3f} / {nll['wrong']:.3f} "
            f"| {recalled} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write model_card.json and README.md into an adapter directory."
    )
    parser.add_argument("adapter", type=Path, help="the adapter directory")
    parser.add_argument("--eval", type=Path, help="results.json written by `lcflow eval` (writes the card)")
    parser.add_argument(
        "--method", required=True, help="which eval row is this adapter's (lcf, lcfx, lcfx-pruned, c2c)"
    )
    parser.add_argument(
        "--command", default="bash scripts/build_adapters.sh", help="how the adapter was built"
    )
    parser.add_argument(
        "--diagnostics", type=Path, help="diagnostics.json written by `lcflow bench packets` (span packets)"
    )
    parser.add_argument(
        "--answers-from",
        type=Path,
        metavar="RESULTS",
        help="results.json of a fresh run of the card's own eval: record each sample's answer in the "
        "existing card (the run must reproduce the card's EM)",
    )
    parser.add_argument(
        "--codec-eval",
        action="append",
        default=[],
        metavar="CODEC=RESULTS",
        help="results.json of `lcflow eval --wire CODEC` (bf16, int8, int4; the same samples): record "
        "in the existing card the smallest codec within 1 EM point of bf16",
    )
    args = parser.parse_args()
    if args.eval is None and not args.codec_eval and args.answers_from is None:
        parser.error(
            "give --eval (write the card), --answers-from (record its answers) and/or --codec-eval "
            "(choose its wire codec)"
        )
    if any("=" not in item for item in args.codec_eval):  # checked before anything is written
        parser.error("--codec-eval takes CODEC=RESULTS, e.g. int8=runs/x/results.json")
    if args.eval is not None:
        card = write_card(args.adapter, args.eval, args.method, args.command, args.diagnostics)
        print(json.dumps(card["results"][args.method]))
    if args.answers_from is not None:
        try:
            print(json.dumps(add_answers(args.adapter, args.answers_from, args.method)))
        except ValueError as err:
            parser.error(str(err))
    if args.codec_eval:
        evals = dict(item.split("=", 1) for item in args.codec_eval)
        try:
            print(json.dumps(add_codec(args.adapter, args.method, evals)))
        except ValueError as err:
            parser.error(str(err))


if __name__ == "__main__":
    main()
