"""The ``cospec`` command: ``info`` reports versions, ``generate`` streams and exits 0, bad input exits 2 in one line."""

import sys

import pytest
import torch
import transformers

import cospec
from cospec.cli import _stream, main

from _tiny_models import save_tiny_llama_dir

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the sun is warm and the sky is blue",
    "we write code and tests every day",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A float32 tiny random Llama and a word-level tokenizer trained in memory, saved as a model directory."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), SENTENCES)


class _Recorder:
    """A stdout that keeps each write, to see that text arrives in pieces."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, version in [("cospec", cospec.__version__), ("torch", torch.__version__),
                          ("transformers", transformers.__version__)]:
        assert name in out and version in out
    assert "triton" in out and "threads" in out
    assert "kernels (cpu)" in out and "torch-reference" in out


def test_generate_streams_and_exits_0(tiny_model_dir, monkeypatch, capsys):
    stdout = _Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "the cat sat", "--model", str(tiny_model_dir), "--max-tokens", "6"]) == 0
    streamed = "".join(stdout.writes)
    assert len([w for w in stdout.writes if w.strip()]) > 1, "text should arrive token by token"

    llm = cospec.LLM(str(tiny_model_dir), max_num_seqs=1)
    (expected,) = llm.generate("the cat sat", cospec.SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    assert streamed.rstrip("\n") == expected.text and expected.text

    err = capsys.readouterr().err
    assert "tokens/s" in err and "time to first token" in err


def test_generate_sampling_flags(tiny_model_dir, capsys):
    argv = ["generate", "a dog", "--model", str(tiny_model_dir), "--max-tokens", "5", "--temperature", "0.9",
            "--top-k", "10", "--top-p", "0.9", "--min-p", "0.01", "--seed", "7", "--no-chat"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_missing_model_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "hi", "--model", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cospec: error:") and "no-such-model" in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_bad_sampling_value_exits_2(tiny_model_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_stream_holds_back_incomplete_utf8(monkeypatch):
    stdout = _Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    printed = _stream("caf", "", finished=False)
    printed = _stream("caf\ufffd", printed, finished=False)  # first byte of "é" only
    printed = _stream("café!", printed, finished=True)
    assert stdout.writes == ["caf", "", "é!"]
    assert printed == "café!"


@pytest.mark.parametrize("flags", [
    ["--prompt-lookup", "2"],
    ["--self-spec", "1"],
    ["--draft", "MODEL"],
    ["--fuse-with", "MODEL", "--fusion", "mixture:0.5,0.5"],
])
def test_generate_speculation_and_fusion_flags_keep_greedy_output(tiny_model_dir, capsys, flags):
    base = ["generate", "the cat sat", "--model", str(tiny_model_dir), "--max-tokens", "6"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    # fusing a model with itself (equal weights) is that model again, so every variant must print the same text
    assert main(base + [str(tiny_model_dir) if f == "MODEL" else f for f in flags]) == 0
    assert capsys.readouterr().out == plain


def test_fusion_flags_must_come_together(tiny_model_dir, capsys):
    assert main(["generate", "x", "--model", str(tiny_model_dir), "--fusion", "mixture:0.5,0.5"]) == 2
    assert "--fuse-with" in capsys.readouterr().err


def test_bench_serve_dispatches_to_the_load_generator(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--help"])
    assert exit_info.value.code == 0
    assert "--rates" in capsys.readouterr().out
