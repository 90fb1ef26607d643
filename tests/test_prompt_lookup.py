import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cospec.decoding.prompt_lookup import PromptLookupProposer, find_ngram_draft


def _ids(*tokens: int) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.int64)


def _draft(tokens, k, max_n=3, min_n=1) -> list[int]:
    out = find_ngram_draft(_ids(*tokens), k, max_n, min_n)
    assert out.dtype == torch.int64 and out.dim() == 1
    return out.tolist()


def _oracle(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Plain-Python copy of transformers' PromptLookupCandidateGenerator.get_candidates
    (generation/candidate_generator.py): sizes from min(max_n, len - 1) down, matches left to right, the first with
    a non-empty continuation ``tokens[i + n : min(i + n + k, len)]`` wins. Adds ``min_n``; no eos/logits processor."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = tokens[-n:]
        for i in range(length - n + 1):
            if tokens[i : i + n] == pattern and i + n < min(i + n + k, length):
                return tokens[i + n : min(i + n + k, length)]
    return []


# ---- exact cases ----


def test_repeated_code_snippet_is_copied():
    # "def f ( x ) : return x \n" ... "def f (" -> the rest of the earlier line
    d, f, lp, x, rp, colon, ret, nl = range(10, 18)
    tokens = [d, f, lp, x, rp, colon, ret, x, nl, d, f, lp]
    assert _draft(tokens, 5) == [x, rp, colon, ret, x]


def test_longest_ngram_preferred_over_earlier_shorter_match():
    tokens = [2, 10, 11, 1, 2, 20, 21, 1, 2]
    # bigram [1, 2] first occurs at 3; unigram [2] first occurs at 0 with a different continuation
    assert _draft(tokens, 2, max_n=3) == [20, 21]
    assert _draft(tokens, 2, max_n=2) == [20, 21]
    assert _draft(tokens, 2, max_n=1) == [10, 11]


def test_first_match_wins_among_equal_sizes():
    assert _draft([7, 1, 7, 2, 7], 1, max_n=1) == [1]


def test_min_ngram_size_excludes_shorter_matches():
    tokens = [2, 10, 11, 1, 2, 20, 21, 1, 2]
    assert _draft(tokens, 2, max_n=3, min_n=2) == [20, 21]
    assert _draft(tokens, 2, max_n=3, min_n=3) == []


def test_no_match_gives_empty():
    assert _draft([1, 2, 3, 4], 4) == []


@pytest.mark.parametrize("tokens", [[], [5]])
def test_too_short_gives_empty(tokens):
    assert _draft(tokens, 4) == []


def test_draft_cut_at_end_of_sequence():
    assert _draft([3, 4, 5, 3], 10) == [4, 5, 3]


def test_match_may_overlap_the_pattern():
    # trigram [9, 9, 9] first at 0; only one token follows it before the end
    assert _draft([9, 9, 9, 9], 4) == [9]
    assert _draft([8, 9, 9, 9], 4, max_n=2) == [9]


def test_num_draft_tokens_respected():
    tokens = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    for k in range(1, 8):
        assert _draft(tokens, k) == [3, 4, 5, 6, 7, 1, 2][:k]


def test_zero_draft_tokens_gives_empty():
    assert _draft([1, 2, 1, 2], 0) == []
    assert PromptLookupProposer().propose_tensors([_ids(1, 2, 1, 2)], [0])[0].numel() == 0


def test_draft_is_a_copy_not_a_view():
    tokens = _ids(1, 2, 3, 1, 2)
    draft = find_ngram_draft(tokens, 2)
    tokens[2] = 99
    assert draft.tolist() == [3, 1]


def test_proposer_batches_ragged_sequences():
    proposer = PromptLookupProposer(max_ngram_size=2)
    assert proposer.is_deterministic
    sequences = [_ids(1, 2, 3, 1, 2), _ids(4, 5, 6), _ids(7, 7, 7, 7, 7), _ids(1, 2, 3, 1, 2)]
    drafts = proposer.propose_tensors(sequences, [3, 3, 2, 0])
    assert [d.tolist() for d in drafts] == [[3, 1, 2], [], [7, 7], []]


# ---- equivalence with transformers ----


def test_matches_transformers_prompt_lookup_on_random_sequences():
    candidate_generator = pytest.importorskip("transformers.generation.candidate_generator")
    gen = torch.Generator().manual_seed(0)
    num_checked_nonempty = 0
    for trial in range(400):
        vocab = 2 + trial % 5
        length = int(torch.randint(0, 48, (1,), generator=gen))
        k = int(torch.randint(1, 9, (1,), generator=gen))
        max_n = 1 + trial % 4
        tokens = torch.randint(0, vocab, (length,), generator=gen)
        hf = candidate_generator.PromptLookupCandidateGenerator(
            num_output_tokens=k, max_matching_ngram_size=max_n, max_length=10**9
        )
        candidate_ids, _ = hf.get_candidates(tokens[None])
        expected = candidate_ids[0, length:]
        ours = find_ngram_draft(tokens, k, max_ngram_size=max_n)
        assert torch.equal(ours, expected), (tokens.tolist(), k, max_n, ours.tolist(), expected.tolist())
        num_checked_nonempty += expected.numel() > 0
    assert num_checked_nonempty > 200  # the small vocabularies make most cases real matches


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=40),
    k=st.integers(0, 8),
    max_n=st.integers(1, 5),
    min_n=st.integers(1, 5),
)
def test_matches_oracle_with_min_ngram_size(tokens, k, max_n, min_n):
    max_n = max(max_n, min_n)
    expected = _oracle(tokens, k, max_n, min_n) if k > 0 else []
    assert _draft(tokens, k, max_n, min_n) == expected


