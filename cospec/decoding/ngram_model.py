"""A count-based n-gram language model of a domain: built from token ids in seconds, no training. It serves as a
fusion member (a full next-token distribution per row) and as a model-free proposer (greedy retrieval drafts).

Terms:
- order n: the model conditions on up to ``n - 1`` previous tokens; a k-gram is ``k - 1`` context tokens + a token.
- key: one uint64 per k-gram, the context's code in the high bits and the token in the low ``token_bits``. The code
  packs the context tokens exactly when they fit in ``64 - token_bits`` bits (order 4 with a vocabulary up to 2^16),
  else it is a 64-bit hash of them (FNV-1a + a splitmix finalizer; collisions are improbable, not impossible).
  All continuations of one context share the high bits, so they are one run of the sorted keys, found with two
  binary searches.
- raw count ``c(x)``: occurrences of the k-gram x within one document (n-grams never span two documents).
- continuation count ``N1+(. x)``: the number of distinct tokens seen before x (Kneser-Ney's lower-order counts).
- Interpolated Kneser-Ney (Chen & Goodman 1999), with ``a_k`` raw counts at the top order k = n and continuation
  counts below it, ``c`` the last ``k - 1`` tokens and ``c'`` the last ``k - 2``:

      P_k(w | c) = max(a_k(c w) - D_k, 0) / a_k(c .)  +  D_k * T_k(c) / a_k(c .) * P_{k-1}(w | c')
      P_1(w)     = max(a_1(w) - D_1, 0) / a_1(.)      +  D_1 * T_1 / a_1(.) / vocab_size

  where ``T_k(c)`` is the number of distinct tokens with ``a_k(c w) > 0`` and ``D_k = n1 / (n1 + 2 n2)`` from the
  numbers of k-grams counted once and twice. A context unseen at order k leaves ``P_{k-1}`` as it is (and every
  longer context is unseen too). The uniform term in ``P_1`` gives every token of the vocabulary some mass.
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from cospec.decoding.protocols import Draft, DraftRequest

FORMAT_VERSION = 1
DEFAULT_HELDOUT_MODULES = ("bisect", "colorsys", "fractions", "graphlib", "heapq", "shlex", "statistics", "textwrap")
"""Standard-library modules left out of the stdlib corpus by default, to measure held-out perplexity on."""

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def token_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())


def _is_exact(order: int, vocab_size: int) -> bool:
    bits = token_bits(vocab_size)
    return (order - 1) * bits <= 64 - bits


# ---- context codes: the same recurrence on numpy arrays (build) and on Python ints (lookup) ----


def _extend_codes(codes: np.ndarray, tokens: np.ndarray, bits: int, exact: bool) -> np.ndarray:
    if exact:
        return (codes << np.uint64(bits)) | tokens.astype(np.uint64)
    return (codes ^ (tokens.astype(np.uint64) + np.uint64(1))) * np.uint64(_FNV_PRIME)  # wraps mod 2^64


def _finish_codes(codes: np.ndarray, bits: int, exact: bool) -> np.ndarray:
    """Context codes -> the high part of the keys (``code << bits``)."""
    if not exact:  # splitmix64 finalizer, then keep the low 64 - bits bits
        codes = codes ^ (codes >> np.uint64(30))
        codes = codes * np.uint64(0xBF58476D1CE4E5B9)
        codes = codes ^ (codes >> np.uint64(27))
        codes = codes * np.uint64(0x94D049BB133111EB)
        codes = codes ^ (codes >> np.uint64(31))
    return codes << np.uint64(bits)  # the top bits of a hash fall off


def _context_key(context: Sequence[int], bits: int, exact: bool) -> int:
    """``_finish_codes`` of one context, on Python ints (no numpy overflow warnings)."""
    code = 0 if exact else _FNV_OFFSET
    for token in context:
        code = ((code << bits) | token) if exact else ((code ^ (token + 1)) * _FNV_PRIME) & _MASK64
    if not exact:
        code ^= code >> 30
        code = (code * 0xBF58476D1CE4E5B9) & _MASK64
        code ^= code >> 27
        code = (code * 0x94D049BB133111EB) & _MASK64
        code ^= code >> 31
    return (code << bits) & _MASK64


def _discount(counts: np.ndarray) -> float:
    n1, n2 = int(np.count_nonzero(counts == 1)), int(np.count_nonzero(counts == 2))
    return n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else 0.5


def _unique_sorted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct keys ascending, their counts, the index in ``keys`` of one occurrence of each)."""
    order = np.argsort(keys)
    sorted_keys = keys[order]
    is_first = np.empty(len(keys), dtype=bool)
    is_first[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_first[1:])
    starts = np.flatnonzero(is_first)
    counts = np.diff(np.append(starts, len(keys))).astype(np.int32)
    return sorted_keys[starts], counts, order[starts]


