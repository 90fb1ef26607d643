"""Training a draft head: data (chat masks, ShareGPT parsing, the benchmark filter), a real decrease of the held-out
loss, determinism with a seed, resuming from a checkpoint, and the ``cospec train-draft`` command."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import one_thread, random_prompt, save_tiny_llama_dir, tiny_model  # noqa: F401 (fixture)

import cospec
from cospec import EngineConfig, LLMEngine, SamplingParams
from cospec.cli import main
from cospec.decoding.eagle3 import Eagle3Head
from cospec.training import objective
from cospec.training import train_draft as trainer
from cospec.training.corpora import BenchmarkFilter, humaneval_problems, mtbench_questions
from cospec.training.data import Example, chat_example, messages_of
from cospec.training.train_draft import TrainConfig, build_examples, train_head

VOCAB = 64
pytestmark = pytest.mark.usefixtures("one_thread")
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "we write code and tests every day",
             "user assistant system : hello world what is two plus two it is four"]


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab_size=VOCAB, num_hidden_layers=4, logit_scale=16.0)


def _examples(target, num: int, seed: int) -> list[Example]:
    """Random prompts and the target's greedy continuations; only the continuations are trained on."""
    engine = LLMEngine(target, EngineConfig(block_size=8))
    prompts = [random_prompt(3 + i % 4, VOCAB, seed + i) for i in range(num)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=24, temperature=0))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    outs = [done[str(i)].output_token_ids for i in range(num)]
    return [Example(p + o, [False] * len(p) + [True] * len(o)) for p, o in zip(prompts, outs)]


def _config(**overrides) -> TrainConfig:
    options = dict(draft_vocab_size=40, ttt_steps=3, batch_size=4, epochs=2, lr=3e-3, eval_every=1000,
                   checkpoint_every=1000, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


def test_training_lowers_the_heldout_loss(target, tmp_path):
    train_head(target, _examples(target, 32, seed=0), _examples(target, 8, seed=1000), _config(epochs=4, lr=1e-2),
               tmp_path)
    log = json.loads((tmp_path / "training_log.json").read_text())
    before, after = log["evaluations"][0], log["final"]
    assert after["loss"] < 0.75 * before["loss"]
    assert after["agreement"][0] > before["agreement"][0] + 0.1
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()


def test_training_is_deterministic_with_a_seed(target, tmp_path):
    data, heldout = _examples(target, 16, seed=0), _examples(target, 4, seed=1000)
    first = train_head(target, data, heldout, _config(epochs=1), tmp_path / "a")
    second = train_head(target, data, heldout, _config(epochs=1), tmp_path / "b")
    other = train_head(target, data, heldout, _config(epochs=1, seed=1), tmp_path / "c")
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.fc.weight, other.fc.weight)


def test_cached_target_states_equal_a_fresh_forward(target, monkeypatch):
    # Later epochs rebuild a batch from each example's cached states; they must be what the target computes.
    examples = _examples(target, 6, seed=3)
    head = Eagle3Head.for_target(target, torch.arange(VOCAB))
    cache = objective.TargetStateCache(1 << 30)
    first = objective.make_batch(examples[:3], "cpu")
    cache.states(target, head, first, [0, 1, 2])
    regrouped = [examples[2], examples[0]]  # another batch of the same examples, another width
    batch = objective.make_batch(regrouped, "cpu")
    def no_forward(*args):
        raise AssertionError("every example is cached: the target must not run")

    monkeypatch.setattr(objective, "target_states", no_forward)
    aux, hidden = cache.states(target, head, batch, [2, 0])
    monkeypatch.undo()
    fresh_aux, fresh_hidden = objective.target_states(target, head, batch)
    for row, length in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(aux[row, :length], fresh_aux[row, :length])
        torch.testing.assert_close(hidden[row, :length], fresh_hidden[row, :length])
    assert cache.num_bytes > 0
    tiny = objective.TargetStateCache(0)  # no room: nothing kept, the forward runs every time
    tiny.states(target, head, first, [0, 1, 2])
    assert tiny.num_bytes == 0 and not tiny._states


