"""ModelRunner's switch to paged attention: on for cospec's forwards only, on the config and every sub-config."""

from __future__ import annotations

import torch
from _tiny_models import random_prompt, tiny_model
from transformers import Gemma3Config

from cospec import EngineConfig, LLMEngine, SamplingParams
from cospec.engine import attention
from cospec.engine.model_runner import ModelRunner, _attention_fields


def test_paged_attention_is_switched_on_for_cospec_forwards_only():
    model = tiny_model("llama", vocab_size=64)
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation))
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=8, block_size=4))
    engine.add_request("r", random_prompt(5, 64, seed=0), SamplingParams(max_tokens=3, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    assert seen and set(seen) == {attention.ATTN_IMPLEMENTATION}
    assert model.config._attn_implementation == "sdpa"
    model(torch.tensor([[1, 2, 3]]))  # a plain HF forward afterwards runs HF's own attention
    assert seen[-1] == "sdpa"


def test_the_switch_covers_sub_configs_and_restores_each_one():
    config = Gemma3Config()  # a text and a vision sub-config
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "sdpa"
    fields = _attention_fields(config)
    assert fields is not None and len(fields) == 3
    runner = ModelRunner.__new__(ModelRunner)  # only the switch, no model
    runner._attention_fields = fields
    before = runner._attention_implementations()
    runner._set_attention(attention.ATTN_IMPLEMENTATION)
    assert {config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation} == {attention.ATTN_IMPLEMENTATION}
    runner._set_attention(before)
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == ("eager", "sdpa")
