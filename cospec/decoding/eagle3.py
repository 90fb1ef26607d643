"""EAGLE-3 draft head: one decoder layer that drafts from the target's own hidden states.

Terms:
- aux hidden states: the target's hidden states at the *input* of its decoder layers ``aux_layer_ids`` (default
  ``(2, N // 2, N - 3)`` of N layers; the indices of HF ``output_hidden_states``, before the final norm),
  concatenated per position: ``[num_tokens, len(aux_layer_ids) * H_target]``.
- fc: ``Linear(3 * H_target, H)`` mixes them into one state per position.
- head position t: pairs a state for position t (fc of the target's states at t; while drafting, the head's own
  output state of the step before) with the embedding of token t + 1, and predicts token t + 2. The decoder layer's
  attention reads ``cat(input_layernorm(embedding), hidden_norm(state))`` (width 2H); the residual is the state
  itself (or its normalized form with ``norm_before_residual``).
- draft vocabulary: the head's LM head covers ``draft_vocab_size`` target tokens. ``d2t[i]`` is the offset of draft
  id i (target id = i + d2t[i]); ``t2d`` marks the target ids that are in the draft vocabulary.
- training-time test (TTT): training unrolls the head on its own output states for several steps; step s of a
  position attends to step 0 of every earlier position and to its own steps 1..s (``ttt_attention``), exactly what
  it sees while drafting.

Token embeddings are the target's (frozen, not stored), unless a loaded checkpoint carries its own.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

TTT_ATTENTION = "cospec_eagle3_ttt"
# LlamaAttention takes its cache as ``cache`` in recent transformers, ``past_key_values`` before.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """The layers whose inputs EAGLE-3 reads (as vLLM, speculators and the EAGLE repository do), clamped into the
    model for models of fewer than 5 layers."""
    return tuple(min(max(layer, 0), num_layers - 1) for layer in (2, num_layers // 2, num_layers - 3))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (``model.model.layers`` for the common families)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return layers


@contextlib.contextmanager
def capture_aux_hidden_states(model: nn.Module, layer_ids: tuple[int, ...]):
    """Inside the block, every forward of ``model`` stores the input hidden states of layers ``layer_ids`` (each
    ``[batch, tokens, H]``) in the yielded list, in ``layer_ids`` order."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layer_ids)

    def hook(slot: int):
        def store(module, args, kwargs):
            captured[slot] = args[0] if args else kwargs["hidden_states"]
        return store

    handles = [layers[layer].register_forward_pre_hook(hook(slot), with_kwargs=True)
               for slot, layer in enumerate(layer_ids)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class Eagle3DecoderLayer(nn.Module):
    """A Llama decoder layer whose attention reads ``cat(embedding, state)``: q/k/v projections of width 2H."""

    def __init__(self, config: LlamaConfig, norm_before_residual: bool = False) -> None:
        super().__init__()
        self.norm_before_residual = norm_before_residual
        self.self_attn = LlamaAttention(config, layer_idx=0)
        head_dim = self.self_attn.head_dim
        width = 2 * config.hidden_size
        self.self_attn.q_proj = nn.Linear(width, config.num_attention_heads * head_dim, bias=config.attention_bias)
        self.self_attn.k_proj = nn.Linear(width, config.num_key_value_heads * head_dim, bias=config.attention_bias)
        self.self_attn.v_proj = nn.Linear(width, config.num_key_value_heads * head_dim, bias=config.attention_bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,  # [batch, tokens, H] embeddings of tokens t + 1
        states: torch.Tensor,  # [batch, tokens, H] fc output or the head's previous output state
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [batch, tokens, H] output state (before the final norm)
        normed = self.hidden_norm(states)
        residual = normed if self.norm_before_residual else states
        attn_input = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        attn_out, _ = self.self_attn(attn_input, position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, **{_CACHE_KWARG: cache})
        hidden = residual + attn_out
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """The EAGLE-3 head. ``config`` is its decoder layer's ``LlamaConfig`` (``vocab_size``: the target's vocabulary);
    ``bind(target)`` checks that it fits a target model and borrows the target's token embeddings."""

    def __init__(self, config: LlamaConfig, draft_vocab_size: int, target_hidden_size: int,
                 aux_layer_ids: tuple[int, ...], norm_before_residual: bool = False,
                 own_embeddings: bool = False) -> None:
        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"an EAGLE-3 head has one decoder layer; this config has {config.num_hidden_layers}")
        if not 0 < draft_vocab_size <= config.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, {config.vocab_size}], got {draft_vocab_size}")
        self.config = config
        self.draft_vocab_size = draft_vocab_size
        self.target_hidden_size = target_hidden_size
        self.aux_layer_ids = tuple(int(i) for i in aux_layer_ids)
        self.norm_before_residual = norm_before_residual
        hidden = config.hidden_size
        self.fc = nn.Linear(len(self.aux_layer_ids) * target_hidden_size, hidden, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(config, norm_before_residual)])
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden) if own_embeddings else None
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))
        full_vocabulary = draft_vocab_size == config.vocab_size
        self.register_buffer("t2d", torch.full((config.vocab_size,), full_vocabulary, dtype=torch.bool))
        self._target_embeddings: list[nn.Module] = []  # borrowed, not a submodule: never saved or trained

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def for_target(cls, target: nn.Module, draft_token_ids: torch.Tensor | list[int],
                   aux_layer_ids: tuple[int, ...] | None = None, norm_before_residual: bool = False) -> Eagle3Head:
        """A new (randomly initialised) head for ``target`` whose draft vocabulary is ``draft_token_ids`` (target
        ids), in the target's dtype and device, bound to it."""
        text = target.config.get_text_config()
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        config = LlamaConfig(
            vocab_size=target.get_output_embeddings().weight.shape[0], hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size, num_hidden_layers=1,
            num_attention_heads=text.num_attention_heads, num_key_value_heads=num_kv_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            hidden_act=getattr(text, "hidden_act", "silu"), rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            rope_parameters=_rope_parameters(text), attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
        ids = torch.as_tensor(draft_token_ids, dtype=torch.int64).unique(sorted=True)
        head = cls(config, len(ids), text.hidden_size,
                   aux_layer_ids or default_aux_layer_ids(text.num_hidden_layers), norm_before_residual)
        head.set_draft_vocabulary(ids)
        weight = target.get_output_embeddings().weight
        return head.to(weight.device, weight.dtype).bind(target)

    def set_draft_vocabulary(self, token_ids: torch.Tensor) -> None:
        """d2t and t2d from the sorted target ids of the draft vocabulary."""
        if len(token_ids) != self.draft_vocab_size:
            raise ValueError(f"{len(token_ids)} draft token ids for a draft vocabulary of {self.draft_vocab_size}")
        self.d2t.copy_(token_ids.to(self.d2t.device) - torch.arange(len(token_ids), device=self.d2t.device))
        self.t2d.zero_()
        self.t2d[token_ids.to(self.t2d.device)] = True

    def bind(self, target: nn.Module) -> Eagle3Head:
        """Check that the head fits ``target`` (a ValueError names any mismatch) and borrow its token embeddings."""
        text = target.config.get_text_config()
        if text.hidden_size != self.target_hidden_size:
            raise ValueError(f"the draft head reads target hidden states of size {self.target_hidden_size}, but the "
                             f"model's hidden size is {text.hidden_size}: the head was trained for another model")
        vocab_size = target.get_output_embeddings().weight.shape[0]
        if vocab_size != self.config.vocab_size:
            raise ValueError(f"the draft head maps onto a vocabulary of {self.config.vocab_size} tokens, but the "
                             f"model's has {vocab_size}: the head was trained for another model")
        num_layers = text.num_hidden_layers
        if max(self.aux_layer_ids) >= num_layers or min(self.aux_layer_ids) < 0:
            raise ValueError(f"the draft head reads the hidden states of layers {list(self.aux_layer_ids)}, but the "
                             f"model has {num_layers} layers: the head was trained for another model")
        if self.embed_tokens is None:
            embeddings = target.get_input_embeddings()
            if embeddings.weight.shape[1] != self.config.hidden_size:
                raise ValueError(f"the draft head's hidden size {self.config.hidden_size} differs from the model's "
                                 f"embedding size {embeddings.weight.shape[1]}, and the head has no embeddings of "
                                 "its own")
            self._target_embeddings = [embeddings]
        return self

    # ---- forward ----------------------------------------------------------------------------------------------
    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def combine(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """fc: ``[..., len(aux_layer_ids) * H_target]`` -> ``[..., H]``."""
        return self.fc(aux_hidden_states)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(token_ids)
        if not self._target_embeddings:
            raise RuntimeError("the draft head is not bound to a target model: call head.bind(target) first")
        with torch.no_grad():  # frozen: the target's
            return self._target_embeddings[0](token_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, tokens] target ids of the tokens t + 1
        position_ids: torch.Tensor,  # [batch, tokens] positions t
        states: torch.Tensor,  # [batch, tokens, H] fc output (or the head's previous output states)
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [batch, tokens, H] output states, before the final norm
        embeds = self.embed(input_ids).to(states.dtype)
        position_embeddings = self.rotary_emb(states, position_ids)
        return self.layers[0](embeds, states, position_embeddings, cache, attention_mask)

    def compute_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary: ``[..., H]`` -> ``[..., draft_vocab_size]``."""
        return self.lm_head(self.norm(states))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """``[rows, draft_vocab_size]`` -> ``[rows, vocab_size]`` with -inf outside the draft vocabulary, so that
        the draft's probabilities are 0 there."""
        full = draft_logits.new_full((draft_logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self.to_target_ids(torch.arange(self.draft_vocab_size, device=draft_logits.device))] = draft_logits
        return full


def _rope_parameters(text_config) -> dict:
    params = getattr(text_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params and "rope_type" in params:
        return dict(params)
    return {"rope_type": "default", "rope_theta": getattr(text_config, "rope_theta", 10000.0)}


# ---- training-time-test attention ------------------------------------------------------------------------------


class TTTCache:
    """Keys and values of every unrolled step so far (training): ``update`` appends this step's and returns all
    steps, concatenated along the token axis."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.keys.append(key_states)
        self.values.append(value_states)
        return torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2)


def ttt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of unrolled step s: query ``[B, heads, T, d]``, keys/values ``[B, kv_heads, (s + 1) * T, d]`` (steps
    0..s). Position t attends to step 0 at positions allowed by ``attention_mask`` (bool ``[B or 1, 1, T, T]``,
    causal) and to its own steps 1..s only. Returns ``[B, T, heads, d]``."""
    num_tokens = query.shape[2]
    num_steps = key.shape[2] // num_tokens
    own = torch.eye(num_tokens, dtype=torch.bool, device=query.device).expand(*attention_mask.shape[:2], -1, -1)
    mask = torch.cat([attention_mask] + [own] * (num_steps - 1), dim=-1)  # [B, 1, T, (s + 1) * T]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TTT_ATTENTION, ttt_attention)


def causal_mask(lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``: position t sees positions <= t of its own row, padding sees only itself (no NaN)."""
    pos = torch.arange(num_tokens, device=lengths.device)
    visible = pos[None, :] <= pos[:, None]  # [T, T]
    valid_key = pos[None, :] < lengths[:, None]  # [B, T]
    mask = visible[None] & valid_key[:, None, :]
    return (mask | torch.eye(num_tokens, dtype=torch.bool, device=lengths.device)[None])[:, None]


def unrolled_states(
    head: Eagle3Head,
    states: torch.Tensor,  # [B, T, H] fc output at positions 0..T-1
    fed_token_ids: torch.Tensor,  # [B, T + num_steps - 1]: step s feeds token t + 1 + s (at index t + s) at position t
    attention_mask: torch.Tensor,  # bool [B, 1, T, T]
    num_steps: int,
) -> list[torch.Tensor]:  # num_steps x [B, T, H]: the state of step s at position t predicts token t + 2 + s
    """Training-time test: run the head ``num_steps`` times, each step on its own previous output states."""
    config = head.config
    previous, config._attn_implementation = config._attn_implementation, TTT_ATTENTION
    try:
        cache, outputs = TTTCache(), []
        num_tokens = states.shape[1]
        positions = torch.arange(num_tokens, device=states.device)[None].expand(states.shape[0], -1)
        for step in range(num_steps):
            states = head(fed_token_ids[:, step:step + num_tokens], positions + step, states, cache, attention_mask)
            outputs.append(states)
        return outputs
    finally:
        config._attn_implementation = previous
