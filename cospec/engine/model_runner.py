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

import torch
from torch import nn

from cospec.decoding.eagle3 import capture_aux_hidden_states
from cospec.decoding.protocols import ForwardItem
from cospec.engine import attention
from cospec.engine.block_manager import BlockManager
from cospec.engine.cpu_linear import cpu_linears
from cospec.engine.cpu_threads import CpuLinears
from cospec.engine.input_batch import InputBatch, StepInputs
from cospec.engine.kv_cache import KVCachePool, PagedCache


class ModelRunner:
    def __init__(self, model: nn.Module, block_manager: BlockManager, num_blocks: int, dtype: torch.dtype,
                 fast_cpu_linear: bool = True, num_layers: int | None = None,
                 packed_cpu_weights: bool = True, capture_layers: tuple[int, ...] | None = None) -> None:
        """``num_layers``: run only the first layers (+ final norm + LM head), the self-speculation draft.
        ``capture_layers``: keep the input hidden states of these layers from each forward in ``aux_hidden_states``
        (``[num_tokens, len(capture_layers) * H]``), what an EAGLE-3 draft head reads."""
        attention.register()
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.device = next(model.parameters()).device
        self.block_manager = block_manager
        self.num_layers = num_layers
        if num_layers is not None:
            _check_layer_skipping(model, num_layers)
        self.pool = KVCachePool(self.config, num_blocks, block_manager.block_size, dtype, self.device, num_layers,
                                zeroed=_reads_unwritten_slots(block_manager))
        self.cache = PagedCache(self.pool)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        linears = cpu_linears(model) if fast_cpu_linear and self.device.type == "cpu" else []
        self.cpu_linears = CpuLinears(linears, packed_cpu_weights) if linears else None
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.capture_layers = capture_layers
        self.aux_hidden_states: torch.Tensor | None = None
        self.input_batch = InputBatch(block_manager, self.device)
        self._attention_fields = _attention_fields(model.config)

    def padded_rows(self, num_tokens):
        """The rows a forward of ``num_tokens`` tokens runs on the CPU (the row plan pads some counts); an int, or
        elementwise for an int64 tensor."""
        return self.cpu_linears.padded_rows(num_tokens) if self.cpu_linears else num_tokens

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, items: list[ForwardItem]) -> torch.Tensor:
        """Logits ``[sum(num_logits), vocab_size]`` for the requested positions, sequence by sequence."""
        with torch.inference_mode():  # (an inference tensor: what changes logits makes a new tensor)
            inputs, meta = self.input_batch.prepare(items)
            embeds = self._embeds(items, inputs.input_ids) if any(it.embeds is not None for it in items) else None
            return self._forward(inputs, meta, embeds)

    def forward_decode(self, seq_ids: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """``forward`` for a plain decoding step, from lists: sequence ``seq_ids[i]``'s token ``token_ids[i]`` at
        ``positions[i]``; logits ``[len(seq_ids), vocab_size]``. (No ForwardItem per sequence.)"""
        with torch.inference_mode():
            return self._forward(*self.input_batch.prepare_decode(seq_ids, token_ids, positions))

    def _forward(self, inputs: StepInputs, meta: attention.StepMetadata,
                 embeds: torch.Tensor | None = None) -> torch.Tensor:
        self.cache.start_step(meta.slot_mapping)
        kwargs = {self._cache_kwarg: self.cache, "use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = inputs.logit_rows
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds[None]
        else:
            kwargs["input_ids"] = inputs.input_ids[None]
        capture = (capture_aux_hidden_states(self.model, self.capture_layers) if self.capture_layers
                   else contextlib.nullcontext())
        head_rows = len(inputs.logit_rows) if self._has_logits_to_keep else None
        with (self._cospec_mode(len(inputs.input_ids), head_rows), attention.step_context(meta, self.pool),
              capture as captured):
            out = self.model(position_ids=inputs.positions[None], **kwargs)
        if captured is not None:
            self.aux_hidden_states = torch.cat(captured, dim=-1)[0]
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
    def _cospec_mode(self, num_tokens: int, num_logits: int | None = None):
        """Switch the model to paged attention (and, on the CPU, to the linear paths and thread count chosen for
        ``num_tokens`` rows, ``num_logits`` of them through the LM head) for one forward, then restore it."""
        previous = self._attention_implementations()
        self._set_attention(attention.ATTN_IMPLEMENTATION)
        if self.num_layers is not None:
            all_layers = self.config.num_hidden_layers
            self.config.num_hidden_layers = self.num_layers  # HF decoders loop over layers[: num_hidden_layers]
        try:
            with self.cpu_linears.forward(num_tokens, num_logits) if self.cpu_linears else contextlib.nullcontext():
                yield
        finally:
            self._set_attention(previous)
            if self.num_layers is not None:  # (a config attribute write costs ~8 us: only when one was made)
                self.config.num_hidden_layers = all_layers

    def _attention_implementations(self) -> list | str:
        """What the model's configs say now: per config (direct fields), else the top config's setting."""
        if self._attention_fields is None:
            return self.model.config._attn_implementation
        return [fields["_attn_implementation_internal"] for fields in self._attention_fields]

    def _set_attention(self, implementations: list | str) -> None:
        """Set the attention implementation of the model's config and every sub-config, as HF's setter does: one
        for all (a str) or per config (what ``_attention_implementations`` returned). Written straight into the
        configs' fields where they have them: HF's setter costs ~12 us a call, two calls per forward."""
        if self._attention_fields is None:
            self.model.config._attn_implementation = implementations
            return
        if isinstance(implementations, str):
            implementations = [implementations] * len(self._attention_fields)
        for fields, value in zip(self._attention_fields, implementations):
            fields["_attn_implementation_internal"] = value


def _reads_unwritten_slots(block_manager: BlockManager) -> bool:
    """Whether attention may read slots no step wrote: with several regions, the strided view of a batch reads each
    row up to the longest sequence's length (masked, but the values must be finite). A lone region is read only as
    far as its sequence (zeroing its pool would cost ~5 ms a ``generate()`` call at SmolLM2's size)."""
    return block_manager.region_blocks is not None and block_manager.num_blocks > block_manager.region_blocks


def _attention_fields(config) -> list[dict] | None:
    """The attribute dicts of ``config`` and its sub-configs (recursively), the objects whose attention
    implementation HF's ``_attn_implementation`` setter writes; None if one of them keeps it elsewhere (then the
    setter is used)."""
    configs, stack = [], [config]
    while stack:
        current = stack.pop()
        configs.append(current)
        for key in getattr(current, "sub_configs", None) or {}:
            sub = getattr(current, key, None)
            if sub is not None:
                stack.append(sub)
    fields = [getattr(c, "__dict__", {}) for c in configs]
    return fields if all("_attn_implementation_internal" in f for f in fields) else None


def _check_layer_skipping(model: nn.Module, num_layers: int) -> None:
    total = model.config.get_text_config().num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"self-speculation needs 1 <= layers < {total} (the model's depth), got {num_layers}")
    decoder = getattr(model, "model", None)
    source = inspect.getsource(type(decoder).forward) if decoder is not None else ""
    if "[: self.config.num_hidden_layers]" not in source:
        raise ValueError(f"self-speculation is not supported for {type(model).__name__}: its decoder does not "
                         "loop over config.num_hidden_layers layers")
