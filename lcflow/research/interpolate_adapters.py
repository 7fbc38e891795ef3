"""Weight-space interpolation of two adapters of one architecture (WiSE-FT, Wortsman et al. 2022):

    theta = alpha * theta_tuned + (1 - alpha) * theta_base

The LCF-X span adapter of Gemma3 -> Gemma3 is the exact map (base: the receiver reads its own KV
of the selected sentences) fine-tuned on single-hop questions (tuned). Fine-tuning taught it to
answer with a word from the packet, which fails when the answer is in the receiver's own
document (two hops, docs/lcfx.md section 6); interpolating keeps part of the base's reading.

    python -m lcflow.research.interpolate_adapters adapters/gemma3-to-gemma3-lcfx \\
        runs/build/gemma3-to-gemma3-lcfx-spans --alpha 0.5 --out runs/wise-0.5

The config (selection, heads, ...) is the tuned adapter's; `training` records the recipe.
"""

from __future__ import annotations

import argparse

import torch

from lcflow.adapter import LatentAdapter


def interpolate(tuned: LatentAdapter, base: LatentAdapter, alpha: float) -> LatentAdapter:
    """A copy of `tuned` whose every weight is alpha * tuned + (1 - alpha) * base."""
    if tuned.config.to_dict()["retained_layers"] != base.config.to_dict()["retained_layers"]:
        raise SystemExit("the two adapters retain different layers: they cannot be interpolated")
    base_state = base.state_dict()
    mixed = {}
    for name, value in tuned.state_dict().items():
        if name not in base_state or base_state[name].shape != value.shape:
            raise SystemExit(f"{name}: the adapters differ in architecture")
        mixed[name] = alpha * value + (1.0 - alpha) * base_state[name]
    out = LatentAdapter(tuned.config)
    out.load_state_dict(mixed, strict=True)
    out.config.training = {
        **tuned.config.training,
        "interpolated": {"alpha": alpha, "tuned": tuned.config.training.get("out", ""), "recipe": "WiSE-FT"},
    }
    return out.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tuned", help="the fine-tuned adapter directory (its config is kept)")
    p.add_argument("base", help="the adapter it was fine-tuned from")
    p.add_argument("--alpha", type=float, required=True, help="weight of the tuned adapter, in [0, 1]")
    p.add_argument("--out", required=True, help="directory to write the interpolated adapter to")
    args = p.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"--alpha must be in [0, 1], not {args.alpha}")
    tuned, base = LatentAdapter.from_pretrained(args.tuned), LatentAdapter.from_pretrained(args.base)
    interpolate(tuned, base, args.alpha).save_pretrained(args.out, dtype=torch.bfloat16)
    print(f"saved alpha={args.alpha} to {args.out}")


if __name__ == "__main__":
    main()