def test_resume_continues_from_the_checkpoint(target, tmp_path, monkeypatch):
    data, heldout = _examples(target, 24, seed=0), _examples(target, 4, seed=1000)
    config = _config(epochs=1, checkpoint_every=3)
    uninterrupted = train_head(target, data, heldout, config, tmp_path / "a")

    save = trainer._save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # the machine went down right after the checkpoint at step 3

    monkeypatch.setattr(trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_head(target, data, heldout, config, tmp_path / "b")
    monkeypatch.setattr(trainer, "_save_checkpoint", save)
    assert (tmp_path / "b" / "checkpoint" / "trainer.pt").exists()
    resumed = train_head(target, data, heldout, _config(epochs=1, checkpoint_every=3, resume=True), tmp_path / "b")
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert log["train_tokens"] == json.loads((tmp_path / "a" / "training_log.json").read_text())["train_tokens"]


def test_a_spent_time_budget_stops_training_and_saves_the_head(target, tmp_path, monkeypatch):
    data, heldout = _examples(target, 24, seed=0), _examples(target, 4, seed=1000)
    clock = iter(range(0, 10**6, 60))  # every reading of the clock: one more minute
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: float(next(clock)))
    train_head(target, data, heldout, _config(epochs=2, max_minutes=4), tmp_path, started=0.0)
    log = json.loads((tmp_path / "training_log.json").read_text())
    planned = 2 * -(-len(data) // 4)
    assert log["stopped_by_time_budget"]
    assert 0 < log["evaluations"][-1]["step"] < planned
    assert (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="max_minutes"):
        _config(max_minutes=0)


def test_lr_schedule_follows_the_time_budget_when_it_runs_ahead():
    assert trainer.lr_factor(50, 100, 0.05, 0.1) > 0.5  # half the steps: still half way down the cosine
    assert trainer.lr_factor(50, 100, 0.05, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert trainer.lr_factor(0, 100, 0.05, 0.1, time_fraction=1.0) == pytest.approx(0.2)  # warm-up first


def test_sharegpt_and_openai_records_parse():
    sharegpt = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q1"},
                                  {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}]}
    assert messages_of(sharegpt) == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    openai = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    assert [m["role"] for m in messages_of(openai)] == ["system", "user", "assistant"]
    assert messages_of({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}) is None
    assert messages_of({"conversations": [{"from": "human", "value": "only a question"}]}) is None


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("chat-llama"), SENTENCES, chat_template=CHAT_TEMPLATE)


def test_chat_examples_train_on_assistant_turns_only(chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    messages = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "it is four"},
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    example = chat_example(tokenizer, messages, max_len=256)
    trained = tokenizer.decode([t for t, m in zip(example.token_ids, example.loss_mask) if m])
    assert trained.split() == ["it", "is", "four", "</s>", "hello", "world", "</s>"]
    assert chat_example(tokenizer, messages, max_len=6) is None  # the answer does not fit


def test_benchmark_items_are_recognized():
    bench = BenchmarkFilter.default()
    question = mtbench_questions()[3]["turns"][0]
    problem = humaneval_problems()[10]["prompt"]
    assert bench.matches("Could you help?\n\n" + question.upper())
    assert bench.matches("# my file\n" + problem.replace("\n", "\n\n"))
    assert not bench.matches("def add(a, b):\n    return a + b\n")
    assert not bench.matches("Write a story about a cat who learns to play the piano.")


def test_build_examples_leaves_benchmark_items_out(chat_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    question = mtbench_questions()[0]["turns"][0]
    with open(tmp_path / "chats.jsonl", "w") as f:
        for user in (question, "hello world"):
            f.write(json.dumps({"conversations": [{"from": "human", "value": user},
                                                  {"from": "gpt", "value": "it is four"}]}) + "\n")
    (tmp_path / "code.py").write_text(humaneval_problems()[0]["prompt"])
    (tmp_path / "notes.txt").write_text("the cat sat on the mat " * 4)
    config = TrainConfig(data=[str(tmp_path)], max_len=64)
    examples = build_examples(config, None, tokenizer, tmp_path / "out")
    texts = [tokenizer.decode(e.token_ids) for e in examples]
    assert len(examples) == 2
    assert any("hello world" in t for t in texts) and any("cat sat" in t for t in texts)
    kept = build_examples(TrainConfig(data=[str(tmp_path)], max_len=64, filter_benchmarks=False), None, tokenizer,
                          tmp_path / "out")
    assert len(kept) >= 4  # the question, the code (in one or more chunks) and the two others


def test_train_draft_command_then_generate_with_the_head(chat_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("\n".join(SENTENCES * 20))
    out = tmp_path / "head"
    assert main(["train-draft", "--model", str(chat_model_dir), "--data", str(data), "--out", str(out),
                 "--max-len", "32", "--draft-vocab-size", "16", "--ttt-steps", "2", "--batch-size", "4",
                 "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "held-out acceptance per draft position" in printed and "draft 2:" in printed
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 16
    assert main(["generate", "the cat", "--model", str(chat_model_dir), "--no-chat", "--max-tokens", "8",
                 "--draft-head", str(out)]) == 0
    llm = cospec.LLM(str(chat_model_dir), draft_head=str(out), max_num_seqs=1)
    plain = cospec.LLM(str(chat_model_dir), max_num_seqs=1)
    params = SamplingParams(max_tokens=8, temperature=0)
    assert (llm.generate("the cat", params, use_tqdm=False, chat=False)[0].output_token_ids
            == plain.generate("the cat", params, use_tqdm=False, chat=False)[0].output_token_ids)
