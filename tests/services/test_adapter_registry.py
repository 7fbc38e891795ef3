"""Many adapters per service (lcflow.serving.registry): one sharer and one receiver started with
--adapters DIR serve every adapter in it that fits their models, chosen per request by name or
by mode; adapters load on first use and are evicted least recently used under a memory bound,
never while a handoff holds them; ListAdapters and `lcflow adapters` show them all, unusable
ones with the reason. Tiny random models and adapters only."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct

import grpc
import pytest
import torch
from helpers import tiny_adapter_dir, tiny_c2c_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import handoff_outcome, running_services

from lcflow.adapter import LatentAdapter
from lcflow.cli import main
from lcflow.client import HandoffClient
from lcflow.commands.preflight import check_adapter_directory
from lcflow.core.errors import UsageError
from lcflow.core.kv import model_identity
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.adapter_names import identity_hash
from lcflow.serving.config import ServiceConfig, add_service_flags, config_from_args
from lcflow.serving.inspection import inspect_adapter, safetensors_parameters
from lcflow.serving.loading import ReceiverEngine
from lcflow.serving.registry import AdapterRegistry
from lcflow.serving.server import ServiceError

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin."
PROMPT = "Where does Mira Volkov live?"


def identities(tiny_pair):
    (ms, ts), (mr, tr) = tiny_pair
    return model_identity(ms, ts), model_identity(mr, tr)


def truncate_weights(directory) -> None:
    """Keep each weight file's header (so it lists as usable) but cut its data short."""
    for path in directory.glob("*.safetensors"):
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[: 8 + length + 4])


@pytest.fixture(scope="module")
def layout(tiny_pair, tmp_path_factory):
    """An adapter directory as adapters/ is laid out, with every kind of entry:

    a-lcfx            LCF-X, the default (--adapter a-lcfx), with a model card
    b-lcfx            LCF-X, another one (b=8)
    c-lcf             LCF
    d-c2c             C2C, served (the sharer's RoPE recorded)
    e-c2c-old         C2C trained before C2C was served (no sharer RoPE): usable on the sharer only
    aa-lcf-elsewhere  LCF for this sharer but another receiver model: usable on the sharer only
    other-models      LCF for the pair the other way round: usable on neither
    broken            adapter_config.json is not JSON
    damaged           c-lcf's config, weights cut short: listed usable until loading fails
    escape            a symlink out of the directory
    notes             a directory without adapter_config.json: not an adapter, not listed
    """
    sharer_id, receiver_id = identities(tiny_pair)
    base = tmp_path_factory.mktemp("adapters-layout")
    root = base / "adapters"
    tiny_adapter_dir(tiny_pair, root / "a-lcfx", "lcfx")
    (root / "a-lcfx" / "model_card.json").write_text(
        json.dumps(
            {
                "eval": {"method": "lcfx", "task": "facts-cross", "split": "test"},
                "results": {"lcfx": {"em": 0.5}, "text": {"em": 0.1}},
            }
        )
    )
    torch.manual_seed(1)
    LatentAdapter.for_models("lcfx", sharer_id, receiver_id, bottleneck=8, slots=4).save_pretrained(
        root / "b-lcfx"
    )
    tiny_adapter_dir(tiny_pair, root / "c-lcf", "lcf")
    tiny_c2c_adapter_dir(tiny_pair, root / "d-c2c")
    tiny_c2c_adapter_dir(tiny_pair, root / "e-c2c-old", with_rope=False)
    elsewhere = dataclasses.replace(receiver_id, config_hash="f" * 64)
    LatentAdapter.for_models("lcf", sharer_id, elsewhere, bottleneck=16).save_pretrained(
        root / "aa-lcf-elsewhere"
    )
    LatentAdapter.for_models("lcf", receiver_id, sharer_id, bottleneck=16).save_pretrained(
        root / "other-models"
    )
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    shutil.copytree(root / "c-lcf", root / "damaged")
    truncate_weights(root / "damaged")
    tiny_adapter_dir(tiny_pair, base / "outside", "lcf")
    (root / "escape").symlink_to(base / "outside")
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("not an adapter")
    return root