@dataclass(eq=False)
class NgramLM:
    """Interpolated Kneser-Ney n-gram model over token ids. Build with ``NgramLM.build``; tables are per order
    ``k = 2 .. order`` (sorted keys, raw counts, Kneser-Ney counts), order 1 is dense over the vocabulary."""

    vocab_size: int
    order: int
    unigram_counts: np.ndarray  # [vocab_size] int64 raw counts
    unigram_kn_counts: np.ndarray  # [vocab_size] int64 continuation counts (raw if order == 1)
    keys: dict[int, np.ndarray]  # k -> [num_kgrams] uint64 sorted
    counts: dict[int, np.ndarray]  # k -> [num_kgrams] int32 raw counts
    kn_counts: dict[int, np.ndarray]  # k -> [num_kgrams] int32 (raw at k == order, continuation below)
    discounts: dict[int, float]  # k -> D_k, k = 1 .. order
    num_tokens: int = 0
    tokenizer_name: str | None = None
    build_seconds: float = 0.0
    _p1: np.ndarray = field(init=False, repr=False)  # [vocab_size] float64 P_1

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.order < 1:
            raise ValueError(f"vocab_size and order must be >= 1, got {self.vocab_size} and {self.order}")
        self.bits = token_bits(self.vocab_size)
        self.exact = _is_exact(self.order, self.vocab_size)
        self._word_mask = np.uint64((1 << self.bits) - 1)
        total = int(self.unigram_kn_counts.sum())
        if total == 0:
            self._p1 = np.full(self.vocab_size, 1.0 / self.vocab_size)
        else:
            d = self.discounts[1]
            num_types = int(np.count_nonzero(self.unigram_kn_counts))
            self._p1 = (np.maximum(self.unigram_kn_counts - d, 0.0) + d * num_types / self.vocab_size) / total

    # ---- building ----

    @classmethod
    def build(cls, token_id_sequences: Iterable[Sequence[int]], vocab_size: int, order: int = 4,
              tokenizer_name: str | None = None) -> NgramLM:
        """Count every k-gram (k <= order) inside each sequence and fit the Kneser-Ney discounts."""
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an int >= 1, got {order!r}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        start_time = time.perf_counter()
        arrays = [np.asarray(seq, dtype=np.int64).reshape(-1) for seq in token_id_sequences]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        num_tokens = tokens.size
        # remaining[i]: tokens from i to the end of its document; a k-gram starts at i iff remaining[i] >= k.
        ends = np.repeat(np.cumsum(lengths), lengths)
        remaining = ends - np.arange(num_tokens, dtype=np.int64)
        bits, exact = token_bits(vocab_size), _is_exact(order, vocab_size)

        unigram_counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
        keys, counts, kn_counts = {}, {}, {}
        codes = np.full(num_tokens, 0 if exact else _FNV_OFFSET, dtype=np.uint64)  # codes of tokens[i : i+k-1]
        prev_keys_full = None  # [num_tokens] keys of the (k-1)-grams starting at each position
        for k in range(2, order + 1):
            num_codes = max(num_tokens - k + 2, 0)
            codes[:num_codes] = _extend_codes(codes[:num_codes], tokens[k - 2 :], bits, exact)
            positions = np.flatnonzero(remaining >= k)
            keys_full = np.zeros(num_tokens, dtype=np.uint64)
            keys_full[positions] = _finish_codes(codes[positions], bits, exact) | tokens[positions + k - 1].astype(
                np.uint64)
            keys[k], counts[k], first = _unique_sorted(keys_full[positions])
            # Continuation counts of the (k-1)-grams: each distinct k-gram (u x) adds one to x, read at position + 1.
            suffix_positions = positions[first] + 1
            if k == 2:
                unigram_kn = np.bincount(tokens[suffix_positions], minlength=vocab_size).astype(np.int64)
            else:
                suffix_keys, suffix_counts, _ = _unique_sorted(prev_keys_full[suffix_positions])
                kn = np.zeros(len(keys[k - 1]), dtype=np.int32)
                kn[np.searchsorted(keys[k - 1], suffix_keys)] = suffix_counts
                kn_counts[k - 1] = kn
            prev_keys_full = keys_full
        if order == 1:
            unigram_kn = unigram_counts
        else:
            kn_counts[order] = counts[order]
        discounts = {1: _discount(unigram_kn)}
        discounts.update({k: _discount(kn_counts[k]) for k in range(2, order + 1)})
        model = cls(vocab_size, order, unigram_counts, unigram_kn, keys, counts, kn_counts, discounts,
                    num_tokens=int(num_tokens), tokenizer_name=tokenizer_name)
        model.build_seconds = time.perf_counter() - start_time
        return model

    # ---- lookups ----

    def _run(self, k: int, context: Sequence[int]) -> tuple[int, int]:
        """[lo, hi) of the order-k keys that continue ``context`` (its last k - 1 tokens)."""
        lo_key = _context_key(context[len(context) - (k - 1) :], self.bits, self.exact)
        lo = np.searchsorted(self.keys[k], np.uint64(lo_key), side="left")
        hi = np.searchsorted(self.keys[k], np.uint64(lo_key | ((1 << self.bits) - 1)), side="right")
        return int(lo), int(hi)

    def count(self, ngram: Sequence[int]) -> int:
        """Raw count of the k-gram ``ngram`` (1 <= k <= order)."""
        ngram = [int(t) for t in ngram]
        if not 1 <= len(ngram) <= self.order:
            raise ValueError(f"an n-gram of this model has 1 to {self.order} tokens, got {len(ngram)}")
        if len(ngram) == 1:
            return int(self.unigram_counts[ngram[0]])
        lo, hi = self._run(len(ngram), ngram[:-1])
        words = self.keys[len(ngram)][lo:hi] & self._word_mask
        i = int(np.searchsorted(words, np.uint64(ngram[-1])))
        return int(self.counts[len(ngram)][lo + i]) if i < hi - lo and int(words[i]) == ngram[-1] else 0

    def _tail(self, context: Sequence[int]) -> list[int]:
        """The last ``order - 1`` tokens of ``context`` (all the model looks at), checked against the vocabulary."""
        tail = [int(t) for t in context[max(0, len(context) - (self.order - 1)) :]] if self.order > 1 else []
        for t in tail:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} in the context is outside the n-gram vocabulary [0, {self.vocab_size})")
        return tail

    def next_token_probs(self, context: Sequence[int]) -> np.ndarray:  # [vocab_size] float64
        context = self._tail(context)
        probs = self._p1.copy()
        for k in range(2, min(self.order, len(context) + 1) + 1):
            lo, hi = self._run(k, context)
            kn = self.kn_counts[k][lo:hi]
            total = int(kn.sum()) if hi > lo else 0
            if total == 0:
                break  # unseen context: every longer one is unseen too
            d = self.discounts[k]
            probs *= d * np.count_nonzero(kn) / total
            words = (self.keys[k][lo:hi] & self._word_mask).astype(np.intp)
            probs[words] += np.maximum(kn - d, 0.0) / total
        return probs

    def next_token_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:  # [batch, vocab_size] float32
        """The full next-token distribution after each context, in log space (normalized)."""
        out = np.empty((len(contexts), self.vocab_size), dtype=np.float32)
        for row, context in enumerate(contexts):
            np.log(self.next_token_probs(context), out=out[row], casting="same_kind")
        return torch.from_numpy(out)

    def draft(self, context: Sequence[int], num_draft_tokens: int) -> list[int]:
        """Greedy retrieval: extend ``context`` by the most frequent continuation of its longest suffix seen in the
        corpus (ties: the lowest token id), ``num_draft_tokens`` times; stops early where no suffix of at least one
        token was seen with a continuation."""
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        context = self._tail(context)
        drafts: list[int] = []
        for _ in range(num_draft_tokens):
            token = None
            for k in range(min(self.order, len(context) + 1), 1, -1):
                lo, hi = self._run(k, context)
                if hi > lo:
                    best = lo + int(np.argmax(self.counts[k][lo:hi]))
                    token = int(self.keys[k][best] & self._word_mask)
                    break
            if token is None:
                break
            drafts.append(token)
            context.append(token)
        return drafts

    # ---- persistence ----

    def save(self, path: str | os.PathLike) -> None:
        """A directory with ``ngram.npz`` (the tables) and ``config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"unigram_counts": self.unigram_counts, "unigram_kn_counts": self.unigram_kn_counts}
        for k in self.keys:
            arrays.update({f"keys_{k}": self.keys[k], f"counts_{k}": self.counts[k]})
            if k < self.order:  # at the top order the Kneser-Ney counts are the raw counts
                arrays[f"kn_counts_{k}"] = self.kn_counts[k]
        np.savez(path / "ngram.npz", **arrays)
        config = {"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size, "order": self.order,
                  "tokenizer": self.tokenizer_name, "num_tokens": self.num_tokens,
                  "discounts": {str(k): d for k, d in self.discounts.items()},
                  "num_kgrams": {str(k): int(len(v)) for k, v in self.keys.items()}}
        (path / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NgramLM:
        path = Path(path)
        if not (path / "config.json").exists() or not (path / "ngram.npz").exists():
            raise FileNotFoundError(f"{path} is not a saved NgramLM (needs config.json and ngram.npz)")
        config = json.loads((path / "config.json").read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: n-gram format version {config.get('format_version')}, expected {FORMAT_VERSION}")
        order = config["order"]
        with np.load(path / "ngram.npz") as data:
            keys = {k: data[f"keys_{k}"] for k in range(2, order + 1)}
            counts = {k: data[f"counts_{k}"] for k in range(2, order + 1)}
            kn_counts = {k: data[f"kn_counts_{k}"] for k in range(2, order)}
            if order > 1:
                kn_counts[order] = counts[order]
            unigram_counts, unigram_kn = data["unigram_counts"], data["unigram_kn_counts"]
        discounts = {int(k): float(d) for k, d in config["discounts"].items()}
        return cls(config["vocab_size"], order, unigram_counts, unigram_kn, keys, counts, kn_counts, discounts,
                   num_tokens=config["num_tokens"], tokenizer_name=config["tokenizer"])


class NgramProposer:
    """Drafts by greedy retrieval from an ``NgramLM`` (deterministic: drafts carry no probabilities)."""

    is_deterministic = True
    keeps_no_state = True

    def __init__(self, model: NgramLM):
        self.model = model

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self.model.draft(r.token_ids, r.num_draft_tokens)) for r in requests]

    def release(self, seq_id: int) -> None:
        pass  # no per-sequence state


# ---- the Python standard library as a code corpus ----


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_excluded(relative: Path, exclude_modules: Sequence[str]) -> bool:
    """True for the files of a held-out module ``m``: ``m.py``, the package ``m/``, and its tests
    (``test_m.py`` or a ``test_m/`` package anywhere)."""
    name = _module_name(relative)
    stems = {part for part in relative.with_suffix("").parts}
    for module in exclude_modules:
        if name == module or name.startswith(module + "."):
            return True
        if f"test_{module.split('.')[-1]}" in stems:
            return True
    return False


def python_files(root: Path, exclude_modules: Sequence[str] = ()) -> list[Path]:
    """The .py files under ``root`` (a source tree: a package or the standard library), leaving out third-party
    packages, bytecode and the modules ``exclude_modules`` (dotted names relative to ``root``); library code first
    and then tests (so a token budget prefers library code), each group sorted by path."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [Path(dirpath) / name for name in filenames if name.endswith(".py")]
    library, tests = [], []
    for path in sorted(paths):
        relative = path.relative_to(root)
        if is_excluded(relative, exclude_modules):
            continue
        is_test = any(p in ("test", "tests", "idle_test") or p.startswith("test_") for p in relative.parts)
        (tests if is_test else library).append(path)
    return library + tests


