"""``cospec.generate`` against Hugging Face ``generate`` for what HF users pass beyond plain prompts: several
sequences per prompt, scores and logits, stop strings, ``inputs_embeds``, generation from the BOS token, attention
masks with gaps and position ids (float64 tiny models, five families); the refusal contract; and speculation
(prompt lookup, a draft model, self-speculation) giving the same outputs for each of these.

In every batch an eos token stops a row early, so that what HF does with finished rows (pads, and scores computed on
them) is compared too.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import (FAMILIES, left_padded_batch, one_thread, random_prompt, tiny_model,  # noqa: F401 (fixture)
                          tiny_tokenizer)

import cospec
from cospec.engine.generate_inputs import _sliding_window

VOCAB, PAD, BOS = 128, 0, 1
NEW = 14
LENGTHS = [6, 11, 3, 8]
pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(model, *args, **kwargs):
    """HF's own generate (even if ``model`` is patched)."""
    return getattr(model, "_cospec_hf_generate", model.generate)(*args, **kwargs)


def _model_with_early_eos(family: str, input_ids, **generate_kwargs):
    """The family's tiny model with an eos token that row 0 emits early while another row never does."""
    probe = tiny_model(family, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS)
    free = _hf(probe, input_ids, max_new_tokens=NEW, do_sample=False, **generate_kwargs)[:, input_ids.shape[1]:]
    rows = free.tolist()
    eos = next(t for i, t in enumerate(rows[0][3:NEW - 3], 3) if t not in rows[0][:i] and any(t not in r for r in rows))
    return tiny_model(family, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=eos)


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    """(family, model, input_ids, attention_mask): a left-padded batch in which eos stops row 0 early."""
    input_ids, mask = left_padded_batch(LENGTHS, VOCAB, pad_token_id=PAD, seed=3)
    return request.param, _model_with_early_eos(request.param, input_ids, attention_mask=mask), input_ids, mask


@pytest.fixture(scope="module")
def llama_setup():
    input_ids, mask = left_padded_batch(LENGTHS, VOCAB, pad_token_id=PAD, seed=3)
    return _model_with_early_eos("llama", input_ids, attention_mask=mask), input_ids, mask


def assert_same_output(got, expected) -> None:
    """Same class, same tokens, and scores / logits of the same shapes and dtype, equal up to float32 rounding."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype
        assert torch.equal(got, expected), f"cospec\n{got}\nHF\n{expected}"
        return
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences), f"cospec\n{got.sequences}\nHF\n{expected.sequences}"
    for name in ("scores", "logits"):
        ours, theirs = getattr(got, name), getattr(expected, name)
        assert (ours is None) == (theirs is None), name
        if theirs is None:
            continue
        assert isinstance(ours, tuple) and len(ours) == len(theirs), name
        for step, (a, b) in enumerate(zip(ours, theirs)):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, (name, step)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} at step {step}: {m}")


# ---- each feature against HF, five families --------------------------------------------------------------------

def test_scores_and_logits_equal_hf(family_setup):
    family, _, input_ids, mask = family_setup
    processing = dict(repetition_penalty=1.3, min_new_tokens=2)
    model = _model_with_early_eos(family, input_ids, attention_mask=mask, **processing)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, **processing)
    expected = _hf(model, input_ids, **kwargs)
    assert_same_output(cospec.generate(model, input_ids, **kwargs), expected)
    assert len(expected.scores) == NEW
    assert (expected.sequences[0, -3:] == PAD).all()  # row 0 finished: its scores on pad tokens are compared too
    assert not all(torch.equal(s, z) for s, z in zip(expected.scores, expected.logits))  # scores are processed


def test_sampled_num_return_sequences_and_scores_equal_hf(family_setup):
    """Sampling with top_k=1 is deterministic, so HF's output is known: each prompt repeated, warped scores."""
    family, model, input_ids, mask = family_setup
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=1, temperature=0.7,
                  num_return_sequences=3, return_dict_in_generate=True, output_scores=True)
    expected = _hf(model, input_ids, **kwargs)
    got = cospec.generate(model, input_ids, **kwargs)
    assert_same_output(got, expected)
    assert got.sequences.shape[0] == 3 * len(LENGTHS)
    assert torch.equal(got.sequences[:, : input_ids.shape[1]], input_ids.repeat_interleave(3, dim=0))


