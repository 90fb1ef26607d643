"""The n-gram domain model: exact counts, Kneser-Ney probabilities against a plain dictionary implementation,
normalization and backoff, persistence, drafting, and the standard-library corpus builder."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cospec.decoding.ngram_model import (NgramLM, NgramProposer, build_stdlib_corpus, heldout_module_files,
                                         is_excluded, stdlib_files)
from cospec.decoding.protocols import DraftRequest

_TOY = [[1, 2, 3, 1, 2, 4, 1, 2, 3], [2, 3, 1, 5], [0]]


def _all_ngrams(sequences, max_order):
    grams = Counter()
    for seq in sequences:
        for k in range(1, max_order + 1):
            for i in range(len(seq) - k + 1):
                grams[tuple(seq[i : i + k])] += 1
    return grams


def _naive_kn(sequences, vocab_size, order):
    """Interpolated Kneser-Ney written directly from its definition with dictionaries."""
    raw = _all_ngrams(sequences, order)
    left = {}  # k-gram -> distinct left neighbours
    for gram in raw:
        if len(gram) >= 2:
            left.setdefault(gram[1:], set()).add(gram[0])

    def a(gram):
        return raw.get(gram, 0) if len(gram) == order else len(left.get(gram, ()))

    discounts = {}
    for k in range(1, order + 1):
        values = [a(g) for g in set(raw) | set(left) if len(g) == k]
        n1, n2 = values.count(1), values.count(2)
        discounts[k] = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5

    seen = sorted({gram[0] for gram in raw})  # tokens outside the corpus have no counts at any order

    def prob(w, context):
        context = tuple(context[max(0, len(context) - (order - 1)) :]) if order > 1 else ()
        k = len(context) + 1
        counts = [a(context + (v,)) for v in seen]
        total, d = sum(counts), discounts[k]
        if total == 0:
            return prob(w, context[1:]) if k > 1 else 1.0 / vocab_size
        types = sum(c > 0 for c in counts)
        lower = prob(w, context[1:]) if k > 1 else 1.0 / vocab_size
        return max(a(context + (w,)) - d, 0.0) / total + d * types / total * lower

    return prob


def _random_corpus(vocab_size, num_docs, seed):
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab_size, size=rng.integers(2, 6)).tolist() for _ in range(12)]
    docs = []
    for _ in range(num_docs):
        doc = []
        while len(doc) < rng.integers(5, 60):
            doc += phrases[rng.integers(len(phrases))] if rng.random() < 0.6 else [int(rng.integers(vocab_size))]
        docs.append(doc)
    return docs


def test_counts_are_exact():
    lm = NgramLM.build(_TOY, vocab_size=6, order=3)
    expected = _all_ngrams(_TOY, 3)
    for gram, count in expected.items():
        assert lm.count(gram) == count, gram
    assert lm.count([1, 2, 3]) == 2 and lm.count([3, 1]) == 2 and lm.count([2]) == 4
    assert lm.count([3, 1, 5]) == 1 and lm.count([5, 0]) == 0  # n-grams never span documents
    assert lm.count([4, 4]) == 0 and lm.count([0, 1, 2]) == 0
    assert lm.num_tokens == 14
    with pytest.raises(ValueError, match="1 to 3 tokens"):
        lm.count([1, 2, 3, 4])


@pytest.mark.parametrize("vocab_size,order", [(20, 3), (20, 4), (20, 1), (9, 2), (100_000, 4)])  # 100k: hashed contexts
def test_probabilities_match_dictionary_kneser_ney(vocab_size, order):
    docs = _random_corpus(min(vocab_size, 20), num_docs=30, seed=order)
    if vocab_size > 20:  # spread the ids over the large vocabulary
        docs = [[t * 4999 for t in doc] for doc in docs]
    lm = NgramLM.build(docs, vocab_size=vocab_size, order=order)
    assert lm.exact == (vocab_size < 100_000)
    prob = _naive_kn(docs, vocab_size, order)
    contexts = [docs[0][:5], docs[1][:1], docs[2][:9], [], [docs[3][0], docs[0][0]], docs[4][:3] + [7]]
    logprobs = lm.next_token_logprobs(contexts)
    assert logprobs.shape == (len(contexts), vocab_size) and logprobs.dtype == torch.float32
    probe = sorted({t for doc in docs for t in doc})[:15] + [vocab_size - 1]  # the last id never occurs
    for row, context in enumerate(contexts):
        expected = torch.tensor([prob(w, context) for w in probe], dtype=torch.float64)
        torch.testing.assert_close(logprobs[row, probe].double().exp(), expected, rtol=1e-5, atol=1e-12)
    for gram, count in _all_ngrams(docs, order).items():
        assert lm.count(gram) == count


def test_distribution_is_normalized_and_covers_the_vocabulary():
    docs = _random_corpus(50, num_docs=40, seed=3)
    lm = NgramLM.build(docs, vocab_size=64, order=4)
    contexts = [doc[:i] for doc in docs[:10] for i in (0, 1, 3, 7)] + [[63, 63, 63]]
    probs = lm.next_token_logprobs(contexts).double().exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(contexts), dtype=torch.float64), rtol=0, atol=1e-5)
    assert bool((probs > 0).all())  # tokens 50..63 never occur, yet have mass


def test_backoff_of_an_unseen_context():
    lm = NgramLM.build(_TOY, vocab_size=6, order=3)
    unseen = lm.next_token_probs([5, 5])  # (5, 5) and (5,) never precede anything: the unigram distribution
    np.testing.assert_allclose(unseen, lm.next_token_probs([]))
    seen = lm.next_token_probs([1, 2])  # seen twice followed by 3, once by 4
    assert seen.argmax() == 3 and seen[3] > seen[4] > seen[0] > 0
    assert lm.next_token_probs([9 % 6, 1, 2]).argmax() == 3  # only the last order - 1 tokens matter


def test_save_load_roundtrip(tmp_path):
    docs = _random_corpus(30, num_docs=20, seed=5)
    lm = NgramLM.build(docs, vocab_size=32, order=4, tokenizer_name="toy-tokenizer")
    lm.save(tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert (config["vocab_size"], config["order"], config["tokenizer"]) == (32, 4, "toy-tokenizer")
    loaded = NgramLM.load(tmp_path / "lm")
    contexts = [doc[:6] for doc in docs[:5]]
    assert torch.equal(loaded.next_token_logprobs(contexts), lm.next_token_logprobs(contexts))
    assert loaded.count(docs[0][:3]) == lm.count(docs[0][:3]) and loaded.discounts == lm.discounts
    assert loaded.draft(docs[1][:3], 5) == lm.draft(docs[1][:3], 5)
    with pytest.raises(FileNotFoundError, match="not a saved NgramLM"):
        NgramLM.load(tmp_path / "missing")


def test_draft_continues_a_memorized_sequence():
    rng = np.random.default_rng(0)
    memorized = rng.permutation(1000)[:40].tolist()  # no token repeats, so every 3-token context is unique
    noise = [rng.integers(0, 1000, size=200).tolist() for _ in range(5)]
    lm = NgramLM.build(noise + [memorized], vocab_size=1000, order=4)
    assert lm.draft(memorized[:10], 8) == memorized[10:18]
    assert lm.draft(memorized[:35], 10) == memorized[35:]  # stops at the end of what it has seen
    assert lm.draft([memorized[-1]], 3) == []  # the last token was never followed by anything
    assert lm.draft(memorized[:5], 0) == []
    proposer = NgramProposer(lm)
    drafts = proposer.propose([DraftRequest(seq_id=0, token_ids=memorized[:20], num_draft_tokens=4)])
    assert proposer.is_deterministic and drafts[0].token_ids == memorized[20:24] and drafts[0].probs is None


def test_build_rejects_bad_input():
    with pytest.raises(ValueError, match="token id 7 is outside the vocabulary"):
        NgramLM.build([[1, 2, 7]], vocab_size=7)
    with pytest.raises(ValueError, match="token id -1"):
        NgramLM.build([[1, -1]], vocab_size=7)
    with pytest.raises(ValueError, match="order"):
        NgramLM.build([[1, 2]], vocab_size=7, order=0)
    lm = NgramLM.build([[1, 2, 3]], vocab_size=7)
    with pytest.raises(ValueError, match="token id 9 in the context"):
        lm.next_token_logprobs([[1, 9, 2]])
    with pytest.raises(ValueError, match="token id -2 in the context"):
        lm.draft([-2], 3)
    empty = NgramLM.build([], vocab_size=7, order=3)  # no data: the uniform distribution
    torch.testing.assert_close(empty.next_token_logprobs([[1, 2]]).exp(), torch.full((1, 7), 1 / 7))


# ---- the standard-library corpus ----


class _CharTokenizer:
    """One token per byte: enough to check the corpus builder."""

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [list(text.encode()) for text in texts]}


def _fake_stdlib(root: Path) -> Path:
    for relative, text in {
        "os.py": "import sys\n", "json/__init__.py": "x = 1\n", "json/decoder.py": "y = 2\n",
        "textwrap.py": "z = 3\n", "test/test_json.py": "t = 4\n", "test/test_os.py": "u = 5\n",
        "site-packages/pkg/mod.py": "no\n", "json/__pycache__/x.py": "no\n",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_stdlib_files_and_exclusions(tmp_path):
    root = _fake_stdlib(tmp_path)
    names = [p.relative_to(root).as_posix() for p in stdlib_files(exclude_modules=("json",), root=root)]
    assert names == ["os.py", "textwrap.py", "test/test_os.py"]  # library code first, then tests
    assert is_excluded(Path("json/decoder.py"), ["json"]) and is_excluded(Path("test/test_json/a.py"), ["json"])
    assert not is_excluded(Path("jsonx.py"), ["json"])
    assert [p.name for p in heldout_module_files(["json", "textwrap"], root=root)] == ["__init__.py", "decoder.py",
                                                                                     "textwrap.py"]


def test_build_stdlib_corpus_respects_the_token_budget(tmp_path):
    root = _fake_stdlib(tmp_path)
    corpus = build_stdlib_corpus(_CharTokenizer(), exclude_modules=("textwrap",), root=root, progress=False)
    texts = [bytes(seq.tolist()).decode() for seq in corpus]
    assert texts == ["x = 1\n", "y = 2\n", "import sys\n", "t = 4\n", "u = 5\n"]
    capped = build_stdlib_corpus(_CharTokenizer(), exclude_modules=(), root=root, max_tokens=15, progress=False)
    assert sum(seq.size for seq in capped) == 15 and capped[0].dtype == np.int32


def test_real_stdlib_is_found():
    files = stdlib_files()
    names = {p.name for p in files}
    assert "os.py" in names and "textwrap.py" not in names and "test_textwrap.py" not in names
    assert not any("site-packages" in p.parts for p in files)
    assert any(p.name == "textwrap.py" for p in heldout_module_files())
