"""The systems a benchmark compares, behind one interface: run a batch of prompts, return tokens and timings.

- ``hf``: Hugging Face ``model.generate`` (greedy); ``hf_prompt_lookup``: with ``prompt_lookup_num_tokens``;
  ``hf_assisted``: with ``assistant_model``. HF runs assisted generation at batch size 1 only.
- ``cospec``: cospec's engine, plain decoding; ``cospec_prompt_lookup``, ``cospec_self_spec``, ``cospec_draft``: with
  each proposer; ``cospec_eagle``: with the model's default EAGLE-3 draft head (``cospec train-draft --model M``
  makes it; without one the system reports how). One engine per system lives for the whole run (its KV pool is
  allocated once).
- ``cospec_fusion_ngram``: the model fused (mixture 0.9 / 0.1) with a 4-gram model of the Python standard library;
  ``cospec_fusion_ngram_lookup``: the same fused distribution, sped up by prompt lookup (verified against the fused
  distribution). Their outputs follow the fused distribution, so they differ from HF's by design.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

import cospec
from cospec import EngineConfig, FusionConfig, FusionSpec, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.engine.models import ModelNotFoundError

SYSTEMS = ("hf", "hf_prompt_lookup", "hf_assisted", "cospec", "cospec_prompt_lookup", "cospec_self_spec",
           "cospec_draft", "cospec_eagle", "cospec_fusion_ngram", "cospec_fusion_ngram_lookup")
FUSION_SYSTEMS = ("cospec_fusion_ngram", "cospec_fusion_ngram_lookup")


@dataclass
class RunResult:
    outputs: list[list[int]]  # new tokens per prompt (through eos)
    seconds: float
    ttft: float | None = None  # time to first token (batch 1 for HF; per request mean for cospec)
    num_target_forwards: int | None = None
    num_drafted: int = 0
    num_accepted: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


class UnsupportedError(RuntimeError):
    """The system cannot run this configuration (e.g. HF assisted generation at batch size > 1)."""


def truncated_copy(model, num_layers: int):
    """A smaller stand-in draft model: a copy of ``model`` keeping its first ``num_layers`` layers."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:num_layers]
    draft.config.num_hidden_layers = num_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:num_layers]
    return draft.eval()


class _FirstTokenClock:
    """A streamer that notes when the first generated token arrives (HF puts the prompt first)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class HFSystem:
    def __init__(self, name: str, model, tokenizer, draft=None, prompt_lookup_num_tokens: int = 10) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.kwargs = {}
        if name == "hf_prompt_lookup":
            self.kwargs = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens}
        elif name == "hf_assisted":
            self.kwargs = {"assistant_model": draft}
        self.batch_one_only = name != "hf"

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], max_new_tokens: int) -> RunResult:
        if self.batch_one_only and len(prompts) > 1:
            raise UnsupportedError(f"{self.name}: Hugging Face assisted generation supports batch size 1 only")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        input_ids, mask = input_ids.to(self.model.device), mask.to(self.model.device)
        clock = _FirstTokenClock() if len(prompts) == 1 else None
        start = time.perf_counter()
        out = self.model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=pad, streamer=clock, **self.kwargs)
        seconds = time.perf_counter() - start
        eos = set(_as_list(self.model.generation_config.eos_token_id))
        outputs = [_cut_at_eos(row[width:].tolist(), eos) for row in out]
        ttft = None if clock is None or clock.first_token_time is None else clock.first_token_time - start
        return RunResult(outputs, seconds, ttft)


class CospecSystem:
    def __init__(self, name: str, model, max_batch: int, draft=None, self_spec_layers: int = 8,
                 num_draft_tokens: int = 10, ngram=None) -> None:
        self.name = name
        speculative = fusion = None
        if name in FUSION_SYSTEMS:
            fusion = FusionConfig([ngram], FusionSpec.mixture([0.9, 0.1]))
        if name in ("cospec_prompt_lookup", "cospec_fusion_ngram_lookup"):
            speculative = SpeculativeConfig("prompt_lookup", num_draft_tokens=num_draft_tokens, max_ngram_size=3)
        elif name == "cospec_self_spec":
            speculative = SpeculativeConfig("self_spec", num_draft_tokens=num_draft_tokens, self_spec_layers=self_spec_layers)
        elif name == "cospec_draft":
            speculative = SpeculativeConfig("draft", num_draft_tokens=num_draft_tokens, draft_model=draft)
        elif name == "cospec_eagle":
            speculative = SpeculativeConfig("eagle3", num_draft_tokens=num_draft_tokens, draft_head="default")
        # No prefix caching: the suite runs the same prompts again (warm-up, repeats), which a prefix cache would serve
        # from the previous run while HF generate recomputes them (benchmarks/bench_prefix_cache.py measures it).
        config = EngineConfig(max_num_seqs=max_batch, enable_prefix_caching=False)
        self.engine = LLMEngine(model, config, speculative=speculative, fusion=fusion)
        self._ids = 0

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> RunResult:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        request_ids = []
        start = time.perf_counter()
        for p in prompts:
            request_ids.append(f"{self.name}-{self._ids}")
            self._ids += 1
            self.engine.add_request(request_ids[-1], p, params)
        done = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        seconds = time.perf_counter() - start
        outs = [done[r] for r in request_ids]
        histogram: list[int] = []
        for o in outs:
            for m, count in enumerate(o.stats.acceptance_histogram):
                histogram += [0] * (m + 1 - len(histogram))
                histogram[m] += count
        ttfts = [o.stats.time_to_first_token for o in outs if o.stats.time_to_first_token is not None]
        return RunResult(
            outputs=[o.output_token_ids for o in outs], seconds=seconds,
            ttft=sum(ttfts) / len(ttfts) if ttfts else None,
            num_target_forwards=max(o.stats.num_steps for o in outs),
            num_drafted=sum(o.stats.num_drafted_tokens for o in outs),
            num_accepted=sum(o.stats.num_accepted_tokens for o in outs), acceptance_histogram=histogram)


def make_system(name: str, model, tokenizer, max_batch: int, draft=None, self_spec_layers: int = 8,
                num_draft_tokens: int = 10, ngram=None):
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if name.startswith("hf"):
        return HFSystem(name, model, tokenizer, draft, prompt_lookup_num_tokens=num_draft_tokens)
    try:
        return CospecSystem(name, model, max_batch, draft, self_spec_layers, num_draft_tokens, ngram)
    except ModelNotFoundError as error:  # no default draft head: every run reports how to train it
        return MissingSystem(f"{name}: {error}")


class MissingSystem:
    """A system that cannot be built here (a missing draft head); each run says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> RunResult:
        raise UnsupportedError(self.reason)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


__all__ = ["SYSTEMS", "RunResult", "UnsupportedError", "make_system", "truncated_copy", "cospec"]