@pytest.mark.parametrize("with_ids", [False, True], ids=["embeds_only", "ids_and_embeds"])
def test_inputs_embeds_equal_hf(family_setup, with_ids):
    family, model, input_ids, mask = family_setup
    embeds = _soft_prompt(model, input_ids)
    ids = input_ids if with_ids else None
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True)
    expected = _hf(model, ids, inputs_embeds=embeds, **kwargs)
    got = cospec.generate(model, ids, inputs_embeds=embeds, **kwargs)
    assert_same_output(got, expected)
    assert got.sequences.shape[1] == (input_ids.shape[1] if with_ids else 0) + NEW  # embeddings only: new tokens only
    from_ids = cospec.generate(model, input_ids, attention_mask=mask, max_new_tokens=NEW)
    assert not torch.equal(from_ids[:, -NEW:], got.sequences[:, -NEW:])  # the embeddings are what the model read


def _soft_prompt(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, length, hidden]``: the tokens' embeddings, shifted enough to change what the model generates."""
    noise = torch.randn(*input_ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    with torch.no_grad():
        return model.get_input_embeddings()(input_ids) + 0.5 * noise


def test_generation_from_bos_equals_hf(family_setup):
    family, model, _, _ = family_setup
    kwargs = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True)
    expected = _hf(model, **kwargs)
    got = cospec.generate(model, **kwargs)
    assert_same_output(got, expected)
    assert got.sequences.shape[0] == 1 and got.sequences[0, 0] == BOS and len(got.logits) == got.sequences.shape[1] - 1


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(VOCAB)


def _stop_string(tokenizer, new_tokens: torch.Tensor, eos: int | None) -> str:
    """A 2-3 character string that row 0's output completes (before its eos) and some other row's never contains."""
    rows = [r[: r.index(eos)] if eos in r else r for r in new_tokens.tolist()]
    others = [tokenizer.decode(r) for r in rows[1:]]
    for end in range(len(rows[0])):
        before, text = tokenizer.decode(rows[0][:end]), tokenizer.decode(rows[0][: end + 1])
        for size in (3, 2):
            stop = text[-size:]
            if " " not in stop and stop not in before and any(stop not in other for other in others):
                return stop
    raise AssertionError(f"no usable stop string in {[tokenizer.decode(r) for r in rows]}")


@pytest.mark.parametrize("has_eos", [True, False], ids=["eos", "no_eos"])
def test_stop_strings_equal_hf(family_setup, tokenizer, has_eos):
    """A row that completes a stop string is padded when there is an eos token; without one HF lets it go on until
    every row is done (cospec too). Alone, a row ends at the string."""
    family, model, input_ids, mask = family_setup
    if not has_eos:
        model = tiny_model(family, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS)
    eos = model.generation_config.eos_token_id
    plain = _hf(model, input_ids, attention_mask=mask, max_new_tokens=NEW)
    stop = _stop_string(tokenizer, plain[:, input_ids.shape[1]:], eos)
    kwargs = dict(max_new_tokens=NEW, stop_strings=[stop], tokenizer=tokenizer)
    expected = _hf(model, input_ids, attention_mask=mask, **kwargs)
    if has_eos:
        assert not torch.equal(expected[0], plain[0]) and expected[0, -1] == PAD  # row 0 stopped early
    else:
        assert torch.equal(expected, plain)
    assert_same_output(cospec.generate(model, input_ids, attention_mask=mask, **kwargs), expected)
    alone = input_ids[:1, -LENGTHS[0]:]
    expected = _hf(model, alone, **kwargs)
    assert expected.shape[1] < LENGTHS[0] + NEW
    assert_same_output(cospec.generate(model, alone, **kwargs), expected)


