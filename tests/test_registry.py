import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import regate_plugin as rg
from regate_plugin.strategies import TOKEN_ELISIONS, TokenElision


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        rg.build_token_elision("regatte")
    assert "regatte" in str(err.value) and "none, random, regate" in str(err.value)


def test_regate_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="needs reference losses"):
        rg.build_token_elision("regate", rg.ReGATEConfig())


def test_third_party_strategy_registers_and_builds():
    class KeepFirstHalf(TokenElision):
        name = "keep-first-half"

    rg.register_token_elision("keep-first-half", lambda cfg, **kw: KeepFirstHalf(cfg, **kw))
    try:
        assert "keep-first-half" in rg.available_token_elisions()
        assert isinstance(rg.build_token_elision("keep-first-half"), KeepFirstHalf)
        with pytest.raises(ValueError, match="already registered"):
            rg.register_token_elision("keep-first-half", lambda cfg: KeepFirstHalf(cfg))
    finally:
        TOKEN_ELISIONS._entries.pop("keep-first-half")


def test_unsupported_model_lists_supported_ones():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(rg.adapters.UnsupportedModelError, match="LlamaForCausalLM.*LlavaForConditionalGeneration"):
        rg.enable_token_elision(model, rg.build_token_elision("none"))
    with pytest.raises(TypeError, match="TokenElision"):
        rg.enable_token_elision(model, "regate")
    assert torch.is_grad_enabled()


def test_llava_next_video_batches_are_refused_by_the_llava_merge():
    from regate_plugin.adapters.upstream import merge_llava

    with pytest.raises(NotImplementedError, match="LLaVA-NeXT video"):
        merge_llava(object(), {"modalities": ["image", "video"], "labels": None})


def test_a_second_adapter_under_a_taken_name_is_refused():
    from regate_plugin.adapters import Adapter, register_adapter
    from regate_plugin.adapters.base import ADAPTERS

    hf = ADAPTERS.get("hf")
    with pytest.raises(ValueError, match="adapter 'hf' is already registered"):
        register_adapter(Adapter("hf", ("LlamaForCausalLM",), hf.install))
    assert ADAPTERS.get("hf") is hf and "LlamaForCausalLM" not in rg.supported_models()
