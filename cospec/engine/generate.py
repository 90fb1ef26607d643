"""Drop-in ``generate()`` for Hugging Face models: HF's argument names and return value, cospec's engine underneath.

``cospec.generate(model, input_ids, attention_mask=..., max_new_tokens=64)`` returns what
``model.generate(input_ids, attention_mask=..., max_new_tokens=64)`` returns: the (left-padded) prompts followed by
the new tokens, rows that finished early filled with ``pad_token_id``. Each row decodes as if it were alone (ragged
batching, no padding inside the model). An argument cospec does not implement raises ``UnsupportedArgumentError``
naming it, before any other check; nothing is silently ignored.

How HF's inputs become engine requests (``cospec.engine.generate_inputs``): the model sees each row's attended
tokens (or embeddings) at positions ``0..n-1``, which is what HF computes from the attention mask; logits processors
and stopping criteria see HF's ``input_ids`` row (with its padding and masked tokens; nothing for a prompt given only
as ``inputs_embeds``, as in HF).

Rows that finish early: HF keeps running them on pad tokens until every row is done. Their tokens are pads (when
an eos token is set; without one HF does not pad, and such a row simply continues: cospec regenerates it with the
same seed, no stopping criteria, to the common length). Their ``scores`` / ``logits`` at those steps are what HF
computes there: the model's logits after the row's tokens and the pads so far, processed as HF processes them;
cospec gets them from one more pass over the finished rows, only when scores or logits are asked for.
"""

from __future__ import annotations

import array
import copy
import dataclasses
import functools
import itertools

import torch
from torch import nn

from cospec.decoding.logits_processing import RowContext, process_logits
from cospec.decoding.sampling import warp_logits_for
from cospec.engine.config import EngineConfig, choose_speculation
from cospec.engine.generate_inputs import PromptRow, UnsupportedArgumentError, check_sliding_window, prompt_rows
from cospec.engine.llm_engine import LLMEngine
from cospec.engine.sampling_params import SamplingParams
from cospec.engine.sequence import RequestOutput

__all__ = ["UnsupportedArgumentError", "generate", "patch", "unpatch"]

# Values that HF applies when neither the call nor the model's generation config sets them (transformers 5.x).
# Most tokens in one forward of generate(): longer batches of prompts are prefilled in chunks of this many.
_MAX_STEP_TOKENS = 16384

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
    "sequence_bias", "num_return_sequences", "output_scores", "output_logits", "stop_strings",
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
}

