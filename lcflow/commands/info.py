"""`lcflow info`: what an adapter is (mode, sizes, layers, gates, models), or the paper pair's sizes.

    lcflow info ADAPTER_DIR            one saved adapter (LCF, LCF-X or C2C)
    lcflow info --paper-pair [--json]  LCF, LCF-X and C2C for Qwen2.5-0.5B -> Qwen3-0.6B, side by side

The paper-pair adapters are built on the meta device from the published model configs:
shapes only, no weights and no LLMs, so it runs in seconds. The paper reports 19.4M
parameters for LCF at b=128 against C2C's 477.8M (about 4%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the adapters are imported where used: `lcflow --help` stays fast
    from torch import nn

    from lcflow.core.kv import ModelIdentity

# The paper's figures for the pair, and the acceptance bounds.
PAPER_LCF_PARAMS = 19_400_000
PAPER_C2C_PARAMS = 477_800_000
MAX_LCF_SHARE_OF_C2C = 0.04
MAX_C2C_DEVIATION = 0.01
BF16_BYTES = 2


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="an adapter's mode, sizes, layers, gates and models (or --paper-pair sizes)",
        description="Describe a saved adapter directory, or with --paper-pair compare the sizes of "
        "LCF (b=128), LCF-X (b=128, m=32) and C2C for the paper's pair "
        "(Qwen2.5-0.5B-Instruct -> Qwen3-0.6B; adapter shapes only, no model weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("adapter", nargs="?", help="adapter directory (adapter_config.json + *.safetensors)")
    p.add_argument("--paper-pair", action="store_true", help="sizes of the three adapters for the paper pair")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if bool(args.adapter) == bool(args.paper_pair):
        print("error: give either an ADAPTER directory or --paper-pair", file=sys.stderr)
        return 2
    if args.paper_pair:
        info = paper_pair_info()
        text = format_paper_pair(info)
    else:
        try:
            info = adapter_info(args.adapter)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        text = format_adapter(info)
    print(json.dumps(info, indent=2) if args.json else text)
    return 0


# --- sizes ----------------------------------------------------------------------------------------


def megabytes(parameters: int, bytes_per_parameter: int) -> float:
    return round(parameters * bytes_per_parameter / 1e6, 3)


def format_mb(mb: float) -> str:
    """One decimal for real sizes, three for tiny test adapters (so they do not read as 0.0)."""
    return f"{mb:.1f}" if mb >= 1 else f"{mb:.3f}"


def block_breakdown(module: nn.Module) -> dict[str, int]:
    """Parameters per kind of block, summed over layers: 'decoder.proj.3.up.weight' -> 'decoder.proj.up'.

    Bare parameters keep their own name ('decoder.gates.5.logit' -> 'decoder.gates.logit')."""
    blocks: dict[str, int] = {}
    for name, p in module.named_parameters():
        parts = [part for part in name.split(".") if not part.isdigit()]
        if parts[-1] in ("weight", "bias"):
            parts = parts[:-1]
        key = ".".join(parts[:3])
        blocks[key] = blocks.get(key, 0) + p.numel()
    return blocks


def identity_info(identity: ModelIdentity) -> dict:
    spec = identity.spec
    return {
        "name": identity.name,
        "config_hash": identity.config_hash,
        "tokenizer_hash": identity.tokenizer_hash,
        "family": spec.family,
        "layers": spec.num_layers,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
    }


# --- one adapter directory --------------------------------------------------------------------------


def _latent_part(directory: Path) -> str:
    from lcflow.adapter.adapter import DECODER_FILE, ENCODER_FILE  # keeps --help fast

    has_encoder, has_decoder = (directory / ENCODER_FILE).is_file(), (directory / DECODER_FILE).is_file()
    if has_encoder and not has_decoder:
        return "encoder"
    if has_decoder and not has_encoder:
        return "decoder"
    return "both"  # (from_pretrained names whatever is missing)


def adapter_info(directory: str | Path) -> dict:
    directory = Path(directory)
    import torch

    from lcflow.adapter import AdapterConfig, LatentAdapter  # keeps --help fast
    from lcflow.adapter.c2c import C2CFuser  # keeps --help fast

    config = AdapterConfig.load(directory)
    bytes_per_parameter = torch.empty(0, dtype=getattr(torch, config.dtype)).element_size()
    if config.mode == "c2c":
        module = C2CFuser.from_pretrained(directory)
        counts = module.parameter_counts()
        gates = {
            t: {**logits, "open": {k: v > 0 for k, v in logits.items()}}
            for t, logits in module.gate_logits().items()
        }
    else:
        module = LatentAdapter.from_pretrained(directory, part=_latent_part(directory))
        counts = module.parameter_counts()
        gates = module.gates() if module.decoder is not None else None
    return {
        "directory": str(directory),
        "mode": config.mode,
        "parameters": counts,
        "dtype": config.dtype,
        "size_mb": megabytes(counts["total"], bytes_per_parameter),
        "files_mb": round(sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6, 3),
        "bottleneck": config.bottleneck if config.mode != "c2c" else None,
        "slots": config.slots if config.mode == "lcfx" else None,
        "layer_map_strategy": config.layer_map_strategy,
        "layer_map": {str(t): s for t, s in config.layer_map.items()},
        "retained_layers": config.retained_layers,
        "gates": {str(t): g for t, g in gates.items()} if gates is not None else None,
        "sharer": identity_info(config.sharer),
        "receiver": identity_info(config.receiver),
        "blocks": block_breakdown(module),
        "training": config.training,
    }


def _format_gates(info: dict) -> str:
    gates = info["gates"]
    if gates is None:
        return "gates:       not stored (encoder-only directory)"
    if info["mode"] == "c2c":
        cells = [f"{t}:K{g['key']:+.2f}/V{g['value']:+.2f}" for t, g in gates.items()]
        return "gate logits: " + " ".join(cells) + "  (open at inference when > 0)"
    return "gates:       " + " ".join(f"{t}:{g:.3f}" for t, g in gates.items())


def _format_model(role: str, m: dict) -> str:
    return (
        f"{role:<12} {m['name']} ({m['family']}, {m['layers']} layers, {m['kv_heads']} KV heads x "
        f"{m['head_dim']}; config {m['config_hash'][:8]}, tokenizer {m['tokenizer_hash'][:8]})"
    )


def format_adapter(info: dict) -> str:
    counts = info["parameters"]
    if info["mode"] == "c2c":
        sizes = f"fuser {counts['fuser']:,} ({counts['per_layer']:,} per layer)"
    else:
        sizes = f"encoder {counts['encoder']:,}, decoder {counts['decoder']:,}, total {counts['total']:,}"
    shape = []
    if info["bottleneck"] is not None:
        shape.append(f"bottleneck b={info['bottleneck']}")
    if info["slots"] is not None:
        shape.append(f"slots m={info['slots']}")
    pairs = " ".join(f"{t}<-{s}" for t, s in info["layer_map"].items())
    lines = [
        f"adapter:     {info['directory']}",
        f"mode:        {info['mode']}" + (f" ({', '.join(shape)})" if shape else ""),
        f"parameters:  {sizes}",
        f"size:        {format_mb(info['size_mb'])} MB in {info['dtype']} ({format_mb(info['files_mb'])} MB of files)",
        f"layer map:   {info['layer_map_strategy']}: receiver<-sharer {pairs}",
        f"retained:    {len(info['retained_layers'])} layers {info['retained_layers']}",
        _format_gates(info),
        _format_model("sharer:", info["sharer"]),
        _format_model("receiver:", info["receiver"]),
        "blocks:      " + ", ".join(f"{k} {v:,}" for k, v in info["blocks"].items()),
    ]
    return "\n".join(lines)


# --- the paper pair ---------------------------------------------------------------------------------


def paper_pair_adapters() -> dict[str, tuple[str, nn.Module]]:
    """The three adapters for the paper pair, on the meta device (shapes, no memory, no weights)."""
    import torch

    from lcflow.adapter import LatentAdapter  # keeps --help fast
    from lcflow.adapter.c2c import C2CFuser  # keeps --help fast
    from lcflow.testing.paper_pair import paper_pair_identities  # keeps --help fast

    sharer, receiver = paper_pair_identities()
    with torch.device("meta"):
        return {
            "lcf": ("LCF b=128", LatentAdapter.for_models("lcf", sharer, receiver, bottleneck=128)),
            "lcfx": (
                "LCF-X b=128 m=32",
                LatentAdapter.for_models("lcfx", sharer, receiver, bottleneck=128, slots=32),
            ),
            "c2c": ("C2C", C2CFuser.for_models(sharer, receiver)),
        }


def paper_pair_info() -> dict:
    adapters = paper_pair_adapters()
    c2c_total = adapters["c2c"][1].parameter_count()
    rows = {}
    for mode, (label, module) in adapters.items():
        counts = module.parameter_counts()
        rows[mode] = {
            "label": label,
            "parameters": counts,
            "bf16_mb": megabytes(counts["total"], BF16_BYTES),
            "ratio_to_c2c": counts["total"] / c2c_total,
            "layers": len(module.config.retained_layers),
            "layer_map_strategy": module.config.layer_map_strategy,
            "blocks": block_breakdown(module),
        }
    lcf_share = rows["lcf"]["ratio_to_c2c"]
    c2c_deviation = c2c_total / PAPER_C2C_PARAMS - 1
    config = adapters["c2c"][1].config
    return {
        "pair": {
            "sharer": identity_info(config.sharer),
            "receiver": identity_info(config.receiver),
            "note": "adapter shapes from the published model configs; no model weights built",
        },
        "adapters": rows,
        "paper": {"lcf_b128_parameters": PAPER_LCF_PARAMS, "c2c_parameters": PAPER_C2C_PARAMS},
        "checks": {
            "lcf_share_of_c2c": lcf_share,
            "lcf_at_most_4pct_of_c2c": lcf_share <= MAX_LCF_SHARE_OF_C2C,
            "c2c_deviation_from_paper": c2c_deviation,
            "c2c_within_1pct_of_paper": abs(c2c_deviation) <= MAX_C2C_DEVIATION,
        },
    }


def format_paper_pair(info: dict) -> str:
    pair, checks = info["pair"], info["checks"]
    lines = [
        "Paper pair, adapters only (shapes from the published configs; no model weights):",
        _format_model("  sharer:", pair["sharer"]),
        _format_model("  receiver:", pair["receiver"]),
        "",
        f"{'adapter':<18} {'parameters':>13} {'bf16 MB':>9} {'vs C2C':>8}",
    ]
    for row in info["adapters"].values():
        total = row["parameters"]["total"]
        lines.append(
            f"{row['label']:<18} {total:>13,} {format_mb(row['bf16_mb']):>9} {row['ratio_to_c2c']:>8.2%}"
        )
    per_layer = info["adapters"]["c2c"]["parameters"]["per_layer"]
    lines += [
        "",
        f"C2C per receiver layer: {per_layer:,}",
        f"paper: LCF b=128 {PAPER_LCF_PARAMS / 1e6:.1f}M, C2C {PAPER_C2C_PARAMS / 1e6:.1f}M",
        f"LCF at most {MAX_LCF_SHARE_OF_C2C:.0%} of C2C: {_yes(checks['lcf_at_most_4pct_of_c2c'])} "
        f"({checks['lcf_share_of_c2c']:.2%}); C2C within {MAX_C2C_DEVIATION:.0%} of the paper: "
        f"{_yes(checks['c2c_within_1pct_of_paper'])} ({checks['c2c_deviation_from_paper']:+.3%})",
    ]
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"
