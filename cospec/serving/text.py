"""One choice's output as its tokens arrive: the text (cut at the first stop string, held back where it may still
change), and the per-token texts and logprobs in OpenAI's two shapes (chat and legacy completions)."""

from __future__ import annotations

from cospec.serving.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs, ChatCompletionLogProbsContent,
                                     CompletionLogProbs)

TOKEN_TEXT_WINDOW = 4
"""Tokens of left context when decoding one token's text: enough for the leading space that SentencePiece drops at
the start of a decode, and for the byte-level pieces of one character."""


class ChoiceText:
    """The output text of one choice: cut at the first stop string; ``delta()`` holds back what may still change (a
    trailing incomplete UTF-8 sequence, or text that could be the start of a stop string).

    Each update decodes all output tokens rather than token by token, so that pieces spanning tokens come out whole.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.text = ""
        self.num_sent = 0  # characters of text already given to the client
        self.is_stopped = False
        self._token_texts: list[str] = []
        self._special_ids: set[int] | None = None
        self.num_tokens_reported = 0  # output tokens whose logprobs the client has

    def update(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            text, self.is_stopped = text[: min(found)], True
        self.text = text

    def delta(self, finished: bool) -> str:
        end = len(self.text)
        if not (finished or self.is_stopped):
            text = self.text.rstrip("\ufffd")
            # Hold back the longest tail of the text that begins some stop string.
            end = len(text) - max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1))
                                   if text.endswith(s[:k])), default=0)
        # A later token can change how earlier ones decode (rare): what was sent stays sent, by position.
        piece = self.text[self.num_sent:end]
        self.num_sent += len(piece)
        return piece

    # ---- per-token texts, for logprobs ----
    def token_text(self, position: int, token_id: int) -> str:
        """The text ``token_id`` adds to the output at ``position``, decoded in its left context (as the output text
        is: special tokens add nothing)."""
        left = self.token_ids[max(0, position - TOKEN_TEXT_WINDOW): position]
        before = self.tokenizer.decode(left, skip_special_tokens=True)
        both = self.tokenizer.decode(left + [token_id], skip_special_tokens=True)
        return both[len(before):] if both.startswith(before) else self.tokenizer.decode([token_id])

    def shown_text(self, position: int, token_id: int) -> str:
        """How logprobs show ``token_id`` at ``position``: its text, or a special token's own name (``</s>``)."""
        if self._special_ids is None:
            self._special_ids = set(self.tokenizer.all_special_ids)
        if token_id in self._special_ids:
            return self.tokenizer.convert_ids_to_tokens(token_id)
        return self.token_text(position, token_id)

    def token_texts(self) -> list[str]:
        """The text each output token so far adds to the output."""
        for i in range(len(self._token_texts), len(self.token_ids)):
            self._token_texts.append(self.token_text(i, self.token_ids[i]))
        return self._token_texts

    def tokens_to_report(self, finished: bool) -> range:
        """Output tokens whose logprobs go out now: those whose text the client has (all of them once the choice
        finished, except tokens that start after a stop string's cut)."""
        texts = self.token_texts()
        end, offset = self.num_tokens_reported, sum(len(t) for t in texts[: self.num_tokens_reported])
        while end < len(texts):
            start_offset, offset = offset, offset + len(texts[end])
            if self.is_stopped and start_offset >= len(self.text):
                break
            if not (finished or self.is_stopped) and offset > self.num_sent:
                break
            end += 1
        reported = range(self.num_tokens_reported, end)
        self.num_tokens_reported = end
        return reported


def chat_logprobs(choice: ChoiceText, logprobs: list, tokens: range) -> ChatCompletionLogProbs:
    """``logprobs`` holds one ``TokenLogprob(token_id, logprob, top)`` per output token; alternatives are shown as
    they would read in the same place."""
    def entry(position: int, token_id: int, logprob: float) -> ChatCompletionLogProb:
        text = choice.shown_text(position, token_id)
        return ChatCompletionLogProb(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for i in tokens:
        token = logprobs[i]
        content.append(ChatCompletionLogProbsContent(
            **entry(i, token.token_id, token.logprob).model_dump(),
            top_logprobs=[entry(i, token_id, lp) for token_id, lp in token.top]))
    return ChatCompletionLogProbs(content=content)


def completion_logprobs(choice: ChoiceText, logprobs: list, tokens: range, num_top: int) -> CompletionLogProbs:
    """The legacy shape; ``text_offset`` is where each token's text starts in the completion text."""
    texts = choice.token_texts()
    text_offset = sum(len(t) for t in texts[: tokens.start])
    result = CompletionLogProbs(top_logprobs=[] if num_top else None)
    for i in tokens:
        token = logprobs[i]
        shown = choice.shown_text(i, token.token_id)
        result.tokens.append(shown)
        result.token_logprobs.append(token.logprob)
        result.text_offset.append(text_offset)
        text_offset += len(texts[i])
        if num_top:  # the most likely tokens, and the sampled one (up to num_top + 1 entries, as OpenAI)
            top = {choice.shown_text(i, token_id): lp for token_id, lp in token.top}
            top.setdefault(shown, token.logprob)
            result.top_logprobs.append(top)
    return result