@pytest.fixture(scope="module")
def spans():
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def services(tiny_pair, layout, spans):
    both = {"adapters": str(layout), "adapter": "a-lcfx"}
    with running_services(tiny_pair, str(layout / "a-lcfx"), spans, sharer=both, receiver=both) as running:
        with HandoffClient(running.sharer, timeout_s=60) as client:
            running.client = client
            yield running


def handoff(services, mode: str, adapter: str = ""):
    """(status, summary or details) of one handoff."""
    return handoff_outcome(services.client, mode, adapter)


def receiver_listing(services) -> pb.ListAdaptersResponse:
    with grpc.insecure_channel(services.receiver) as channel:
        return pb_grpc.ReceiverStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=30)


def by_name(response: pb.ListAdaptersResponse) -> dict[str, pb.AdapterInfo]:
    return {info.name: info for info in response.adapters}


# --- naming, and the default by mode --------------------------------------------------------------


def test_a_request_names_its_adapter_on_both_services(services):
    code, summary = handoff(services, "lcfx", "b-lcfx")
    assert code == grpc.StatusCode.OK, summary
    assert summary.adapter == "b-lcfx" and summary.bytes_wire > 0
    assert by_name(services.client.list_adapters())["b-lcfx"].loaded  # loaded on first use
    assert by_name(receiver_listing(services))["b-lcfx"].loaded
    code, summary = handoff(services, "lcf", "c-lcf")
    assert code == grpc.StatusCode.OK and summary.adapter == "c-lcf" and summary.mode == pb.LCF
    code, summary = handoff(services, "c2c", "d-c2c")
    assert code == grpc.StatusCode.OK and summary.adapter == "d-c2c" and summary.mode == pb.C2C
    assert summary.bytes_raw > 0  # the sharer's KV travelled


def test_without_a_name_the_mode_picks_the_adapter_and_says_which(services, spans):
    spans.clear()
    # LCF-X: the default (--adapter a-lcfx) has that mode
    code, summary = handoff(services, "lcfx")
    assert code == grpc.StatusCode.OK and summary.adapter == "a-lcfx"
    # LCF: the first usable LCF adapter by name that fits both models: aa-lcf-elsewhere comes
    # first but was made for another receiver model (the sharer asked the receiver's ListAdapters)
    code, lcf = handoff(services, "lcf")
    assert code == grpc.StatusCode.OK, lcf
    assert lcf.adapter == "c-lcf"
    # C2C: the first by name (d-c2c; e-c2c-old cannot be served by this receiver)
    code, c2c = handoff(services, "c2c")
    assert code == grpc.StatusCode.OK and c2c.adapter == "d-c2c", c2c
    # TEXT and NONE need none
    for mode in ("text", "none"):
        code, plain = handoff(services, mode)
        assert code == grpc.StatusCode.OK and plain.adapter == ""
    # the trace says which adapter ran, and how it was chosen, on both services
    chosen = {}
    for span in spans.get_finished_spans():
        if "lcflow.adapter.chosen_by" in span.attributes:
            key = (span.resource.attributes["service.name"], format(span.context.trace_id, "032x"))
            chosen[key] = (span.attributes["lcflow.adapter"], span.attributes["lcflow.adapter.chosen_by"])
    assert chosen[("lcflow-sharer", summary.trace_id)] == ("a-lcfx", "default")
    assert chosen[("lcflow-sharer", lcf.trace_id)] == ("c-lcf", "mode")
    assert chosen[("lcflow-receiver", lcf.trace_id)] == ("c-lcf", "request")  # by the name sent on
    streams = [s for s in spans.get_finished_spans() if s.name == "sharer.stream"]
    assert {s.attributes["lcflow.adapter"] for s in streams} == {"a-lcfx", "c-lcf", "d-c2c"}
    assert chosen[("lcflow-sharer", c2c.trace_id)] == ("d-c2c", "mode")


