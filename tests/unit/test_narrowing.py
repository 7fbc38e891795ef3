"""The compressed span packet: a full-width span adapter narrowed to b numbers a row in closed
form (lcflow.packets.narrowing, lcflow.training.narrow, `lcflow compress`)."""

import dataclasses

import pytest
import torch
from helpers import same_model_alignment, span_adapter

from lcflow.handoff.pair import Receiver, Sharer
from lcflow.packets.narrowing import narrow_map, receiver_metric
from lcflow.tasks import QASample, question_prompt
from lcflow.training.narrow import narrowed_adapter, packet_rows, receiver_metrics


def low_rank_map(rank: int, width_in=10, width=12, kv=8, rows=40, seed=0):
    """Sharer features x of `rank` directions (plus an offset), and a random full-width map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, rank, generator=g) @ torch.randn(rank, width_in, generator=g)
    x = x + torch.randn(width_in, generator=g)
    e, d = torch.randn(width_in, width, generator=g), torch.randn(width, kv, generator=g)
    return x, e, d, torch.randn(kv, generator=g)


def rebuilt(x, fitted):
    """The receiver's K/V from the narrowed halves: mu_y' + (x E') D'."""
    return fitted.mu_y + (x @ fitted.encoder) @ fitted.decoder


def test_rows_of_rank_b_are_rebuilt_exactly_through_b_numbers():
    x, e, d, mu = low_rank_map(rank=3)
    fitted = narrow_map(x @ e, e, d, mu, bottleneck=3)
    assert fitted.encoder.shape == (10, 3) and fitted.decoder.shape == (3, 8)
    torch.testing.assert_close(rebuilt(x, fitted), mu + x @ e @ d, rtol=1e-4, atol=1e-4)
    assert fitted.kept_k == pytest.approx(1.0, abs=1e-6) and fitted.kept_v == pytest.approx(1.0, abs=1e-6)


def test_a_narrower_packet_keeps_less_and_the_full_width_keeps_all():
    x, e, d, mu = low_rank_map(rank=10)
    kept = [narrow_map(x @ e, e, d, mu, b) for b in (2, 4, 8)]
    shares = [f.kept_k + f.kept_v for f in kept]
    assert shares[0] < shares[1] < shares[2] and 0 < shares[0]
    torch.testing.assert_close(rebuilt(x, kept[2]), mu + x @ e @ d, rtol=1e-4, atol=1e-4)


def test_weighting_keys_and_values_alike_stops_large_keys_taking_every_direction():
    x, e, d, mu = low_rank_map(rank=10)
    d = d.clone()
    d[:, :4] *= 100  # keys a hundred times the values' scale, as raw keys' outlier channels are
    raw = narrow_map(x @ e, e, d, mu, 3, balance=False)
    balanced = narrow_map(x @ e, e, d, mu, 3, balance=True)
    assert balanced.kept_v > raw.kept_v + 0.1
    assert raw.kept_k > balanced.kept_k  # the price: the keys keep less


def test_too_few_rows_or_a_bottleneck_wider_than_the_packet_is_refused():
    x, e, d, mu = low_rank_map(rank=3, rows=4)
    with pytest.raises(ValueError, match="more samples"):
        narrow_map(x @ e, e, d, mu, bottleneck=6)
    with pytest.raises(ValueError, match="bottleneck must be"):
        narrow_map(x @ e, e, d, mu, bottleneck=9)


SAMPLES = [
    QASample(
        f"s{i}",
        f"Mira Volkov lives in Oslo. Lior Senn plays the violin. Ada Brook bakes bread {i} times a week.",
        "Lior Senn owns a cat.",
        question,
        ["Oslo"],
        "t",
        False,
    )
    for i, question in enumerate(["Where does Mira Volkov live?", "What does Lior Senn play?"] * 3)
]


@torch.no_grad()
def test_a_narrowed_adapter_sends_b_numbers_a_row_and_rebuilds_the_teachers_kv(tiny_pair):
    _, receiver = tiny_pair
    teacher = span_adapter(receiver, receiver, same_model_alignment(receiver, bottleneck=64), slots=12)
    width = teacher.config.bottleneck
    rows = packet_rows(teacher, receiver, SAMPLES)
    assert set(rows) == set(teacher.config.retained_layers)
    student, kept = narrowed_adapter(teacher, rows, bottleneck=width // 2)
    assert student.config.bottleneck == width // 2 and set(kept) == set(teacher.config.retained_layers)
    assert all(0 < k <= 1 and 0 < v <= 1 for k, v in kept.values())
    sharers = [Sharer(*receiver, a.encoder, a.config) for a in (teacher, student)]
    receivers = [Receiver(*receiver, a.decoder, a.config) for a in (teacher, student)]
    prompt = question_prompt(SAMPLES[0].question)
    packets = [s.encode(s.prefill(SAMPLES[0].sharer_context), question=prompt) for s in sharers]
    assert all(z.shape[-1] == width // 2 for z in packets[1].layers.values())
    assert packets[1].num_bytes() * 2 == packets[0].num_bytes()
    # The K/V the receiver writes: close to the teacher's, as close as the variance kept says.
    (k_full, v_full), (k_narrow, v_narrow) = (
        r.decoder.entries(p.layers) for r, p in zip(receivers, packets, strict=True)
    )
    for t, (full, narrow) in enumerate(zip(v_full, v_narrow, strict=True)):
        centred = full - full.mean(dim=2, keepdim=True)
        error = (full - narrow).pow(2).sum() / centred.pow(2).sum()
        assert error < 1 - kept[t][1] + 0.1, (t, error, kept[t])
    with pytest.raises(ValueError, match="not narrower"):
        narrowed_adapter(teacher, rows, bottleneck=width)


def test_compress_writes_one_adapter_per_width_from_one_pass(tiny_dir, capsys, tmp_path):
    from lcflow.adapter import LatentAdapter
    from lcflow.cli import main
    from lcflow.testing.tiny import load_tiny

    directory = tiny_dir("gemma3", 400, 2)
    receiver = load_tiny(directory)
    teacher = span_adapter(receiver, receiver, same_model_alignment(receiver, bottleneck=64), slots=12)
    named = dataclasses.replace(teacher.config.sharer, name=str(directory))  # loadable by name
    teacher.config.sharer = teacher.config.receiver = named
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "narrow"
    args = ["compress", str(tmp_path / "teacher"), "--bottleneck", "8", "32", "--out", str(out)]
    assert main([*args, "--task", "facts-cross", "--samples", "3"]) == 0
    for width in (8, 32):
        narrowed = LatentAdapter.from_pretrained(out / f"b{width}")
        assert narrowed.config.bottleneck == width and narrowed.config.packet == "spans"
        assert narrowed.config.training["narrowed_from"] == str(tmp_path / "teacher")
        assert narrowed.config.selection == teacher.config.selection
    assert "b=8: mean kept" in capsys.readouterr().out
    assert narrowed.config.training["metric"] == "variance"
    # in the receiver's metric: other directions, recorded as such
    args = ["compress", str(tmp_path / "teacher"), "--bottleneck", "32", "--out", str(tmp_path / "recv")]
    assert main([*args, "--task", "facts-cross", "--samples", "3", "--metric", "receiver"]) == 0
    in_metric = LatentAdapter.from_pretrained(tmp_path / "recv")
    assert in_metric.config.training["metric"] == "receiver"
    assert not torch.allclose(in_metric.decoder.proj["0"].float(), narrowed.decoder.proj["0"].float())


def test_the_narrowed_encoder_keeps_the_teachers_scale():
    """Balanced weights keep the K/V's overall scale: the new encoder's weights are of the size
    of E D V_b (an orthonormal V_b), not shrunk by the variance (which made distillation's first
    steps overshoot)."""
    x, e, d, mu = low_rank_map(rank=10)
    d = d.clone()
    d[:, :4] *= 30
    raw = narrow_map(x @ e, e, d, mu, 6, balance=False)
    balanced = narrow_map(x @ e, e, d, mu, 6, balance=True)
    ratio = balanced.encoder.norm() / raw.encoder.norm()
    assert 0.1 < ratio < 10, ratio


def test_the_receiver_metric_squares_to_the_query_moment_and_the_output_projections_gram():
    head_dim, kv_heads, heads, hidden = 4, 2, 4, 6
    g = torch.Generator().manual_seed(0)
    u = torch.randn(kv_heads, 50, head_dim, generator=g)
    moment = u.transpose(1, 2) @ u / 50  # E[u u^T] per kv head
    out_proj = torch.randn(hidden, heads * head_dim, generator=g)
    a = receiver_metric(moment, out_proj, head_dim)
    width = kv_heads * head_dim
    w_o = out_proj.double().reshape(hidden, heads, head_dim)
    for kv in range(kv_heads):
        keys = slice(kv * head_dim, (kv + 1) * head_dim)
        values = slice(width + kv * head_dim, width + (kv + 1) * head_dim)
        torch.testing.assert_close(a[keys, keys] @ a[keys, keys], moment[kv].double())
        reading = w_o[:, 2 * kv : 2 * kv + 2].reshape(-1, head_dim)  # the two query heads of this kv head
        torch.testing.assert_close(a[values, values] @ a[values, values], reading.T @ reading)
    block = torch.block_diag(*(a[i : i + head_dim, i : i + head_dim] for i in range(0, 2 * width, head_dim)))
    torch.testing.assert_close(a, block)  # nothing across kv heads or across keys and values


def test_narrowing_in_the_receiver_metric_keeps_the_logits_the_variance_metric_loses():
    """Keys that vary most in channels no query reads: the variance narrowing spends its
    directions there; the receiver's keeps the channels the queries read, so q . k survives."""
    x, e, d, mu = low_rank_map(rank=10, kv=8)  # one kv head of width 4: keys 0-3, values 4-7
    d = d.clone()
    d[:, [0, 2]] *= 20  # loud key channels that no query reads
    moment = torch.diag(torch.tensor([0.0, 1.0, 0.0, 1.0]))[None]  # queries read channels 1 and 3
    metric = receiver_metric(moment, torch.eye(4), head_dim=4)
    full = (x @ e @ d)[:, :4]
    variance = narrow_map(x @ e, e, d, mu, 3)
    receiver = narrow_map(x @ e, e, d, mu, 3, metric=metric)
    read = [1, 3]
    errors = [((rebuilt(x, f)[:, :4] - mu[:4] - full)[:, read]).pow(2).mean() for f in (variance, receiver)]
    assert errors[1] < errors[0] / 10, errors


@pytest.mark.parametrize("family", ["gemma3", "llama"])
@torch.no_grad()
def test_the_receiver_metric_of_a_model_costs_a_key_error_as_its_logits_move(tiny_dir, family):
    """dk^T A_k^2 dk equals the squared move of the logits of the receiver's tail queries (its own
    RoPE at their absolute positions) on packet rows at the slots' positions, summed over the
    query heads and averaged over queries and rows."""
    from lcflow.core.kv import RopeCodec
    from lcflow.packets.placement import slot_layout
    from lcflow.packets.selection import capture_queries
    from lcflow.tasks import format_question_prompt
    from lcflow.testing.tiny import load_tiny

    model, tokenizer = load_tiny(tiny_dir(family, 400, 2))
    slots, samples = 3, SAMPLES[:2]
    metrics = receiver_metrics((model, tokenizer), samples, slots)
    config, rope = model.config, RopeCodec(model)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    dk = torch.randn(kv_heads, head_dim, generator=torch.Generator().manual_seed(3))
    for layer in range(config.num_hidden_layers):
        keys = metrics[layer][: kv_heads * head_dim, : kv_heads * head_dim]
        predicted = float(dk.reshape(-1).double() @ keys @ keys @ dk.reshape(-1).double())
        moves = []
        for sample in samples:
            layout = slot_layout(
                tokenizer, format_question_prompt(sample, include_context=False), sample.receiver_context
            )
            ids = torch.cat([layout.head_ids, layout.tail_ids], dim=1)
            with capture_queries(model, config.num_hidden_layers) as queries:
                model.model(input_ids=ids)
            tail, head = layout.tail_ids.shape[1], layout.head_tokens
            q = queries[layer][:, :, -tail:].float()
            q_rot = rope.rotate(q, torch.arange(head + slots, head + slots + tail)[None], layer)
            rows = dk[None, :, None, :].expand(1, kv_heads, slots, head_dim)
            dk_rot = rope.rotate(rows, torch.arange(head, head + slots)[None], layer)  # [1, kv, slots, D]
            dk_rot = dk_rot.repeat_interleave(heads // kv_heads, dim=1)  # the kv head each query head reads
            moves.append((q_rot @ dk_rot.transpose(2, 3)).pow(2).reshape(-1))
        # summed over the query heads, averaged over queries and rows
        assert predicted == pytest.approx(float(torch.cat(moves).mean()) * heads, rel=1e-3), layer


@torch.no_grad()
def test_the_row_error_script_measures_a_narrower_packet_as_further_off(tiny_pair):
    """scripts/narrowing_error.py: relative row errors from the teacher's own rows, larger for a
    narrower packet and zero for a row rebuilt exactly."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "narrowing_error.py"
    spec = importlib.util.spec_from_file_location("narrowing_error", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, receiver = tiny_pair
    teacher = span_adapter(receiver, receiver, same_model_alignment(receiver, bottleneck=64), slots=12)
    rows = packet_rows(teacher, receiver, SAMPLES)
    errors = {}
    for width in (4, 32):
        student, _ = narrowed_adapter(teacher, rows, bottleneck=width)
        errors[width] = script.layer_errors(teacher, student, rows[0], 0)
    assert errors[4]["values"]["mean"] > errors[32]["values"]["mean"] >= 0
    assert errors[4]["keys"]["mean"] > errors[32]["keys"]["mean"] >= 0
    same = torch.randn(6, 8)
    assert script.relative_errors(same, same) == {"mean": 0.0, "median": 0.0, "p90": 0.0}