# HF generate() parameters that change nothing when left at None / False (wrappers often pass them through).
_INERT_WHEN_UNSET = ("prefix_allowed_tokens_fn", "synced_gpus", "negative_prompt_ids", "negative_prompt_attention_mask",
                     "custom_generate", "trust_remote_code")


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
                f"eos_token_id, pad_token_id, bos_token_id, repetition_penalty, no_repeat_ngram_size, bad_words_ids, "
                f"sequence_bias, num_return_sequences, stop_strings, logits_processor, stopping_criteria, streamer, "
                f"return_dict_in_generate, output_scores, output_logits, inputs_embeds, attention_mask, position_ids, "
                f"assistant_model, prompt_lookup_num_tokens, assistant_early_exit, num_assistant_tokens)")


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config=None, streamer=None, assistant_model: nn.Module | None = None, fusion=None,
             logits_processor=None, stopping_criteria=None, draft_head=None, **kwargs):
    """Hugging Face ``model.generate`` semantics on cospec's engine (greedy and sampling, batch >= 1).

    Inputs as HF takes them: ``input_ids`` (or ``inputs``), ``inputs_embeds`` (with or without ``input_ids``; with
    embeddings only, the result holds only the new tokens, as in HF), neither (generation starts from
    ``bos_token_id``), ``attention_mask`` (left padding, and masked tokens inside a row, which the model does not
    see) and ``position_ids`` (equal to what the mask implies). ``num_return_sequences`` samples per prompt,
    ``stop_strings`` with ``tokenizer=``, ``return_dict_in_generate`` with ``output_scores`` / ``output_logits``
    (HF's ``GenerateDecoderOnlyOutput``; its ``cache`` is None: cospec's caches live in its engine).

    Speculative decoding takes HF's names, at any batch size: ``assistant_model=`` (a draft model),
    ``prompt_lookup_num_tokens=k`` (n-gram lookup, ``max_matching_ngram_size`` long), ``assistant_early_exit=L``
    (self-speculation from the first L layers), or cospec's ``draft_head=`` (an EAGLE-3 head: a directory, an
    ``Eagle3Head``, or "default" for the model's default head); ``num_assistant_tokens`` caps the draft length
    (default 8; cospec adapts it per sequence and step). ``fusion=FusionConfig(members, spec)`` decodes the fused
    distribution of the model and its members (speculation then verifies against the fused distribution).

    Sampling: each row's random numbers are keyed by a seed drawn from torch's global generator and the output
    position, so ``torch.manual_seed(s)`` reproduces a call, with or without an assistant (same tokens).
    """
    inputs = kwargs.pop("inputs", None)
    if input_ids is None:
        input_ids, inputs = inputs, None
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    position_ids = kwargs.pop("position_ids", None)
    tokenizer = kwargs.pop("tokenizer", None)
    config, has_default_max_length = _generation_config(model, generation_config, kwargs)
    if inputs_embeds is not None and fusion is not None:
        raise UnsupportedArgumentError("inputs_embeds cannot be used with fusion: the members cannot read the "
                                       "model's embeddings")
    if inputs_embeds is not None and input_ids is None and assistant_model is not None:
        raise UnsupportedArgumentError("assistant_model cannot read a prompt given only as inputs_embeds: pass its "
                                       "input_ids too, or draft with prompt_lookup_num_tokens or assistant_early_exit")

    if inputs is not None:
        raise ValueError("pass the prompts as input_ids or as inputs, not both")
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    input_ids, rows = prompt_rows(model, input_ids, inputs_embeds, attention_mask, position_ids, config.bos_token_id,
                                  config.pad_token_id, eos_ids)
    num_inputs = inputs_embeds.shape[1] if input_ids.shape[1] == 0 else input_ids.shape[1]
    max_new, min_new = _new_token_counts(model, config, has_default_max_length, input_ids.shape[1], num_inputs)
    check_sliding_window(model, rows, max_new)
    greedy = not _resolve(config, "do_sample")
    num_samples = int(_resolve(config, "num_return_sequences"))
    if num_samples > 1 and greedy:  # as HF's GenerationConfig.validate()
        raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                         f"`num_return_sequences` different than 1 (got {num_samples}).")
    if num_samples > 1:  # HF repeats each row; samples of one prompt are consecutive rows
        rows = [row for row in rows for _ in range(num_samples)]
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
    if streamer is not None and len(rows) > 1:
        raise ValueError("streamer supports batch size 1 only (as in Hugging Face)")
    criteria = list(stopping_criteria or [])
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer= to generate() (as in HF)")
        from transformers.generation.stopping_criteria import StopStringCriteria

        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    params = _sampling_params(config, greedy, max_new, min_new, eos_ids, logits_processor, criteria)
    speculative = choose_speculation(
        config.prompt_lookup_num_tokens or config.num_assistant_tokens or 8, draft=assistant_model,
        max_ngram_size=(config.max_matching_ngram_size or 2) if config.prompt_lookup_num_tokens else None,
        self_spec_layers=config.assistant_early_exit or None,
        names=("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "draft_head"),
        draft_head=draft_head)

    block_size = 16
    # The whole batch's prompts in one forward, as HF runs them (nothing else waits for a first token here), and
    # room for every row's verify window.
    window = 1 + (speculative.num_draft_tokens if speculative is not None else 0)
    step_tokens = min(max(512, sum(row.num_tokens for row in rows), len(rows) * window), _MAX_STEP_TOKENS)
    # Each row's K/V in a region of its own (attention reads them in place), unless samples of one prompt share
    # its blocks through the prefix cache.
    longest = max(row.num_tokens for row in rows) + max_new
    kv_size = (dict(kv_region_tokens=longest) if num_samples == 1 else
               dict(num_kv_blocks=sum(-(-(row.num_tokens + max_new) // block_size) for row in rows)))
    engine = LLMEngine(model, EngineConfig(
        block_size=block_size, **kv_size, max_num_seqs=len(rows), max_num_batched_tokens=step_tokens,
        max_model_len=_context_len(model, longest),
    ), speculative=speculative, fusion=fusion)
    row_params = [_penalty_like_hf(params, num_inputs - row.num_positions) for row in rows]
    if not greedy:
        row_params = [dataclasses.replace(p, seed=int(torch.randint(0, 2**62, ()).item())) for p in row_params]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    outputs = _run(engine, rows, row_params, streamer)
    if streamer is not None:
        streamer.end()
    outputs = _finish_like_hf(engine, rows, row_params, outputs, eos_ids, pad,
                              want_reports=params.output_scores or params.output_logits)
    return _hf_result(input_ids, outputs, pad, bool(_resolve(config, "return_dict_in_generate")))


def _generation_config(model: nn.Module, generation_config, kwargs: dict) -> tuple[object, bool]:
    """(the call's generation config, whether its max_length is HF's default); UnsupportedArgumentError for any
    argument cospec does not implement."""
    for name in _INERT_WHEN_UNSET:
        if name in kwargs and kwargs[name] in (None, False):
            del kwargs[name]
    has_default_max_length = ("max_length" not in kwargs and getattr(generation_config, "max_length", None) is None
                              and model.generation_config.max_length is None)
    config = copy.deepcopy(generation_config or model.generation_config)
    unused = config.update(**kwargs)
    if unused:
        raise UnsupportedArgumentError(f"generate() got argument(s) cospec does not support: {', '.join(sorted(unused))}")
    _check_supported(config)
    return config, has_default_max_length


def _sampling_params(config, greedy: bool, max_new: int, min_new: int, eos_ids: list[int], logits_processor,
                     criteria: list) -> SamplingParams:
    """The engine's parameters for one row of the call."""
    return_dict = bool(_resolve(config, "return_dict_in_generate"))
    return SamplingParams(
        max_tokens=max_new, min_tokens=min(min_new, max_new), temperature=0.0 if greedy else float(_resolve(config, "temperature")),
        top_k=0 if greedy else int(_resolve(config, "top_k") or 0), top_p=1.0 if greedy else float(_resolve(config, "top_p")),
        min_p=0.0 if greedy else float(config.min_p or 0.0), stop_token_ids=eos_ids, ignore_eos=True,
        repetition_penalty=float(_resolve(config, "repetition_penalty")),
        no_repeat_ngram_size=int(_resolve(config, "no_repeat_ngram_size") or 0),
        # As HF: a bad word that is only an eos token is not banned.
        bad_words_ids=[list(w) for w in config.bad_words_ids if list(w) not in [[e] for e in eos_ids]] or None
        if config.bad_words_ids else None,
        sequence_bias=_sequence_bias(config.sequence_bias),
        logits_processors=list(logits_processor) if logits_processor else None, stopping_criteria=criteria or None,
        # As HF: scores and logits are reported only in a dict.
        output_scores=return_dict and bool(_resolve(config, "output_scores")),
        output_logits=return_dict and bool(_resolve(config, "output_logits")),
    )


def _hf_result(input_ids: torch.Tensor, outputs: list[RequestOutput], pad: int, return_dict: bool):
    """What HF's generate returns: ``input_ids`` followed by each row's new tokens, padded to the longest; with
    ``return_dict``, a ``GenerateDecoderOnlyOutput`` with per-step scores / logits ``[batch, vocab]``."""
    width = max(len(out.output_token_ids) for out in outputs)
    # One conversion for the batch (a tensor per row costs ~6 us).
    padded = [t for out in outputs for t in itertools.chain(out.output_token_ids,
                                                             [pad] * (width - len(out.output_token_ids)))]
    new_tokens = torch.frombuffer(array.array("q", padded), dtype=torch.int64).view(len(outputs), width)
    new_tokens = new_tokens.to(input_ids.dtype)
    sequences = torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)
    if not return_dict:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    def per_step(reports: list[list[torch.Tensor] | None]) -> tuple[torch.Tensor, ...] | None:
        if reports[0] is None:
            return None
        return tuple(torch.stack([r[step] for r in reports]).to(input_ids.device) for step in range(width))

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=per_step([out.scores for out in outputs]),
                                     logits=per_step([out.logits for out in outputs]))


def _new_token_counts(model: nn.Module, config, has_default_max_length: bool, num_input_ids: int,
                      width: int) -> tuple[int, int]:
    """(max, min) new tokens per row, by HF's rules (``GenerationMixin._prepare_generated_length``): ``max_length``
    and ``min_length`` count the ``width`` columns of the inputs (ids, or embeddings when there are no ids); HF's
    default is 20 new tokens after ``input_ids``."""
    if config.max_new_tokens is not None:
        max_new = int(config.max_new_tokens)
    elif has_default_max_length:  # 20 new tokens after input_ids, within the model's context
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1 << 62
        max_new = min(_HF_DEFAULTS["max_length"] + num_input_ids, context) - num_input_ids
    else:
        max_new = int(config.max_length) - width
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_length={_resolve(config, 'max_length')} <= input length {width}; "
                         "set max_new_tokens")
    if config.min_new_tokens is not None:
        return max_new, int(config.min_new_tokens)
    return max_new, max(0, int(_resolve(config, "min_length")) - width)


def _run(engine: LLMEngine, rows: list[PromptRow], params: list[SamplingParams], streamer=None) -> list[RequestOutput]:
    """Decode every row to the end; one output per row, in order. A row whose request failed raises."""
    final_only: dict[int, SamplingParams] = {}  # id(params) -> its final_only copy (rows mostly share one object)
    for i, (row, row_params) in enumerate(zip(rows, params)):
        processor_prompt = None if row.processor_prompt == row.token_ids else row.processor_prompt  # the cheap path
        if streamer is None:  # only finished rows are read: no output per row and step
            replaced = final_only.get(id(row_params))
            if replaced is None:
                replaced = final_only[id(row_params)] = dataclasses.replace(row_params, final_only=True)
            row_params = replaced
        engine.add_request(str(i), row.token_ids, row_params, processor_prompt=processor_prompt,
                           prompt_embeds=row.embeds)
    done: dict[str, RequestOutput] = {}
    num_streamed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if streamer is not None:
                streamer.put(torch.tensor(out.output_token_ids[num_streamed:]))
                num_streamed = len(out.output_token_ids)
            if out.finished:
                done[out.request_id] = out
    outputs = [done[str(i)] for i in range(len(rows))]
    for i, out in enumerate(outputs):
        if out.finish_reason == "error":
            raise RuntimeError(f"generation failed for row {i}: {out.error}")
    return outputs


def _finish_like_hf(engine: LLMEngine, rows: list[PromptRow], params: list[SamplingParams],
                    outputs: list[RequestOutput], eos_ids: list[int], pad: int,
                    want_reports: bool) -> list[RequestOutput]:
    """Outputs of rows that finished before the longest one, as HF gives them (see the module docstring)."""
    width = max(len(out.output_token_ids) for out in outputs)
    early = [i for i, out in enumerate(outputs) if len(out.output_token_ids) < width]
    if not early or (eos_ids and not want_reports):
        return outputs
    outputs = list(outputs)
    if not eos_ids:  # HF does not pad without an eos token: the stopped row goes on (the same seed, no criteria)
        rerun = [dataclasses.replace(params[i], max_tokens=width, min_tokens=min(params[i].min_tokens, width),
                                     stopping_criteria=None) for i in early]
        for i, out in zip(early, _run(engine, [rows[i] for i in early], rerun)):
            outputs[i] = out
        return outputs
    # Eos: the row is padded, and its reports at those steps are the logits after its tokens and the pads so far.
    force_pad = _ForceToken(pad)
    continued = [dataclasses.replace(rows[i], token_ids=outputs[i].prompt_token_ids + outputs[i].output_token_ids)
                 for i in early]
    tails = _run(engine, continued, [SamplingParams(
        max_tokens=width - len(outputs[i].output_token_ids), temperature=0.0, ignore_eos=True,
        logits_processors=[force_pad], output_logits=True) for i in early])
    for i, tail in zip(early, tails):
        out, p = outputs[i], params[i]
        raw = torch.stack(tail.logits)  # [num_pad_steps, vocab_size] float32
        contexts = [RowContext(p, out.output_token_ids + [pad] * k, 0, [], tuple(eos_ids), rows[i].processor_prompt)
                    for k in range(raw.shape[0])]
        scores = process_logits(raw, contexts)
        if not p.is_greedy:
            scores = warp_logits_for(scores, [p], [raw.shape[0]])
        outputs[i] = dataclasses.replace(
            out, scores=None if out.scores is None else out.scores + list(scores.float()),
            logits=None if out.logits is None else out.logits + list(raw))
    return outputs


def _penalty_like_hf(params: SamplingParams, num_padding: int) -> SamplingParams:
    """A row's parameters with HF's treatment of its left padding in ``repetition_penalty``: recent transformers
    leave it out of the penalty's context (``prompt_ignore_length``: the mask's first attended column), older ones
    count it. cospec's own penalty counts everything processors see, so a padded row gets HF's processor instead (it
    commutes with the bans that run before it in cospec but after it in HF)."""
    if params.repetition_penalty == 1.0 or num_padding == 0 or not _hf_penalty_skips_padding():
        return params
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(params.repetition_penalty, prompt_ignore_length=num_padding)
    return dataclasses.replace(params, repetition_penalty=1.0,
                               logits_processors=[penalty] + list(params.logits_processors or []))


@functools.cache
def _hf_penalty_skips_padding() -> bool:
    """Whether the installed transformers passes the padding to its repetition penalty (as 5.24 does; 5.17 not)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor)


class _ForceToken:
    """A logits processor that leaves only ``token_id`` possible."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


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
