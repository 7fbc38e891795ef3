"""How far a narrowed span adapter's K/V rows are from its teacher's, row by row, on test samples.

    python scripts/narrowing_error.py adapters/gemma3-to-gemma3-lcfx runs/narrow/b128 \
        --task facts-cross --n 40 --out docs/results/compressed-packet/row-error-b128.json

Runs the teacher's sharer half over `--n` test samples as a handoff does (lcflow.training.narrow.
packet_rows) and decodes every packet row twice: through the teacher (the K/V the receiver gets at
full width) and through the narrowed adapter. Per receiver layer it reports, for keys and values
apart, the error of a row relative to that row's distance from the mean row,

    rel(row) = |y_narrow - y_full| / |y_full - mean(y_full)|

(its mean, median and 90th percentile over rows), so an average over rows cannot hide that each
row is rebuilt only roughly. The narrowed encoder is E' = E M for the teacher's E (both halves
share mu_x), so its row is z' = z M with M solved by least squares from E and E'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcflow.adapter import LatentAdapter  # noqa: E402
from lcflow.provision.loading import load_model_and_tokenizer  # noqa: E402
from lcflow.tasks import get_task  # noqa: E402
from lcflow.training.narrow import packet_rows  # noqa: E402


def relative_errors(full: torch.Tensor, narrow: torch.Tensor) -> dict[str, float]:
    """Mean, median and 90th percentile of |narrow - full| / |full - mean(full)| over rows."""
    rel = (narrow - full).norm(dim=1) / (full - full.mean(0)).norm(dim=1).clamp_min(1e-6)
    return {
        "mean": round(float(rel.mean()), 4),
        "median": round(float(rel.median()), 4),
        "p90": round(float(rel.quantile(0.9)), 4),
    }


def layer_errors(teacher: LatentAdapter, student: LatentAdapter, z: torch.Tensor, layer: int) -> dict:
    """Keys' and values' relative row errors of one receiver layer, from the teacher's rows z."""
    key = str(layer)
    encoder = teacher.encoder.proj[key].double()
    mapping = torch.linalg.lstsq(encoder, student.encoder.proj[key].double()).solution  # E' = E M
    z = z.double()
    full = teacher.decoder.mu[key].double() + z @ teacher.decoder.proj[key].double()
    narrow = student.decoder.mu[key].double() + (z @ mapping) @ student.decoder.proj[key].double()
    width = full.shape[1] // 2
    return {
        "keys": relative_errors(full[:, :width], narrow[:, :width]),
        "values": relative_errors(full[:, width:], narrow[:, width:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("teacher", help="the full-width span adapter")
    parser.add_argument("narrowed", nargs="+", help="adapters narrowed from it (lcflow compress)")
    parser.add_argument("--task", default="facts-cross", help="task whose test split supplies the samples")
    parser.add_argument("--n", type=int, default=40, help="test samples")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    teacher = LatentAdapter.from_pretrained(args.teacher)
    pair = load_model_and_tokenizer(teacher.config.sharer.name, "cpu")
    samples = get_task(args.task).samples("test", args.n, seed=0)
    rows = packet_rows(teacher, pair, samples)
    report = {"teacher": args.teacher, "task": args.task, "split": "test", "n": len(samples), "adapters": {}}
    for path in args.narrowed:
        student = LatentAdapter.from_pretrained(path)
        per_layer = {t: layer_errors(teacher, student, rows[t], t) for t in student.config.retained_layers}
        mean = {
            half: round(sum(e[half]["mean"] for e in per_layer.values()) / len(per_layer), 4)
            for half in ("keys", "values")
        }
        report["adapters"][path] = {
            "bottleneck": student.config.bottleneck,
            "metric": student.config.training.get("metric", "variance"),
            "mean_over_layers": mean,
            "per_layer": per_layer,
        }
        keys, values = mean["keys"], mean["values"]
        print(f"{path}: mean relative row error over layers: keys {keys:.3f}, values {values:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
