"""The models beside the target: fusion members, draft models and EAGLE-3 heads, loaded when given by name and
checked against the target (vocabulary, device), as ``LLMEngine`` takes them from its configs."""

from __future__ import annotations

from torch import nn

from cospec.decoding.eagle3 import Eagle3Head
from cospec.decoding.ngram_model import NgramLM
from cospec.decoding.proposers import check_same_vocabulary
from cospec.engine.config import FusionConfig, SpeculativeConfig


def fusion_members(target: nn.Module, vocab_size: int, fusion: FusionConfig | None, dtype, tokenizer) -> list:
    """The group's members as objects: HF models (loaded if given by name, vocabulary checked) or NgramLMs."""
    if fusion is None:
        return []
    return [checked_ngram(member, vocab_size) if isinstance(member, NgramLM)
            else companion_model(target, member, dtype, tokenizer) for member in fusion.members]


def draft_source(target: nn.Module, speculative: SpeculativeConfig | None, dtype,
                 tokenizer) -> tuple[nn.Module | None, int | None]:
    """(model that drafts, number of its layers used) for model-based speculation; (None, None) otherwise."""
    if speculative is None or speculative.method in ("prompt_lookup", "ngram", "eagle3"):
        return None, None
    if speculative.method == "self_spec":
        return target, speculative.self_spec_layers
    return companion_model(target, speculative.draft_model, dtype, tokenizer), None


def draft_head(target: nn.Module, speculative: SpeculativeConfig | None, model_name: str | None) -> Eagle3Head | None:
    """The EAGLE-3 head of method='eagle3' (loaded if given as a directory or "default"), bound to the target."""
    if speculative is None or speculative.method != "eagle3":
        return None
    if isinstance(speculative.draft_head, Eagle3Head):
        return speculative.draft_head.bind(target)
    from cospec.decoding.eagle3_checkpoint import load_head
    from cospec.engine.models import resolve_draft_head

    return load_head(resolve_draft_head(speculative.draft_head, model_name), target)


def checked_ngram(ngram: NgramLM, vocab_size: int) -> NgramLM:
    if ngram.vocab_size != vocab_size:
        raise ValueError(f"the n-gram model's vocabulary ({ngram.vocab_size} tokens) differs from the "
                         f"target's ({vocab_size})")
    return ngram


def companion_model(target: nn.Module, model: nn.Module | str, dtype, tokenizer) -> nn.Module:
    """A draft or fusion member: loaded (beside the target, in its dtype) when given by name or path, and checked
    to share the target's vocabulary and device."""
    companion_tokenizer = None
    if isinstance(model, str):
        from cospec.engine.models import load_model

        weight = next(target.parameters())
        model, companion_tokenizer = load_model(model, dtype=dtype or weight.dtype, device=weight.device)
    check_same_vocabulary(target, model, tokenizer, companion_tokenizer)
    return model.eval()