def stdlib_files(exclude_modules: Sequence[str] = DEFAULT_HELDOUT_MODULES, root: Path | None = None) -> list[Path]:
    """The standard library's .py files (see ``python_files``)."""
    return python_files(stdlib_dir() if root is None else root, exclude_modules)


def heldout_module_files(modules: Sequence[str] = DEFAULT_HELDOUT_MODULES, root: Path | None = None) -> list[Path]:
    """The library files (not tests) of the held-out modules, sorted by path."""
    root = stdlib_dir() if root is None else root
    paths = []
    for module in modules:
        relative = Path(*module.split("."))
        paths += [p for p in (root / relative.with_suffix(".py"), root / relative / "__init__.py") if p.exists()]
        if (root / relative).is_dir():
            paths += sorted(p for p in (root / relative).rglob("*.py")
                            if p.name != "__init__.py" and "__pycache__" not in p.parts)
    return paths


def tokenize_files(tokenizer, files: Sequence[Path], max_tokens: int = 10_000_000, batch_size: int = 64,
                   progress: bool = True, desc: str = "tokenizing") -> list[np.ndarray]:
    """One int32 array of token ids per file (UTF-8 text; others skipped), at most ``max_tokens`` in all (the last
    file cut short)."""
    from tqdm.auto import tqdm

    sequences: list[np.ndarray] = []
    num_tokens = 0
    with tqdm(total=max_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            texts = []
            for path in files[start : start + batch_size]:
                try:
                    texts.append(Path(path).read_text(encoding="utf-8"))
                except (UnicodeDecodeError, OSError):
                    continue  # a few test data files are not UTF-8
            for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
                ids = np.asarray(ids[: max_tokens - num_tokens], dtype=np.int32)
                if ids.size:
                    sequences.append(ids)
                    num_tokens += ids.size
                    bar.update(ids.size)
            if num_tokens >= max_tokens:
                break
    return sequences


def build_stdlib_corpus(tokenizer, exclude_modules: Sequence[str] = DEFAULT_HELDOUT_MODULES,
                        max_tokens: int = 10_000_000, root: Path | None = None, batch_size: int = 64,
                        progress: bool = True) -> list[np.ndarray]:
    """Tokenize the standard library shipped with this Python into one int32 array per file, at most ``max_tokens``
    tokens in all, leaving out the held-out modules ``exclude_modules``."""
    return tokenize_files(tokenizer, stdlib_files(exclude_modules, root), max_tokens, batch_size, progress,
                          desc="tokenizing the stdlib")
