"""``LLM``: offline batch generation over strings or token ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceABC

import torch
from tqdm.auto import tqdm

from cospec.engine.config import EngineConfig, FusionConfig, SpeculativeConfig, choose_speculation
from cospec.engine.llm_engine import LLMEngine
from cospec.engine.models import DEFAULT_MODEL
from cospec.engine.sampling_params import SamplingParams
from cospec.engine.sequence import RequestOutput


class LLM:
    """``LLM(model="smollm2-135m").generate(["Hello"], SamplingParams(max_tokens=32))``.

    ``model`` is a HF model object, a directory, a .gguf file or an embedded model name. Speculative decoding: one
    of ``draft=`` (a model object, path or name with the same vocabulary), ``prompt_lookup=N`` (n-gram lookup with
    n-grams up to N tokens), ``self_spec_layers=L`` (the target's first L layers draft) or ``draft_head=`` (an
    EAGLE-3 head: a directory, an ``Eagle3Head``, or "default" for the one ``cospec train-draft`` made), with up to
    ``num_draft_tokens`` drafts per step; or a full ``SpeculativeConfig``. ``fusion=FusionConfig(members, spec)``
    fuses the target's next-token distribution with its members' at every token. Engine options (``block_size``,
    ``kv_cache_memory_bytes``, ``max_num_seqs``, ...) are ``EngineConfig`` fields.
    """

    def __init__(self, model=DEFAULT_MODEL, tokenizer=None, dtype: torch.dtype | str | None = None,
                 device: str | torch.device | None = None, draft=None, prompt_lookup: int | None = None,
                 self_spec_layers: int | None = None, num_draft_tokens: int = 8,
                 speculative: SpeculativeConfig | None = None, fusion: FusionConfig | None = None,
                 draft_head=None, **engine_options) -> None:
        speculative = speculative or choose_speculation(num_draft_tokens, draft, prompt_lookup, self_spec_layers,
                                                        draft_head=draft_head)
        self.engine = LLMEngine(model, EngineConfig(**engine_options), tokenizer=tokenizer, dtype=dtype, device=device,
                                speculative=speculative, fusion=fusion)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids of ``prompt``; applies the chat template when the tokenizer has one (unless ``chat=False``)."""
        if self.tokenizer is None:
            raise ValueError("string prompts need a tokenizer; pass token ids or LLM(..., tokenizer=...)")
        if chat is None:
            chat = getattr(self.tokenizer, "chat_template", None) is not None
        if chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                     tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, chat: bool | None = None) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (strings or token-id lists); outputs in prompt order, one per
        sample: a prompt whose params have ``n > 1`` gives n consecutive outputs (``index`` 0..n-1, one request id),
        as HF's ``num_return_sequences`` does."""
        if isinstance(prompts, str) or (isinstance(prompts, SequenceABC) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        # Outputs are collected when requests finish: the engine need not build one per request and step.
        sampling_params = [dataclasses.replace(params or SamplingParams(), final_only=True) for params in sampling_params]
        ids = [self.encode(p, chat) if isinstance(p, str) else list(p) for p in prompts]
        request_ids = []
        for prompt_ids, params in zip(ids, sampling_params):
            request_id = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, prompt_ids, params)
            request_ids.append(request_id)
        done: dict[tuple[str, int], RequestOutput] = {}
        with tqdm(total=sum(p.n for p in sampling_params), desc="cospec generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id, out.index] = out
                        bar.update()
        outputs = [done[r, i] for r, params in zip(request_ids, sampling_params) for i in range(params.n)]
        if self.tokenizer is not None:
            for out in outputs:
                out.text = self.tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
        return outputs
