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


def test_the_receiver_metric_weighs_keys_by_rope_plane_query_energy_and_values_by_the_output_projection():
    head_dim, kv_heads, heads, hidden = 4, 2, 4, 6
    energy = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 9.0, 9.0]])  # planes (0, 2) and (1, 3)
    g = torch.Generator().manual_seed(0)
    out_proj = torch.randn(hidden, heads * head_dim, generator=g)
    a = receiver_metric(energy, out_proj, head_dim)
    keys = a[: kv_heads * head_dim, : kv_heads * head_dim]
    # each RoPE plane gets the mean of its two channels' energy; a plane nobody reads, the floor
    expected = torch.tensor([2.0, 9e-6, 2.0, 9e-6, 5.0, 5.0, 5.0, 5.0]).sqrt().double()
    torch.testing.assert_close(torch.diagonal(keys), expected)
    assert torch.count_nonzero(keys - torch.diag(torch.diagonal(keys))) == 0
    # values of kv head 1: A_v^2 = sum over its two query heads of W_o,h^T W_o,h
    w = out_proj.double().reshape(hidden, heads, head_dim)[:, 2:].reshape(-1, head_dim)
    values = a[kv_heads * head_dim + head_dim :, kv_heads * head_dim + head_dim :]
    torch.testing.assert_close(values @ values, w.T @ w)
    assert torch.count_nonzero(a[: kv_heads * head_dim, kv_heads * head_dim :]) == 0


def test_narrowing_in_the_receiver_metric_keeps_the_logits_the_variance_metric_loses():
    """Keys that vary most in channels no query reads: the variance narrowing spends its
    directions there; the receiver's keeps the channels the queries read, so q . k survives."""
    x, e, d, mu = low_rank_map(rank=10, kv=8)  # one kv head of width 4: keys 0-3, values 4-7
    d = d.clone()
    d[:, [0, 2]] *= 20  # RoPE pairs (0, 2) and (1, 3); the loud plane (0, 2) is one no query reads
    energy = torch.tensor([[0.0, 1.0, 0.0, 1.0]])  # queries read only the plane (1, 3)
    metric = receiver_metric(energy, torch.eye(4), head_dim=4)
    full = (x @ e @ d)[:, :4]
    variance = narrow_map(x @ e, e, d, mu, 3)
    receiver = narrow_map(x @ e, e, d, mu, 3, metric=metric)
    read = [1, 3]
    errors = [((rebuilt(x, f)[:, :4] - mu[:4] - full)[:, read]).pow(2).mean() for f in (variance, receiver)]
    assert errors[1] < errors[0] / 10, errors


def test_receiver_metrics_of_a_model_are_one_invertible_metric_per_layer(tiny_pair):
    _, receiver = tiny_pair
    metrics = receiver_metrics(receiver, SAMPLES[:2])
    model = receiver[0]
    spec_width = 2 * model.config.num_key_value_heads * model.config.head_dim
    assert sorted(metrics) == list(range(model.config.num_hidden_layers))
    for a in metrics.values():
        assert a.shape == (spec_width, spec_width) and torch.isfinite(torch.linalg.inv(a)).all()


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