# --- names that are refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, says",
    [
        ("../outside", "not a plain name"),
        ("/etc", "not a plain name"),
        ("c-lcf/../../outside", "not a plain name"),
        ("..", "not a plain name"),
        (".hidden", "not a plain name"),
        ("escape", "resolves outside the adapter directory"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "parent", "dotfile", "symlink-out"],
)
def test_names_leading_out_of_the_directory_are_invalid(services, name, says):
    code, details = handoff(services, "lcf", name)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details


def test_an_unknown_name_is_not_found_and_names_the_available_ones(services):
    code, details = handoff(services, "lcfx", "nope")
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert "no adapter 'nope'" in details
    assert all(name in details for name in ("a-lcfx", "b-lcfx", "c-lcf"))
    assert "notes" not in details  # not an adapter


@pytest.mark.parametrize(
    "name, mode, says",
    [
        ("other-models", "lcf", "this adapter's sharer is"),
        ("broken", "lcf", "adapter_config.json cannot be used"),
        ("aa-lcf-elsewhere", "lcf", "this adapter's receiver is"),  # the receiver refuses it
        ("b-lcfx", "lcf", "is a lcfx adapter but the request asks for lcf"),
        ("e-c2c-old", "c2c", "sharer_rope"),  # the receiver refuses it, saying how to fix it
    ],
)
def test_an_adapter_that_does_not_fit_is_failed_precondition(services, name, mode, says):
    code, details = handoff(services, mode, name)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and says in details, details
    assert handoff(services, "lcfx")[0] == grpc.StatusCode.OK  # still serves


def test_an_adapter_that_fails_to_load_is_then_listed_unusable(services):
    assert by_name(services.client.list_adapters())["damaged"].usable  # its headers look fine
    code, details = handoff(services, "lcf", "damaged")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "loading it failed" in details, details
    damaged = by_name(services.client.list_adapters())["damaged"]
    assert not damaged.usable and not damaged.loaded and "loading it failed" in damaged.reason
    assert handoff(services, "lcf", "c-lcf")[0] == grpc.StatusCode.OK


def test_a_bad_directory_is_listed_with_its_reason_never_raised(tiny_pair, layout, tmp_path):
    sharer_id, _ = identities(tiny_pair)
    cases = {
        "list-config": ("[1, 2]", None, "adapter_config.json cannot be used"),
        "bad-weights": (None, b"\xff" * 16, "weights cannot be read"),
        "no-encoder": (None, None, "it has no encoder.safetensors, the half a sharer loads"),
    }
    for name, (config, weights, says) in cases.items():
        directory = tmp_path / name
        shutil.copytree(layout / "c-lcf", directory)
        if config is not None:
            (directory / "adapter_config.json").write_text(config)
        if weights is not None:
            (directory / "encoder.safetensors").write_bytes(weights)
        if name == "no-encoder":
            (directory / "encoder.safetensors").unlink()
        info = inspect_adapter(directory, name, "sharer", sharer_id)
        assert not info.usable and says in info.reason, info.reason


# --- ListAdapters and `lcflow adapters` -----------------------------------------------------------


