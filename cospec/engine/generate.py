"""Drop-in ``generate()`` for Hugging Face models: HF's argument names and return value, cospec's engine underneath.

``cospec.generate(model, input_ids, attention_mask=..., max_new_tokens=64)`` returns what
``model.generate(input_ids, attention_mask=..., max_new_tokens=64)`` returns: the (left-padded) prompts followed by
the new tokens, rows that finished early filled with ``pad_token_id``. Each row decodes as if it were alone (ragged
batching, no padding inside the model). An argument cospec does not implement raises ``UnsupportedArgumentError``
naming it; nothing is silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
from torch import nn

from cospec.engine.config import EngineConfig, choose_speculation
from cospec.engine.llm_engine import LLMEngine
from cospec.engine.sampling_params import SamplingParams

# Values that HF applies when neither the call nor the model's generation config sets them (transformers 5.x).
_HF_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "remove_invalid_values": False, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0, "num_beam_groups": 1, "diversity_penalty": 0.0, "use_cache": True,
    "early_stopping": False, "renormalize_logits": False, "output_attentions": False,
    "output_hidden_states": False, "output_logits": False, "low_memory": False, "token_healing": False,
    "is_assistant": False, "disable_compile": False,
}

# Generation-config fields cospec implements, or that cannot change the output (bookkeeping, cache choice).
_SUPPORTED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "eos_token_id", "pad_token_id", "bos_token_id", "return_dict_in_generate", "use_cache",
    "cache_implementation", "decoder_start_token_id", "is_assistant", "disable_compile", "compile_config",
    "early_stopping", "length_penalty", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "num_assistant_tokens", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "sequence_bias",
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
}


class UnsupportedArgumentError(ValueError):
    """A generate() argument (or generation-config setting) that cospec does not implement."""


def _resolve(config, name: str):
    value = getattr(config, name, None)
    return _HF_DEFAULTS.get(name) if value is None else value


def _check_supported(config) -> None:
    for name, value in vars(config).items():
        if name.startswith("_") or name in _SUPPORTED or value is None:
            continue
        if value != _HF_DEFAULTS.get(name):
            raise UnsupportedArgumentError(
                f"generate() argument {name}={value!r} is not supported by cospec "
                f"(supported: max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, min_p, "
                f"eos_token_id, pad_token_id, repetition_penalty, no_repeat_ngram_size, bad_words_ids, sequence_bias, "
                f"logits_processor, stopping_criteria, streamer, return_dict_in_generate, assistant_model, "
                f"prompt_lookup_num_tokens, assistant_early_exit, num_assistant_tokens)")


def _prompts_from_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return [row.tolist() for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    prompts = []
    for row, mask in zip(input_ids, attention_mask.bool()):
        real = int(mask.sum())
        if not bool(mask[mask.numel() - real:].all()):
            raise ValueError("attention_mask is not left-padded: pad on the left for decoder-only generation "
                             "(tokenizer.padding_side = 'left')")
        prompts.append(row[row.numel() - real:].tolist())
    return prompts


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config=None, streamer=None, assistant_model: nn.Module | None = None, fusion=None,
             logits_processor=None, stopping_criteria=None, **kwargs):
    """Hugging Face ``model.generate`` semantics on cospec's engine (greedy and sampling, batch >= 1).

    Speculative decoding takes HF's names, at any batch size: ``assistant_model=`` (a draft model),
    ``prompt_lookup_num_tokens=k`` (n-gram lookup, ``max_matching_ngram_size`` long), ``assistant_early_exit=L``
    (self-speculation from the first L layers); ``num_assistant_tokens`` caps the draft length (default 8; cospec
    adapts it per sequence and step). ``fusion=FusionConfig(members, spec)`` decodes the fused distribution of the
    model and its members (speculation then verifies against the fused distribution).

    Sampling: each row's random numbers are keyed by a seed drawn from torch's global generator and the output
    position, so ``torch.manual_seed(s)`` reproduces a call, with or without an assistant (same tokens).
    """
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, length]")
    config = copy.deepcopy(generation_config or model.generation_config)
    unused = config.update(**kwargs)
    if unused:
        raise UnsupportedArgumentError(f"generate() got argument(s) cospec does not support: {', '.join(sorted(unused))}")
    _check_supported(config)

    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    if attention_mask is None and config.pad_token_id is not None and pad not in eos_ids and bool((input_ids == pad).any()):
        attention_mask = (input_ids != pad).long()  # as HF infers it
    prompts = _prompts_from_batch(input_ids, attention_mask)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt in the batch is empty (its attention_mask is all zeros)")

    input_len = input_ids.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else _resolve(config, "max_length") - input_len
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_length={_resolve(config, 'max_length')} <= input length {input_len}; "
                         "set max_new_tokens")
    min_new = config.min_new_tokens if config.min_new_tokens is not None else max(0, _resolve(config, "min_length") - input_len)
    greedy = not _resolve(config, "do_sample")
    params = SamplingParams(
        max_tokens=max_new, min_tokens=min(min_new, max_new), temperature=0.0 if greedy else float(_resolve(config, "temperature")),
        top_k=0 if greedy else int(_resolve(config, "top_k") or 0), top_p=1.0 if greedy else float(_resolve(config, "top_p")),
        min_p=0.0 if greedy else float(config.min_p or 0.0), stop_token_ids=eos_ids, ignore_eos=True,
        repetition_penalty=float(_resolve(config, "repetition_penalty")),
        no_repeat_ngram_size=int(_resolve(config, "no_repeat_ngram_size") or 0),
        # As HF: a bad word that is only an eos token is not banned.
        bad_words_ids=[list(w) for w in config.bad_words_ids if list(w) not in [[e] for e in eos_ids]] or None
        if config.bad_words_ids else None,
        sequence_bias=_sequence_bias(config.sequence_bias),
        logits_processors=list(logits_processor) if logits_processor else None,
        stopping_criteria=list(stopping_criteria) if stopping_criteria else None,
    )
    speculative = choose_speculation(
        config.prompt_lookup_num_tokens or config.num_assistant_tokens or 8, draft=assistant_model,
        max_ngram_size=(config.max_matching_ngram_size or 2) if config.prompt_lookup_num_tokens else None,
        self_spec_layers=config.assistant_early_exit or None,
        names=("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"))
    if streamer is not None and len(prompts) > 1:
        raise ValueError("streamer supports batch size 1 only (as in Hugging Face)")

    block_size = 16
    longest = max(len(p) for p in prompts) + max_new
    engine = LLMEngine(model, EngineConfig(
        block_size=block_size, num_kv_blocks=sum(-(-(len(p) + max_new) // block_size) for p in prompts),
        max_num_seqs=len(prompts), max_num_batched_tokens=max(512, len(prompts)), max_model_len=_context_len(model, longest),
    ), speculative=speculative, fusion=fusion)
    for i, prompt in enumerate(prompts):
        row_params = params if greedy else dataclasses.replace(params, seed=int(torch.randint(0, 2**62, ()).item()))
        # HF's processors see each row with its left padding; the model does not.
        engine.add_request(str(i), prompt, row_params, context_prefix=input_ids[i, : input_len - len(prompt)].tolist())
    if streamer is not None:
        streamer.put(input_ids.cpu())
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if streamer is not None:
                new = out.output_token_ids[len(outputs.get(out.request_id, [])):]
                streamer.put(torch.tensor(new))
            outputs[out.request_id] = out.output_token_ids
    if streamer is not None:
        streamer.end()

    generated = [outputs[str(i)] for i in range(len(prompts))]
    width = max(len(g) for g in generated)
    new_tokens = torch.full((len(prompts), width), pad, dtype=input_ids.dtype)
    for row, tokens in zip(new_tokens, generated):
        row[: len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)
    if _resolve(config, "return_dict_in_generate"):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _sequence_bias(bias) -> dict | None:
    """HF's ``sequence_bias`` (a dict of token tuples, or a list of [token list, bias] pairs) as a dict."""
    if not bias:
        return None
    pairs = bias.items() if isinstance(bias, dict) else bias
    return {tuple(sequence): float(value) for sequence, value in pairs}


def _context_len(model: nn.Module, needed: int) -> int:
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and needed > context:
        raise ValueError(f"prompt + max_new_tokens = {needed} tokens exceeds the model's context of {context} tokens")
    return context or needed


def patch(model: nn.Module) -> nn.Module:
    """Route ``model.generate(...)`` through cospec; ``unpatch(model)`` restores Hugging Face's."""
    if getattr(model, "_cospec_patched", False):
        return model
    model._cospec_hf_generate = model.generate

    @functools.wraps(generate)
    def cospec_generate(*args, **kwargs):
        return generate(model, *args, **kwargs)

    model.generate = cospec_generate
    model._cospec_patched = True
    return model


def unpatch(model: nn.Module) -> nn.Module:
    if getattr(model, "_cospec_patched", False):
        model.generate = model._cospec_hf_generate
        del model._cospec_hf_generate
        model._cospec_patched = False
    return model
