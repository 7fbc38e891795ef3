"""`lcflow bench transport` end to end with tiny payloads: every stage measured, JSON complete."""

from __future__ import annotations

import json

from lcflow.bench.transport import STAGES
from lcflow.cli import main


def test_bench_transport_writes_every_stage(tmp_path, capsys):
    out = tmp_path / "transport.json"
    args = ["bench", "transport", "--tokens", "8", "--dtype", "bfloat16", "float16", "--layers", "2"]
    args += ["--quantize", "none", "int4"]
    assert main([*args, "--width", "16", "--lcfx-slots", "4", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["platform"]
    cases = {(r["mode"], r["tokens"], r["dtype"], r["quantize"]) for r in report["results"]}
    assert cases == {
        (m, t, d, q)
        for m, t in (("lcf", 8), ("lcfx", 4))
        for d in ("bfloat16", "float16")
        for q in ("none", "int4")
    }
    for result in report["results"]:
        assert set(result["stages"]) == set(STAGES)
        for stage in result["stages"].values():
            assert stage["ms"] > 0 and stage["mb_s"] > 0
        # 2 layers x [1, T, 16] latents, plus int32 [T, 2] token spans for LCF
        expected = 2 * result["tokens"] * 16 * 2 + (
            result["tokens"] * 2 * 4 if result["mode"] == "lcf" else 0
        )
        assert result["raw_bytes"] == expected and result["wire_bytes"] > 0
        assert result["transport_overhead_ms"] > 0 and result["transport_vs_raw_grpc"] > 0
    assert "end-to-end" in capsys.readouterr().out
