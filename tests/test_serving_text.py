"""A choice's text as tokens arrive: stop strings, held-back text, and which tokens' logprobs may go out."""

from dataclasses import dataclass, field

import pytest
import transformers

from _serving import served_model_dir
from cospec.serving.text import ChoiceText, chat_logprobs, completion_logprobs


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list = field(default_factory=list)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(served_model_dir(tmp_path_factory.mktemp("tiny-text")))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_is_cut_at_a_stop_string_and_held_back_where_one_may_begin(tokenizer):
    ids = _ids(tokenizer, "the cat sat on the mat")
    choice = ChoiceText(tokenizer, stop=["on the"])
    choice.update(ids[:3])
    assert choice.delta(finished=False) == "the cat sat"
    choice.update(ids[:4])  # "... on" may begin the stop string: held back
    assert choice.delta(finished=False) == " "
    choice.update(ids[:6])
    assert choice.is_stopped and choice.text == "the cat sat " and choice.delta(finished=True) == ""


def test_logprobs_go_out_with_their_text_and_stop_at_the_cut(tokenizer):
    ids = _ids(tokenizer, "the cat sat on the mat")
    logprobs = [TokenLogprob(t, -0.5 * i, [(t, -0.5 * i), (ids[0], -3.0)]) for i, t in enumerate(ids)]
    choice = ChoiceText(tokenizer, stop=["on the"])
    choice.update(ids[:4])
    choice.delta(finished=False)
    assert choice.tokens_to_report(finished=False) == range(0, 3)  # "on" is held back with its text
    choice.update(ids)
    choice.delta(finished=True)
    # " on" overlaps the text (its space is before the cut); " the mat" start after it: never reported.
    assert choice.tokens_to_report(finished=True) == range(3, 4)
    assert choice.token_texts() == ["the", " cat", " sat", " on", " the", " mat"]
    legacy = completion_logprobs(choice, logprobs, range(1, 3), num_top=1)
    assert legacy.tokens == [" cat", " sat"] and legacy.text_offset == [3, 7]
    assert legacy.token_logprobs == [-0.5, -1.0]
    assert legacy.top_logprobs == [{" cat": -0.5, " the": -3.0}, {" sat": -1.0, " the": -3.0}]
    chat = chat_logprobs(choice, logprobs, range(0, 2))
    assert [(e.token, e.logprob, e.bytes) for e in chat.content] == [("the", 0.0, list(b"the")),
                                                                    (" cat", -0.5, list(b" cat"))]
    assert [t.token for t in chat.content[1].top_logprobs] == [" cat", " the"]
