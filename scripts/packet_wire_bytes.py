"""Bytes on the wire of the shipped Gemma3 LCF-X packets on real samples, frames included: the
full-width packet in bf16 and the compressed one (gemma3-to-gemma3-lcfx-compressed) through its
card's codec, each with and without zstd (the writer the sharer service streams with).

    python scripts/packet_wire_bytes.py docs/results/compressed-packet/wire-bytes.json
"""

import json
import statistics
import sys

import torch

from lcflow.adapter import LatentAdapter
from lcflow.handoff.pair import Sharer, receiver_view
from lcflow.provision.loading import load_pair
from lcflow.tasks import get_task, question_prompt
from lcflow.transport import CodecConfig, LatentPacket, PacketWriter, packet_messages


def main(out_path: str) -> None:
    torch.set_num_threads(2)
    (ms, ts), _ = load_pair("gemma3-270m", "gemma3-270m", "cpu")
    samples = get_task("facts-cross").samples("test", 20, seed=0)
    out = {}
    for name, quant in [
        ("gemma3-to-gemma3-lcfx", "none"),
        ("gemma3-to-gemma3-lcfx-compressed", "int4-hadamard-g32"),
    ]:
        adapter = LatentAdapter.from_pretrained(f"adapters/{name}")
        sharer = Sharer(ms, ts, adapter.encoder, adapter.config)
        for codec in ("none", "zstd"):
            totals = []
            for s in samples:
                with torch.inference_mode():
                    prompt = question_prompt(s.question)
                    lat = sharer.encode(
                        sharer.prefill(s.sharer_context),
                        receiver_view(s.receiver_context, prompt),
                        question=prompt,
                    )
                tensors = {t: {"latent": z.to(torch.bfloat16).contiguous()} for t, z in lat.layers.items()}
                packet = LatentPacket("lcfx", "a", "s", "r", list(tensors), tensors)
                writer = PacketWriter.for_packet(packet, CodecConfig(name=codec, quantization=quant))
                for _ in packet_messages(packet, writer=writer):
                    pass
                totals.append((writer.stats.bytes_raw, writer.stats.bytes_wire))
            out[f"{name} {quant}/{codec}"] = {
                "raw_median": statistics.median(r for r, _ in totals),
                "wire_median": statistics.median(b for _, b in totals),
                "wire_mean": sum(b for _, b in totals) / len(totals),
            }
            print(name, quant, codec, out[f"{name} {quant}/{codec}"], flush=True)
    json.dump(
        {"samples": "facts-cross test seed 0, first 20", "machine": "2-core CPU dev machine", "packets": out},
        open(out_path, "w"),
        indent=2,
    )


if __name__ == "__main__":
    main(sys.argv[1])