# ---- masks and positions ---------------------------------------------------------------------------------------

def _gapped(input_ids: torch.Tensor, mask: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """``mask`` with the given columns masked in every row long enough to have a token before and after them."""
    mask = mask.clone()
    for row in range(mask.shape[0]):
        first = int(mask[row].argmax())
        for column in columns:
            if first < column < mask.shape[1] - 1:
                mask[row, column] = 0
    return mask


def test_masked_tokens_inside_rows_equal_hf(family_setup):
    """A masked token inside a row is not attended to, and position ids skip it (HF): the model reads the row
    without it, while processors (here repetition_penalty and no_repeat_ngram_size) still see it."""
    family, model, input_ids, mask = family_setup
    gapped = _gapped(input_ids, mask, [6, 8])
    assert (gapped != mask).sum() >= 3
    window = _sliding_window(model)
    new_tokens = NEW if window is None else 2
    kwargs = dict(max_new_tokens=new_tokens, repetition_penalty=1.5, no_repeat_ngram_size=2)
    if window is None:
        assert_same_output(cospec.generate(model, input_ids, attention_mask=gapped, **kwargs),
                           _hf(model, input_ids, attention_mask=gapped, **kwargs))
        assert not torch.equal(_hf(model, input_ids, attention_mask=gapped, **kwargs),
                               _hf(model, input_ids, attention_mask=mask, **kwargs))
        return
    # A sliding window: HF's counts the masked tokens. Equal where every row fits in the window, refused elsewhere.
    short = input_ids[:, -(window - new_tokens):]
    short_mask = _gapped(short, mask[:, -short.shape[1]:], [2])
    assert (short_mask == 0).any()
    assert_same_output(cospec.generate(model, short, attention_mask=short_mask, **kwargs),
                       _hf(model, short, attention_mask=short_mask, **kwargs))
    with pytest.raises(cospec.UnsupportedArgumentError, match="attention_mask.*sliding window"):
        cospec.generate(model, input_ids, attention_mask=gapped, **kwargs)


def test_position_ids_consistent_with_the_mask_are_accepted(llama_setup):
    model, input_ids, mask = llama_setup
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # what HF derives; padding positions do not matter
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW)
    expected = _hf(model, input_ids, position_ids=positions, **kwargs)
    assert torch.equal(expected, _hf(model, input_ids, **kwargs))
    assert_same_output(cospec.generate(model, input_ids, position_ids=positions, **kwargs), expected)
    assert_same_output(cospec.generate(model, input_ids, position_ids=mask.cumsum(dim=1) - 1, **kwargs), expected)
    with pytest.raises(cospec.UnsupportedArgumentError, match="position_ids"):
        cospec.generate(model, input_ids, position_ids=positions + 3, **kwargs)


def test_default_and_explicit_max_length_like_hf(llama_setup):
    """HF's default is 20 new tokens; an explicit max_length counts the inputs (the embeddings when there are no
    ids)."""
    model, input_ids, mask = llama_setup
    expected = _hf(model, input_ids, attention_mask=mask)
    assert expected.shape[1] == input_ids.shape[1] + 20
    assert_same_output(cospec.generate(model, input_ids, attention_mask=mask), expected)
    embeds = _soft_prompt(model, input_ids)
    for kwargs in (dict(max_length=input_ids.shape[1] + 5, min_length=input_ids.shape[1] + 4),
                   dict(inputs_embeds=embeds, max_length=input_ids.shape[1] + 5)):
        ids = None if "inputs_embeds" in kwargs else input_ids
        expected = _hf(model, ids, attention_mask=mask, **kwargs)
        assert_same_output(cospec.generate(model, ids, attention_mask=mask, **kwargs), expected)


# ---- sampling several sequences ------------------------------------------------------------------------------