def test_list_adapters_on_both_services(services, tiny_pair, layout):
    sharer_id, receiver_id = identities(tiny_pair)
    for response, role, own in (
        (services.client.list_adapters(), "sharer", sharer_id),
        (receiver_listing(services), "receiver", receiver_id),
    ):
        assert response.role == role and response.default_adapter == "a-lcfx"
        assert response.model.hash == identity_hash(own)
        assert response.memory_limit_bytes == 512 << 20 and 0 < response.memory_used_bytes
        assert response.adapters[0].name == "a-lcfx"  # the default first, then by name
        listed = by_name(response)
        assert set(listed) == {
            "a-lcfx",
            "aa-lcf-elsewhere",
            "b-lcfx",
            "broken",
            "c-lcf",
            "d-c2c",
            "e-c2c-old",
            "damaged",
            "escape",
            "other-models",
        }
        default = listed["a-lcfx"]
        assert default.is_default and default.loaded and default.usable and default.mode == "lcfx"
        assert default.sharer.hash == identity_hash(sharer_id)
        assert default.receiver.hash == identity_hash(receiver_id)
        files = sorted((layout / "a-lcfx").glob("*.safetensors"))
        assert default.size_bytes == sum(f.stat().st_size for f in files)
        assert default.parameters == sum(safetensors_parameters(f) for f in files) > 0
        assert default.HasField("card_em") and default.card_em == pytest.approx(0.5)
        assert default.card_task == "facts-cross/test"  # what that EM measured
        assert not listed["c-lcf"].HasField("card_em") and listed["c-lcf"].mode == "lcf"
        assert "this adapter's" in listed["other-models"].reason and not listed["other-models"].usable
        assert "cannot be used" in listed["broken"].reason and listed["broken"].mode == ""
        assert "outside the adapter directory" in listed["escape"].reason
        assert listed["d-c2c"].usable and listed["d-c2c"].mode == "c2c"
        old = listed["e-c2c-old"]
        assert old.usable == (role == "sharer")  # the sharer loads no weights and needs no RoPE
        assert role == "sharer" or "sharer_rope" in old.reason
        elsewhere = listed["aa-lcf-elsewhere"]
        assert elsewhere.usable == (role == "sharer")  # made for this sharer, another receiver


def test_lcflow_adapters_prints_both_tables(services, capsys):
    assert main(["adapters", "--sharer", services.sharer, "--receiver", services.receiver]) == 0
    out = capsys.readouterr().out
    sharer, receiver = out.split("\n\n")
    assert sharer.startswith(f"sharer {services.sharer}: model llama-300-3@")
    assert receiver.startswith(f"receiver {services.receiver}: model gemma3-400-2@")
    assert "of 512.0 MB" in sharer.splitlines()[0]
    assert "default adapter a-lcfx, 10 adapter(s)" in sharer
    for table in (sharer, receiver):
        lines = table.splitlines()
        assert lines[1].split() == [
            "name",
            "mode",
            "sharer",
            "receiver",
            "params",
            "size",
            "card",
            "EM",
            "(task)",
            "loaded",
            "usable",
        ]
        default = next(line for line in lines if " a-lcfx " in line)
        assert (
            default.lstrip().startswith("* a-lcfx")
            and "0.500 (facts-cross/test)" in default
            and default.endswith("yes")
        )
        assert any(" other-models " in line and "no: this adapter's" in line for line in lines)
    elsewhere = [line for line in out.splitlines() if " aa-lcf-elsewhere " in line]
    assert elsewhere[0].endswith("yes") and "no: this adapter's receiver is" in elsewhere[1]


