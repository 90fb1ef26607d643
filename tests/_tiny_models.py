"""Tiny random float64 Hugging Face causal LMs, built from configs (never from a hub), shared by the tests.

float64 makes cospec's ragged, paged forward and HF's padded forward agree to ~1e-15, so greedy decoding is equal
token for token (the design's "exact in float64" contract).
"""

from __future__ import annotations

import pytest
import torch

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]

# Small enough that a forward takes a millisecond; GQA (4 query heads, 2 kv heads) as in the real models.
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256)

SLIDING_WINDOW = 8


def tiny_model(family: str = "llama", vocab_size: int = 128, seed: int = 0, logit_scale: float = 1.0, **overrides):
    """A float64 ``*ForCausalLM`` in eval mode with SDPA attention. ``overrides`` go to the config (eos_token_id,
    pad_token_id, num_hidden_layers, ...). ``logit_scale`` multiplies the output embedding so that next-token
    distributions are peaked rather than nearly uniform (useful for statistical tests)."""
    import transformers as tf

    kwargs = dict(_COMMON, vocab_size=vocab_size)
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("bos_token_id", None)
    kwargs.setdefault("pad_token_id", None)
    if family == "llama":  # SmolLM2 is a Llama
        config_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
    elif family == "qwen2":
        config_cls, model_cls = tf.Qwen2Config, tf.Qwen2ForCausalLM
    elif family == "qwen3":  # q/k norms, explicit head_dim
        config_cls, model_cls = tf.Qwen3Config, tf.Qwen3ForCausalLM
        kwargs.update(head_dim=16)
    elif family == "mistral":  # every layer is a sliding-window layer
        config_cls, model_cls = tf.MistralConfig, tf.MistralForCausalLM
        kwargs.update(sliding_window=SLIDING_WINDOW)
    elif family == "gemma3":  # sliding and full layers mixed, two rotary bases, query_pre_attn_scalar
        config_cls, model_cls = tf.Gemma3TextConfig, tf.Gemma3ForCausalLM
        kwargs.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW, num_hidden_layers=3,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    else:
        raise ValueError(family)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float64)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    return model.eval()


def left_padded_batch(lengths: list[int], vocab_size: int, pad_token_id: int = 0, seed: int = 0,
                      low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) ``[len(lengths), max(lengths)]`` of random prompts, left-padded."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, n in enumerate(lengths):
        input_ids[row, width - n:] = torch.randint(low, vocab_size, (n,), generator=generator)
        attention_mask[row, width - n:] = 1
    return input_ids, attention_mask


def random_prompt(length: int, vocab_size: int, seed: int, low: int = 3) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (length,), generator=generator).tolist()


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run a module on one intra-op thread, then restore the setting. A tiny model gains nothing from more, and on a
    busy 2-core machine OpenMP threads that spin-wait on each other make every small op 10-40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_tiny_llama_dir(path, sentences: list[str], context: int = 128, chat_template: str | None = None,
                        logit_scale: float = 1.0):
    """A float32 tiny random Llama and a word-level tokenizer trained in memory on ``sentences``, saved as a model
    directory at ``path`` (what ``cospec generate --model`` and ``cospec serve --model`` take)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                     eos_token="</s>", pad_token="</s>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_tokenizer(vocab_size: int = 128):
    """A BPE tokenizer of exactly ``vocab_size`` tokens (ids 0-2: <pad>, <s>, </s>), trained in memory on random
    two-letter words, for the tiny models' vocabulary: what stop strings need (token strings that join into text)."""
    import itertools

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["".join(pair) for pair in itertools.product("abcdefghijkl", repeat=2)]
    generator = torch.Generator().manual_seed(0)
    corpus = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=generator).tolist())
              for _ in range(200)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"])
    backend.train_from_iterator(corpus, trainer)
    assert backend.get_vocab_size() == vocab_size
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def run_to_completion(engine, requests, check_blocks_freed: bool = False) -> list:
    """Add ``requests`` (``(prompt, SamplingParams)`` pairs) to ``engine`` as "0", "1", ... and step it until all
    finish; their final outputs in order. ``check_blocks_freed``: also assert that every KV block was released."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    if check_blocks_freed:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [done[str(i)] for i in range(len(requests))]