def test_num_return_sequences_samples_each_prompt_independently(llama_setup):
    model, input_ids, mask = llama_setup
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, num_return_sequences=4)
    torch.manual_seed(7)
    first = cospec.generate(model, input_ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(cospec.generate(model, input_ids, **kwargs), first)  # torch.manual_seed reproduces the call
    assert first.shape == (4 * len(LENGTHS), input_ids.shape[1] + NEW)
    samples = first[:, input_ids.shape[1]:].view(len(LENGTHS), 4, -1)
    assert all(len({tuple(s[:4].tolist()) for s in prompt}) > 1 for prompt in samples)  # not copies of one sample
    with pytest.raises(ValueError, match="num_return_sequences"):  # as HF: greedy decoding gives one sequence
        cospec.generate(model, input_ids, attention_mask=mask, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        _hf(model, input_ids, attention_mask=mask, num_return_sequences=2)


# ---- the refusal contract -----------------------------------------------------------------------------------

def _right_padded(input_ids, mask):
    return input_ids.flip(1), mask.flip(1)


_UNSUPPORTED = [("num_beams", 2), ("typical_p", 0.5), ("output_attentions", True), ("output_hidden_states", True),
                ("penalty_alpha", 0.6), ("guidance_scale", 1.5), ("foo", 1), ("past_key_values", object()),
                ("prefix_allowed_tokens_fn", lambda batch, ids: [0])]
_INPUTS = ["input_ids", "no_inputs", "embeds_only", "right_padded", "bad_mask_shape"]


@pytest.fixture(scope="module")
def llama_without_bos():
    return tiny_model("llama", vocab_size=VOCAB)


@pytest.mark.parametrize("inputs", _INPUTS)
@pytest.mark.parametrize("argument, value", _UNSUPPORTED, ids=[a for a, _ in _UNSUPPORTED])
def test_every_unsupported_argument_is_named_before_any_other_check(llama_without_bos, argument, value, inputs):
    model = llama_without_bos  # no bos: generating without inputs would also be an error
    input_ids, mask = left_padded_batch([4, 6], VOCAB, pad_token_id=PAD)
    call = {"input_ids": dict(input_ids=input_ids, attention_mask=mask), "no_inputs": {},
            "embeds_only": dict(inputs_embeds=torch.randn(2, 6, model.config.hidden_size, dtype=torch.float64)),
            "right_padded": dict(zip(("input_ids", "attention_mask"), _right_padded(input_ids, mask))),
            "bad_mask_shape": dict(input_ids=input_ids, attention_mask=mask[:, 1:])}[inputs]
    with pytest.raises(cospec.UnsupportedArgumentError, match=argument):
        cospec.generate(model, max_new_tokens=4, **call, **{argument: value})


def test_refusals_that_depend_on_the_inputs_name_their_argument(llama_setup):
    model, input_ids, mask = llama_setup
    with pytest.raises(cospec.UnsupportedArgumentError, match="attention_mask.*last token"):
        cospec.generate(model, *_right_padded(input_ids, mask), max_new_tokens=4)
    with pytest.raises(cospec.UnsupportedArgumentError, match="assistant_model.*inputs_embeds"):
        cospec.generate(model, inputs_embeds=_soft_prompt(model, input_ids), assistant_model=model, max_new_tokens=4)
    with pytest.raises(cospec.UnsupportedArgumentError, match="position_ids"):
        cospec.generate(model, input_ids, attention_mask=mask, position_ids=torch.zeros_like(input_ids) + 1)


def test_malformed_inputs_raise_value_errors_naming_the_problem(llama_setup, tokenizer):
    model, input_ids, mask = llama_setup
    for kwargs, match in [(dict(attention_mask=mask[:, 1:]), "attention_mask"),
                          (dict(inputs_embeds=torch.zeros(4, 3, 7)), "inputs_embeds"),
                          (dict(inputs_embeds=_soft_prompt(model, input_ids)[:, 1:]), "same batch size and length"),
                          (dict(stop_strings=["ab"]), "tokenizer"), (dict(position_ids=mask[:1, 1:]), "position_ids")]:
        with pytest.raises(ValueError, match=match):
            cospec.generate(model, input_ids, max_new_tokens=4, **kwargs)
    with pytest.raises(ValueError, match="bos_token_id"):
        cospec.generate(tiny_model("llama", vocab_size=VOCAB), max_new_tokens=4)
    with pytest.raises(ValueError, match="bos_token_id"):
        _hf(tiny_model("llama", vocab_size=VOCAB), max_new_tokens=4)


# ---- speculation gives the same outputs ------------------------------------------------------------------------

_PROPOSERS = ["prompt_lookup", "assistant_model", "assistant_early_exit"]


@pytest.fixture(scope="module")
def assistant():
    return tiny_model("llama", vocab_size=VOCAB, seed=5, num_hidden_layers=1, pad_token_id=PAD)


def _speculation(method: str, assistant) -> dict:
    return {"prompt_lookup": dict(prompt_lookup_num_tokens=4), "assistant_model": dict(assistant_model=assistant),
            "assistant_early_exit": dict(assistant_early_exit=1)}[method]


@pytest.fixture(scope="module")
def repetitive_setup():
    """A model whose greedy output repeats (a peaked distribution) on prompts that repeat: drafts get accepted."""
    prompts = [(random_prompt(4 + i, VOCAB, seed=i) * 3)[: 6 + 3 * i] for i in range(3)]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    model = _model_with_early_eos("llama", input_ids, attention_mask=mask)
    return model, input_ids, mask


@pytest.mark.parametrize("method", _PROPOSERS)
def test_speculation_gives_the_same_outputs_for_each_feature(repetitive_setup, assistant, tokenizer, method):
    model, input_ids, mask = repetitive_setup
    speculation = _speculation(method, assistant)
    plain = cospec.generate(model, input_ids, attention_mask=mask, max_new_tokens=NEW)
    stop = _stop_string(tokenizer, plain[:, input_ids.shape[1]:], model.generation_config.eos_token_id)
    embeds = _soft_prompt(model, input_ids)
    features = {
        "scores_logits": dict(input_ids=input_ids, attention_mask=mask, return_dict_in_generate=True,
                              output_scores=True, output_logits=True, repetition_penalty=1.2),
        "num_return_sequences": dict(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=0.8,
                                     num_return_sequences=2, return_dict_in_generate=True, output_scores=True),
        "stop_strings": dict(input_ids=input_ids, attention_mask=mask, stop_strings=[stop], tokenizer=tokenizer),
        "ids_and_embeds": dict(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask),
        "bos": dict(return_dict_in_generate=True, output_scores=True),
    }
    if method != "assistant_model":  # a draft model cannot read embeddings (refused above)
        features["embeds_only"] = dict(inputs_embeds=embeds, attention_mask=mask, return_dict_in_generate=True,
                                       output_logits=True)
    for name, kwargs in features.items():
        torch.manual_seed(11)
        expected = cospec.generate(model, max_new_tokens=NEW, **kwargs)
        torch.manual_seed(11)
        got = cospec.generate(model, max_new_tokens=NEW, **kwargs, **speculation)
        assert_same_output(got, expected)
        if name in ("scores_logits", "stop_strings", "ids_and_embeds", "bos"):
            assert_same_output(got, _hf(model, max_new_tokens=NEW, **kwargs))


def test_inputs_is_another_name_for_input_ids(llama_setup):
    model, input_ids, mask = llama_setup
    expected = _hf(model, inputs=input_ids, attention_mask=mask, max_new_tokens=4)
    assert_same_output(cospec.generate(model, inputs=input_ids, attention_mask=mask, max_new_tokens=4), expected)
    with pytest.raises(ValueError, match="not both"):
        cospec.generate(model, input_ids, inputs=input_ids, attention_mask=mask, max_new_tokens=4)
