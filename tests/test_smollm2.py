"""The embedded SmolLM2-135M-Instruct (float32): cospec's greedy output equals Hugging Face's token for token.

Slow: loads a real model (the first load ever converts the GGUF checkpoint into ~/.cache/cospec). Run with
``pytest -m slow tests/test_smollm2.py``. A float32 rounding difference could in principle flip a near-tie between
two tokens; none does on these prompts, and a failure here should be reported rather than the test weakened.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import one_thread  # noqa: F401 (fixture)

import cospec
from cospec import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child in two sentences.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2():
    from cospec.engine.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    assert next(model.parameters()).dtype == torch.float32
    return model, tokenizer


def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def test_batched_left_padded_greedy_equals_hf(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer([_chat(tokenizer, q) for q in QUESTIONS], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # the prompts really are padded
    expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = cospec.generate(model, **batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert torch.equal(got, expected), "\n".join(
        f"cospec: {tokenizer.decode(g[width:])!r}\nHF:     {tokenizer.decode(e[width:])!r}"
        for g, e in zip(got, expected))
    # The eos token (<|im_end|>) ends the short answer; HF pads the rest of its row.
    eos = model.generation_config.eos_token_id
    assert any(eos in row[width:].tolist() for row in expected)


@pytest.fixture(scope="module")
def hf_batch_of_one(smollm2):
    """HF's greedy output for each chat-templated question alone: {question: (input_ids [1, n], output [1, n + m])}."""
    model, tokenizer = smollm2
    outputs = {}
    for question in QUESTIONS:
        input_ids = tokenizer([_chat(tokenizer, question)], return_tensors="pt")["input_ids"]
        outputs[question] = input_ids, model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                                      max_new_tokens=NEW_TOKENS, do_sample=False)
    return outputs


@pytest.mark.parametrize("question", QUESTIONS)
def test_batch_of_one_greedy_equals_hf(smollm2, hf_batch_of_one, question):
    model, tokenizer = smollm2
    input_ids, expected = hf_batch_of_one[question]
    got = cospec.generate(model, input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))


def test_llm_generates_text(smollm2, hf_batch_of_one):
    model, tokenizer = smollm2
    llm = LLM(model=model, tokenizer=tokenizer)
    max_tokens = 24
    outputs = llm.generate(QUESTIONS, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    for question, out in zip(QUESTIONS, outputs):
        assert isinstance(out.text, str) and out.text.strip() and out.finished
        assert out.text == tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
        # LLM applies the chat template itself; the tokens are HF's greedy ones (a prefix of the 64-token run, cut
        # after eos as HF cuts).
        input_ids, expected = hf_batch_of_one[question]
        assert out.prompt_token_ids == input_ids[0].tolist()
        assert out.output_token_ids == expected[0, input_ids.shape[1]:][:max_tokens].tolist()
    assert "Paris" in outputs[0].text
