"""``cospec.generate`` is a drop-in for Hugging Face ``model.generate``: greedy output equal token for token.

Every family runs the same two checks on a tiny random float64 model: a left-padded batch of prompts of different
lengths (one longer than a 16-token KV block, one of a single token) in which an eos token stops some rows early,
and the same prompts one at a time. Mistral (every layer) and Gemma 3 (sliding and full layers mixed) use a sliding
window of 8 tokens, far shorter than prompt + output.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import FAMILIES, SLIDING_WINDOW, left_padded_batch, one_thread, tiny_model  # noqa: F401 (fixture)

import cospec

VOCAB = 128
PAD = 0
NEW_TOKENS = 40
pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [5, 40, 17, 26, 1]  # 40 > one 16-token block; prompts + output run far past the sliding window


def _hf_generate(model, *args, **kwargs) -> torch.Tensor:
    """HF's own generate, even if ``model`` is patched."""
    hf = getattr(model, "_cospec_hf_generate", model.generate)
    return hf(*args, **kwargs)


def _pick_eos(new_tokens: torch.Tensor) -> tuple[int, int, int]:
    """A token to declare eos so that one row stops early (after at least 10 tokens, past the sliding window) while
    another never stops.

    new_tokens: [batch, NEW_TOKENS] from a run without eos. Returns (token, row that stops, index of its eos)."""
    rows = new_tokens.tolist()
    for row, tokens in enumerate(rows):
        for index in range(10, NEW_TOKENS - 5):
            token = tokens[index]
            if token != PAD and token not in tokens[:index] and any(token not in other for other in rows):
                return token, row, index
    raise AssertionError(f"no usable eos token in {rows}")


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    """(family, model with an eos token in its config, input_ids, attention_mask, stopping row, its eos index)."""
    family = request.param
    input_ids, attention_mask = left_padded_batch(LENGTHS, VOCAB, pad_token_id=PAD)
    probe = tiny_model(family, vocab_size=VOCAB, pad_token_id=PAD)  # no eos: runs the full length
    free = probe.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    eos, row, index = _pick_eos(free[:, input_ids.shape[1]:])
    model = tiny_model(family, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=eos)  # same weights (same seed)
    assert model.generation_config.eos_token_id == eos
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float64
    return family, model, input_ids, attention_mask, row, index


def test_batched_greedy_equals_hf(family_setup):
    family, model, input_ids, attention_mask, row, index = family_setup
    width = input_ids.shape[1]
    expected = _hf_generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = cospec.generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected), f"{family}: cospec\n{got[:, width:]}\nHF\n{expected[:, width:]}"
    # The eos row stopped early and HF padded the rest of it; another row ran to the end.
    eos = model.generation_config.eos_token_id
    assert expected[row, width + index] == eos
    assert (expected[row, width + index + 1:] == PAD).all()
    assert expected.shape[1] == width + NEW_TOKENS
    assert any(eos not in expected[r, width:].tolist() for r in range(len(LENGTHS)))
    if family in ("mistral", "gemma3"):
        assert width + NEW_TOKENS > 5 * SLIDING_WINDOW