def test_lcflow_adapters_reports_a_dead_service_in_one_line(capsys):
    assert main(["adapters", "--sharer", "127.0.0.1:1", "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcflow adapters: the call failed: ") and "\n" not in err


# --- loading and eviction under the memory bound --------------------------------------------------


@pytest.fixture(scope="module")
def same_size(tiny_pair, tmp_path_factory):
    """x, y, z: three LCF-X adapters of one shape (the same half size each)."""
    root = tmp_path_factory.mktemp("same-size")
    for name in ("x", "y", "z"):
        tiny_adapter_dir(tiny_pair, root / name, "lcfx")
    return root


def half_bytes(root, name: str, half: str) -> int:
    return safetensors_parameters(root / name / f"{half}.safetensors") * 4  # loaded in fp32


def receiver_registry(tiny_pair, root, limit_bytes: int) -> AdapterRegistry:
    (_, _), (mr, tr) = tiny_pair
    registry = AdapterRegistry(
        "receiver", str(root), limit_bytes, lambda d: ReceiverEngine.from_loaded(mr, tr, str(d))
    )
    registry.attach(ReceiverEngine.from_loaded(mr, tr, ""))  # the model alone: no default adapter
    return registry


def test_naming_none_gets_the_adapter_whose_card_measured_best(tiny_pair, tmp_path):
    """Several adapters of one mode for one pair (a pruned copy, an older design): a request that
    names none gets the best model-card EM, not the first name; without cards, by name."""
    for name, em in (("a-no-card", None), ("b-weak", 0.2), ("c-best", 0.6), ("d-no-card", None)):
        tiny_adapter_dir(tiny_pair, tmp_path / name, "lcfx")
        if em is not None:
            card = {"eval": {"method": "lcfx"}, "results": {"lcfx": {"em": em}}}
            (tmp_path / name / "model_card.json").write_text(json.dumps(card))
    registry = receiver_registry(tiny_pair, tmp_path, 512 << 20)
    assert [e.info.name for e in registry.candidates("lcfx")] == [
        "c-best",
        "b-weak",
        "a-no-card",
        "d-no-card",
    ]
    choice = registry.pick("", "lcfx")
    assert choice.name == "c-best" and choice.how == "mode"


def test_card_ems_of_different_tasks_are_not_compared(tiny_pair, tmp_path):
    """A long-document adapter's high EM on long documents must not outrank the adapters measured
    on the task most cards share: the common task's cards come first (by EM), other tasks after."""
    cards = (
        ("general", "facts-cross", 0.85),
        ("long", "facts-cross-longer", 0.87),
        ("plain", "facts-cross", 0.82),
    )
    for name, task, em in cards:
        tiny_adapter_dir(tiny_pair, tmp_path / name, "lcfx")
        card = {"eval": {"method": "lcfx", "task": task, "split": "test"}, "results": {"lcfx": {"em": em}}}
        (tmp_path / name / "model_card.json").write_text(json.dumps(card))
    registry = receiver_registry(tiny_pair, tmp_path, 512 << 20)
    assert [e.info.name for e in registry.candidates("lcfx")] == ["general", "plain", "long"]
    assert registry.pick("", "lcfx").name == "general"


def lease_once(registry: AdapterRegistry, name: str) -> None:
    with registry.lease(registry.resolve(name)) as engine:
        assert engine.adapter is not None


def test_least_recently_used_adapters_are_evicted_first(tiny_pair, same_size):
    size = half_bytes(same_size, "x", "decoder")
    registry = receiver_registry(tiny_pair, same_size, int(2.5 * size))  # room for two
    lease_once(registry, "x")
    lease_once(registry, "y")
    assert registry.loaded_names() == ["x", "y"] and registry.used_bytes() == 2 * size
    lease_once(registry, "z")  # x is the least recently used
    assert registry.loaded_names() == ["y", "z"]
    lease_once(registry, "y")  # now z is
    lease_once(registry, "x")
    assert registry.loaded_names() == ["x", "y"]
    views = {view.info.name: view.loaded for view in registry.list()}
    assert views == {"x": True, "y": True, "z": False}


def test_an_adapter_in_use_is_never_evicted(tiny_pair, same_size):
    size = half_bytes(same_size, "x", "decoder")
    registry = receiver_registry(tiny_pair, same_size, int(1.5 * size))  # room for one
    with registry.lease(registry.resolve("x")):  # a handoff holds x
        lease_once(registry, "y")  # y loads beside it, over the bound, and x stays
        assert registry.loaded_names() == ["x"]  # y was evicted when its handoff ended, not x
        with registry.lease(registry.resolve("z")):
            assert registry.loaded_names() == ["x", "z"] and registry.used_bytes() > registry.memory_limit
    assert len(registry.loaded_names()) == 1 and registry.used_bytes() <= registry.memory_limit


def test_an_adapter_larger_than_the_bound_is_unusable(tiny_pair, same_size):
    registry = receiver_registry(tiny_pair, same_size, half_bytes(same_size, "x", "decoder") - 1)
    with pytest.raises(ServiceError) as err:
        registry.pick("x", "lcfx")
    assert (
        err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--adapter-memory-mb" in err.value.details
    )


def test_preload_loads_what_fits(tiny_pair, same_size):
    registry = receiver_registry(tiny_pair, same_size, int(2.5 * half_bytes(same_size, "x", "decoder")))
    registry.preload()
    assert registry.loaded_names() == ["x", "y"]  # by name, until the bound


def test_the_services_keep_their_adapters_under_the_configured_bound(tiny_pair, same_size):
    """The default (x) stays loaded; of y and z only the one used last is kept, on both services."""
    bounds = {
        role: (half_bytes(same_size, "x", half) * 2.5) / 2**20
        for role, half in (("sharer", "encoder"), ("receiver", "decoder"))
    }
    config = {"adapters": str(same_size), "adapter": "x"}
    with running_services(
        tiny_pair,
        str(same_size / "x"),
        sharer={**config, "adapter_memory_mb": bounds["sharer"]},
        receiver={**config, "adapter_memory_mb": bounds["receiver"]},
    ) as running:
        with HandoffClient(running.sharer, timeout_s=60) as client:
            for name in ("y", "z"):
                result = client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2, adapter=name)
                assert result.summary.adapter == name
            for response in (client.list_adapters(), receiver_listing(running)):
                assert {i.name: i.loaded for i in response.adapters} == {"x": True, "y": False, "z": True}
                assert response.memory_used_bytes <= response.memory_limit_bytes


