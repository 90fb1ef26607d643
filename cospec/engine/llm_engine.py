"""LLMEngine: requests in, tokens out, one scheduled ragged forward per step.

``step()`` reads top to bottom: schedule, run the model, sample, postprocess. Every KV cache belongs to the engine
(a paged pool per model, one block table per sequence), allocated once at start-up within a memory budget.
"""

from __future__ import annotations

import itertools
import numbers
import time

import torch
from torch import nn

from cospec.decoding.sampling import Sampler
from cospec.engine.block_manager import BlockManager
from cospec.engine.config import EngineConfig
from cospec.engine.kv_cache import kv_bytes_per_token
from cospec.engine.model_runner import ForwardItem, ModelRunner
from cospec.engine.sampling_params import SamplingParams
from cospec.engine.scheduler import ScheduledSeq, Scheduler
from cospec.engine.sequence import RequestOutput, Sequence, SequenceStatus

DEFAULT_KV_CACHE_BYTES = 1 << 30


class LLMEngine:
    def __init__(self, model: nn.Module | str, config: EngineConfig | None = None, tokenizer=None,
                 dtype: torch.dtype | str | None = None, device: str | torch.device | None = None) -> None:
        if isinstance(model, str):
            from cospec.engine.models import load_model

            model, loaded_tokenizer = load_model(model, dtype=dtype or torch.float32, device=device or "cpu")
            tokenizer = tokenizer or loaded_tokenizer
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        text_config = model.config.get_text_config()
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_model_len = config.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        kv_dtype = next(model.parameters()).dtype
        num_blocks = config.num_kv_blocks or self._num_blocks_for_budget(text_config, kv_dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.runner = ModelRunner(model, self.block_manager, num_blocks, kv_dtype, config.fast_cpu_linear)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler()
        self._seq_ids = itertools.count()
        self._requests: dict[str, Sequence] = {}

    def _num_blocks_for_budget(self, text_config, dtype: torch.dtype) -> int:
        per_block = kv_bytes_per_token(text_config, dtype) * self.config.block_size
        budget = self.config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
        # Never more than every sequence at full length needs.
        wanted = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        num_blocks = min(budget // per_block, wanted)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} is smaller than one KV block ({per_block} bytes)")
        return int(num_blocks)

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        """Queue a request. Raises ValueError (naming the problem) for a request the engine cannot serve; the
        engine and the other requests are unaffected."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = _check_token_ids(prompt_token_ids, self.vocab_size)
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                f"context of {self.max_model_len} tokens")
        blocks = self.block_manager.num_blocks_for(total)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request_id!r} needs {blocks} KV blocks at full length; the cache has only "
                f"{self.block_manager.num_blocks} (raise kv_cache_memory_bytes or lower max_tokens)")
        seq = Sequence(next(self._seq_ids), request_id, prompt, params, self.eos_token_ids)
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at once (unknown or finished ids are ignored)."""
        seq = self._requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- the loop ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return the requests that got new tokens (finished ones included)."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        items = [ForwardItem(s.seq.seq_id, s.seq.token_ids[s.seq.num_computed_tokens:][: s.num_new_tokens],
                             s.seq.num_computed_tokens, int(self._completes(s))) for s in scheduled]
        logits = self.runner.forward(items)
        sampling = [s.seq for s in scheduled if self._completes(s)]
        tokens = self._sample(sampling, logits).tolist() if sampling else []
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            s.seq.stats.num_steps += 1
        return [self._append(seq, [token]) for seq, token in zip(sampling, tokens)]

    @staticmethod
    def _completes(s: ScheduledSeq) -> bool:
        """Whether this step feeds the sequence's last token (so its next token can be sampled)."""
        return s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens and seq.stop_ids:
                logits[row, list(seq.stop_ids)] = float("-inf")
        return self.sampler(logits, [s.params.temperature for s in seqs], [s.params.top_k for s in seqs],
                            [s.params.top_p for s in seqs], [s.params.min_p for s in seqs],
                            [s.generator for s in seqs])

    def _append(self, seq: Sequence, tokens: list[int]) -> RequestOutput:
        """Append new tokens, cutting at a stop token, max_tokens or the context; finish the sequence if done."""
        now = time.perf_counter()
        if seq.stats.first_token_time is None:
            seq.stats.first_token_time = now
        for token in tokens:
            seq.token_ids.append(token)
            if token in seq.stop_ids:  # min_tokens is enforced by masking stop tokens before sampling
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                seq.stats.finish_time = now
                self.scheduler.finish(seq)
                self._requests.pop(seq.request_id, None)
                break
        return seq.to_output()


def _check_token_ids(token_ids, vocab_size: int) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, str) or not hasattr(token_ids, "__len__"):
        raise TypeError(f"prompt_token_ids must be a list of ints, got {type(token_ids).__name__}")
    if len(token_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    ids = []
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"prompt_token_ids must hold ints, found {t!r}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(int(t))
    return ids


def _eos_token_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
