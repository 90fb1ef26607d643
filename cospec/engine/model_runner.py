"""Runs one ragged forward of a HF causal LM over the engine's paged KV cache.

Design: cospec does not copy model code. It drives the HF modules as they are, through the two hooks transformers
offers for this (its own continuous batching uses the same): a cache object whose ``update`` writes K/V into our
pages, and a registered attention function that reads them back per sequence (``cospec.engine.attention``).
Sequences are packed into one row of ``num_tokens`` tokens with explicit position ids, so prefill chunks, 1-token
decodes and multi-token verify windows of different sequences share one forward.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from cospec.decoding.protocols import ForwardItem
from cospec.engine import attention
from cospec.engine.block_manager import BlockManager
from cospec.engine.cpu_linear import cpu_linears
from cospec.engine.cpu_threads import CpuLinears
from cospec.engine.kv_cache import KVCachePool, PagedCache


class ModelRunner:
    def __init__(self, model: nn.Module, block_manager: BlockManager, num_blocks: int, dtype: torch.dtype,
                 fast_cpu_linear: bool = True, num_layers: int | None = None,
                 packed_cpu_weights: bool = True) -> None:
        """``num_layers``: run only the first layers (+ final norm + LM head), the self-speculation draft."""
        attention.register()
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.device = next(model.parameters()).device
        self.block_manager = block_manager
        self.num_layers = num_layers
        if num_layers is not None:
            _check_layer_skipping(model, num_layers)
        self.pool = KVCachePool(self.config, num_blocks, block_manager.block_size, dtype, self.device, num_layers)
        self.cache = PagedCache(self.pool)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        linears = cpu_linears(model) if fast_cpu_linear and self.device.type == "cpu" else []
        self.cpu_linears = CpuLinears(linears, packed_cpu_weights) if linears else None
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    def padded_rows(self, num_tokens: int) -> int:
        """The rows a forward of ``num_tokens`` tokens runs on the CPU (the row plan pads some counts)."""
        return self.cpu_linears.padded_rows(num_tokens) if self.cpu_linears else num_tokens

    # ---- metadata ------------------------------------------------------------------------------------------
    def _metadata(self, items: list[ForwardItem]) -> tuple[StepInputs, attention.StepMetadata]:
        bm, device = self.block_manager, self.device
        block_size = bm.block_size
        q_lens = [len(it.token_ids) for it in items]
        kv_lens = [it.start_pos + n for it, n in zip(items, q_lens)]
        num_seqs, max_q, max_kv = len(items), max(q_lens), max(kv_lens)
        offsets = torch.arange(block_size)
        gather = torch.zeros(num_seqs, max_kv, dtype=torch.int64)
        slot_parts, pos_parts, logit_rows = [], [], []
        q_positions = torch.zeros(num_seqs, max_q, dtype=torch.int64)
        packed = 0
        for i, (it, q_len, kv_len) in enumerate(zip(items, q_lens, kv_lens)):
            table = torch.tensor(bm.block_tables[it.seq_id][: bm.num_blocks_for(kv_len)], dtype=torch.int64)
            slots = (table[:, None] * block_size + offsets).flatten()[:kv_len]
            gather[i, :kv_len] = slots
            slot_parts.append(slots[it.start_pos:])
            positions = torch.arange(it.start_pos, kv_len)
            pos_parts.append(positions)
            q_positions[i, :q_len] = positions
            logit_rows.extend(range(packed + q_len - it.num_logits, packed + q_len))
            packed += q_len
        if all(n == max_q for n in q_lens):
            q_pad_index = q_unpad_index = None
        else:  # scatter packed queries into [num_seqs, max_q] rows and back
            padded_row = torch.cat([torch.arange(n) + i * max_q for i, n in enumerate(q_lens)])
            q_unpad_index = padded_row
            q_pad_index = torch.zeros(num_seqs * max_q, dtype=torch.int64)
            q_pad_index[padded_row] = torch.arange(packed)
        meta = attention.StepMetadata(
            q_lens=q_lens, kv_lens=kv_lens,
            slot_mapping=torch.cat(slot_parts).to(device),
            kv_gather_index=gather.to(device), q_positions=q_positions.to(device),
            q_pad_index=None if q_pad_index is None else q_pad_index.to(device),
            q_unpad_index=None if q_unpad_index is None else q_unpad_index.to(device),
        )
        input_ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.int64, device=device)
        # int64 even when empty (a step of prefill chunks only): torch.tensor([]) is float and cannot index.
        logit_rows = torch.tensor(logit_rows, dtype=torch.int64, device=device)
        return StepInputs(input_ids, torch.cat(pos_parts).to(device), logit_rows), meta

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, items: list[ForwardItem]) -> torch.Tensor:
        """Logits ``[sum(num_logits), vocab_size]`` for the requested positions, sequence by sequence."""
        with torch.inference_mode():
            logits = self._forward(items)
        # Cloned outside inference mode into a plain tensor: callers mask it in place (min_tokens bans stop tokens),
        # which an inference tensor refuses outside inference mode (LLMEngine.step / LLM.generate run outside it).
        return logits.clone()

    def _forward(self, items: list[ForwardItem]) -> torch.Tensor:
        inputs, meta = self._metadata(items)
        self.cache.slot_mapping = meta.slot_mapping
        kwargs = {self._cache_kwarg: self.cache, "use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = inputs.logit_rows
        if any(it.embeds is not None for it in items):
            kwargs["inputs_embeds"] = self._embeds(items, inputs.input_ids)[None]
        else:
            kwargs["input_ids"] = inputs.input_ids[None]
        with self._cospec_mode(len(inputs.input_ids)), attention.step_context(meta, self.pool):
            out = self.model(position_ids=inputs.positions[None], **kwargs)
        logits = out.logits[0]
        if not self._has_logits_to_keep:
            logits = logits[inputs.logit_rows]
        return logits[:, : self.vocab_size]

    def _embeds(self, items: list[ForwardItem], input_ids: torch.Tensor) -> torch.Tensor:
        """``[num_tokens, hidden_size]``: the token embeddings of the packed row, with the rows that items give as
        embeddings (prompts given as embeddings) replaced."""
        embeds = self.model.get_input_embeddings()(input_ids)
        offset = 0
        for it in items:
            if it.embeds is not None:
                embeds[offset: offset + it.embeds.shape[0]] = it.embeds
            offset += len(it.token_ids)
        return embeds

    @contextlib.contextmanager
    def _cospec_mode(self, num_tokens: int):
        """Switch the model to paged attention (and, on the CPU, to the linear paths and thread count chosen for
        ``num_tokens`` rows) for one forward, then restore it."""
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = attention.ATTN_IMPLEMENTATION
        all_layers = self.config.num_hidden_layers
        if self.num_layers is not None:
            self.config.num_hidden_layers = self.num_layers  # HF decoders loop over layers[: num_hidden_layers]
        try:
            with self.cpu_linears.forward(num_tokens) if self.cpu_linears else contextlib.nullcontext():
                yield
        finally:
            config._attn_implementation = previous
            self.config.num_hidden_layers = all_layers


def _check_layer_skipping(model: nn.Module, num_layers: int) -> None:
    total = model.config.get_text_config().num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"self-speculation needs 1 <= layers < {total} (the model's depth), got {num_layers}")
    decoder = getattr(model, "model", None)
    source = inspect.getsource(type(decoder).forward) if decoder is not None else ""
    if "[: self.config.num_hidden_layers]" not in source:
        raise ValueError(f"self-speculation is not supported for {type(model).__name__}: its decoder does not "
                         "loop over config.num_hidden_layers layers")


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    logit_rows: torch.Tensor  # [num_logits] rows of the packed batch whose logits are returned