# --- configuration --------------------------------------------------------------------------------


def test_flags_and_environment(monkeypatch, tmp_path):
    import argparse

    monkeypatch.setenv("LCFLOW_ADAPTERS", str(tmp_path))
    monkeypatch.setenv("LCFLOW_ADAPTER_MEMORY_MB", "64")
    monkeypatch.setenv("LCFLOW_PRELOAD", "true")
    parser = argparse.ArgumentParser()
    add_service_flags(parser, "receiver")
    config = config_from_args("receiver", parser.parse_args(["--model", "m", "--adapter", "a"]))
    assert (config.adapters, config.adapter_memory_mb, config.preload, config.adapter) == (
        str(tmp_path),
        64.0,
        True,
        "a",
    )
    # the flag wins over the environment; --adapter-dir is still accepted
    args = parser.parse_args(["--model", "m", "--adapter-dir", "elsewhere", "--adapter-memory-mb", "8"])
    config = config_from_args("receiver", args)
    assert config.adapters == "elsewhere" and config.adapter_memory_mb == 8.0
    with pytest.raises(ValueError):
        ServiceConfig("receiver", adapter_memory_mb=0)


def test_the_default_must_be_in_the_directory_or_a_directory_of_its_own(layout, tmp_path):
    check_adapter_directory(str(layout), "a-lcfx")  # a name in it
    check_adapter_directory(str(layout), str(layout / "a-lcfx"))  # a path into it
    with pytest.raises(UsageError, match="no adapter of that name .*a-lcfx, aa-lcf-elsewhere"):
        check_adapter_directory(str(layout), "nope")
    with pytest.raises(UsageError, match="no such directory"):
        check_adapter_directory(str(tmp_path / "missing"), "")
    shutil.copytree(layout / "c-lcf", tmp_path / "c-lcf")  # elsewhere, with a name taken in it
    with pytest.raises(UsageError, match="has the name of another adapter"):
        check_adapter_directory(str(layout), str(tmp_path / "c-lcf"))