def test_batch_of_one_equals_hf_and_the_batched_row(family_setup):
    family, model, input_ids, attention_mask, _, _ = family_setup
    width = input_ids.shape[1]
    batched = cospec.generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS)
    for row, length in enumerate(LENGTHS):
        prompt = input_ids[row:row + 1, width - length:]
        expected = _hf_generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = cospec.generate(model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(got, expected), f"{family} row {row}: {got[0, length:]} != {expected[0, length:]}"
        # Each row decodes as if alone: the batched row is the same tokens (then padding).
        new = got[0, length:]
        assert torch.equal(batched[row, width:width + new.numel()], new)


# ---- one family is enough for the API surface -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", vocab_size=VOCAB, pad_token_id=PAD)


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch([7, 20, 3, 12], VOCAB, pad_token_id=PAD, seed=1)


def test_patch_routes_generate_through_cospec_and_unpatch_restores(llama, batch):
    input_ids, attention_mask = batch
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    expected = llama.generate(input_ids, **kwargs)
    try:
        assert cospec.patch(llama) is llama
        cospec.patch(llama)  # idempotent
        assert torch.equal(llama.generate(input_ids, **kwargs), expected)
        assert torch.equal(llama.generate(input_ids=input_ids, **kwargs), expected)
        # It really is cospec underneath: HF would run beam search, cospec refuses it.
        with pytest.raises(cospec.UnsupportedArgumentError, match="num_beams"):
            llama.generate(input_ids, num_beams=2, **kwargs)
    finally:
        cospec.unpatch(llama)
    cospec.unpatch(llama)  # idempotent
    beams = llama.generate(input_ids, num_beams=2, **kwargs)  # HF again
    assert beams.shape == expected.shape
    assert torch.equal(llama.generate(input_ids, **kwargs), expected)


def test_return_dict_in_generate(llama, batch):
    input_ids, attention_mask = batch
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    got = cospec.generate(llama, input_ids, **kwargs)
    expected = llama.generate(input_ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got["sequences"], expected.sequences)


class CollectingStreamer:
    """The streamer protocol of ``transformers.TextStreamer``: ``put(token_ids)`` then ``end()``."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.num_ends = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.num_ends == 0, "put after end"
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.num_ends += 1


def test_streamer_gets_prompt_then_tokens_in_order(llama):
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    hf_streamer, streamer = CollectingStreamer(), CollectingStreamer()
    expected = llama.generate(prompt, max_new_tokens=15, do_sample=False, streamer=hf_streamer)
    got = cospec.generate(llama, prompt, max_new_tokens=15, do_sample=False, streamer=streamer)
    assert torch.equal(got, expected)
    assert streamer.num_ends == 1
    assert streamer.chunks[0] == prompt[0].tolist()
    assert [t for chunk in streamer.chunks[1:] for t in chunk] == got[0, 9:].tolist()
    assert all(len(chunk) == 1 for chunk in streamer.chunks[1:])  # one token per step, as it is produced
    assert [t for c in streamer.chunks for t in c] == [t for c in hf_streamer.chunks for t in c]


def test_min_new_tokens_suppresses_eos_like_hf(batch):
    input_ids, attention_mask = batch
    width = input_ids.shape[1]
    probe = tiny_model("llama", vocab_size=VOCAB, pad_token_id=PAD)
    free = probe.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    eos = int(free[0, width + 1])  # row 0 would stop after two tokens
    model = tiny_model("llama", vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=eos)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    early = cospec.generate(model, input_ids, **kwargs)
    assert (early[0, width + 2:] == PAD).all()
    for min_new in (4, 12):
        expected = model.generate(input_ids, min_new_tokens=min_new, **kwargs)
        got = cospec.generate(model, input_ids, min_new_tokens=min_new, **kwargs)
        assert torch.equal(got, expected)
        assert eos not in got[:, width:width + min_new].tolist()[0]
    # min_length counts the (padded) prompt too, as in HF.
    expected = model.generate(input_ids, min_length=width + 6, **kwargs)
    assert torch.equal(cospec.generate(model, input_ids, min_length=width + 6, **kwargs), expected)


def test_sampling_follows_torch_manual_seed(llama, batch):
    input_ids, attention_mask = batch
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20)
    torch.manual_seed(123)
    first = cospec.generate(llama, input_ids, **kwargs)
    torch.manual_seed(123)
    second = cospec.generate(llama, input_ids, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(first[:, :input_ids.shape[1]], input_ids)
    assert first.shape == (4, input_ids.shape[1] + 10)


@pytest.mark.parametrize("argument, value", [("foo", 1), ("num_beams", 2), ("typical_p", 0.5),
                                             ("output_attentions", True)])
def test_unsupported_arguments_raise_naming_them(llama, batch, argument, value):
    input_ids, attention_mask = batch
    with pytest.raises(cospec.UnsupportedArgumentError, match=argument):
        cospec.generate(llama, input_ids, attention_mask=attention_mask, max_new_tokens=4, **{argument: value})
    assert issubclass(cospec.UnsupportedArgumentError, ValueError)


def test_right_padding_is_rejected(llama):
    input_ids = torch.randint(3, VOCAB, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left"):
        cospec.generate(llama, input_ids, attention_mask=attention_mask, max_new_tokens=4)
