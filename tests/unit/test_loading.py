"""lcflow.provision.loading.load_pair: a same-model pair loads its model once."""

from __future__ import annotations

from lcflow.provision.loading import load_pair


def test_a_same_model_pair_shares_one_loaded_model_and_two_models_load_apart(tiny_dir):
    gemma, llama = str(tiny_dir("gemma3", 400, 2)), str(tiny_dir("llama", 400, 2))
    sharer, receiver = load_pair(gemma, gemma, "cpu")
    assert receiver is sharer
    sharer, receiver = load_pair(gemma, llama, "cpu")
    assert receiver[0] is not sharer[0]
    assert (sharer[0].config.model_type, receiver[0].config.model_type) == ("gemma3_text", "llama")


def test_lcflow_eval_loads_a_same_model_pair_once(tiny_dir):
    """`lcflow eval --pair gemma3-to-gemma3` (load_models): one model serves both sides."""
    from lcflow.commands.eval import load_models

    gemma = str(tiny_dir("gemma3", 400, 2))
    sharer, receiver = load_models(gemma, gemma, "cpu")
    assert receiver[0] is sharer[0]