# ---- validation ----


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"min_ngram_size": 0}, "min_ngram_size"),
        ({"max_ngram_size": 0}, "max_ngram_size"),
        ({"max_ngram_size": 2, "min_ngram_size": 3}, "max_ngram_size"),
        ({"max_ngram_size": 2.0}, "max_ngram_size"),
    ],
)
def test_proposer_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PromptLookupProposer(**kwargs)


def test_bad_call_arguments_rejected():
    with pytest.raises(ValueError, match="num_draft_tokens"):
        PromptLookupProposer().propose_tensors([_ids(1, 2)], [1, 2])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        find_ngram_draft(_ids(1, 2), -1)
    with pytest.raises(ValueError, match="token_ids"):
        find_ngram_draft(torch.zeros(2, 3, dtype=torch.int64), 1)


def test_proposer_interface_takes_draft_requests():
    from cospec.decoding.protocols import DraftRequest

    drafts = PromptLookupProposer(max_ngram_size=2).propose(
        [DraftRequest(0, [1, 2, 3, 1, 2], 3), DraftRequest(1, [4, 5, 6], 2), DraftRequest(2, [7, 7, 7], 0)])
    assert [d.token_ids for d in drafts] == [[3, 1, 2], [], []]
    assert all(d.probs is None for d in drafts)


@settings(max_examples=200, deadline=None)
@given(
    batch=st.lists(st.tuples(st.lists(st.integers(0, 4), max_size=40), st.integers(0, 8)), min_size=1, max_size=8),
    max_n=st.integers(1, 4),
    min_n=st.integers(1, 4),
)
def test_batched_lookup_equals_lookup_one_sequence_at_a_time(batch, max_n, min_n):
    """The batched matcher the proposer runs gives each sequence exactly its own find_ngram_draft."""
    from cospec.decoding.prompt_lookup import batched_ngram_drafts

    min_n = min(min_n, max_n)
    drafts = batched_ngram_drafts([tokens for tokens, _ in batch], [k for _, k in batch], max_n, min_n)
    for (tokens, k), draft in zip(batch, drafts):
        assert draft == find_ngram_draft(_ids(*tokens), k, max_n, min_n).tolist()
