"""EAGLE-3 draft heads: exact greedy speculation, distribution-preserving sampled speculation, hidden states captured
in the engine's ragged forward, drafts equal to the training-time test, checkpoints in both layouts, refused
mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from _stats import assert_chi_square_fits
from _tiny_models import one_thread, random_prompt, run_to_completion, tiny_model  # noqa: F401 (fixture)
from safetensors.torch import save_file

import cospec
from cospec import EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig
from cospec.decoding.eagle3 import Eagle3Head, causal_mask, unrolled_states
from cospec.decoding.eagle3_checkpoint import load_head, save_head
from cospec.decoding.eagle3_proposer import Eagle3Proposer
from cospec.decoding.protocols import DraftRequest, ForwardItem
from cospec.engine.block_manager import BlockManager
from cospec.engine.model_runner import ModelRunner
from cospec.training.data import Example
from cospec.training.train_draft import TrainConfig, train_head

VOCAB = 96
EOS = 3
pytestmark = pytest.mark.usefixtures("one_thread")


def _target(family: str, **overrides):
    return tiny_model(family, vocab_size=VOCAB, num_hidden_layers=6, eos_token_id=EOS, logit_scale=4.0, **overrides)


def _run(engine: LLMEngine, prompts, params):
    return run_to_completion(engine, list(zip(prompts, params)), check_blocks_freed=True)


def _greedy_texts(target, num: int, length: int, seed: int) -> list[Example]:
    """Prompts with the target's own greedy continuations (what a self-distilled head learns from)."""
    prompts = [random_prompt(4 + i % 5, VOCAB, seed + i, low=4) for i in range(num)]
    outs = _run(LLMEngine(target, EngineConfig(block_size=8)), prompts,
                [SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)] * num)
    return [Example(p + o.output_token_ids, [False] * len(p) + [True] * len(o.output_token_ids))
            for p, o in zip(prompts, outs)]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target_and_head(request, tmp_path_factory):
    """A tiny float64 target and a head trained briefly on its greedy outputs (so drafts are often accepted, and eos
    lands inside verify windows)."""
    target = _target(request.param)
    config = TrainConfig(draft_vocab_size=48, ttt_steps=3, batch_size=8, epochs=4, lr=3e-3, eval_every=1000,
                         checkpoint_every=1000, progress=False)
    head = train_head(target, _greedy_texts(target, 48, 40, seed=0), _greedy_texts(target, 8, 40, seed=100), config,
                      tmp_path_factory.mktemp("head"))
    return target, head.to(torch.float64).eval()


def _prompts():
    return [random_prompt(2 + 5 * i, VOCAB, seed=i, low=4) for i in range(8)]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_speculation_with_a_head_equals_plain_greedy(target_and_head, k):
    target, head = target_and_head
    prompts = _prompts()
    params = [SamplingParams(max_tokens=6 + 7 * i, temperature=0) for i in range(len(prompts))]
    plain = _run(LLMEngine(target, EngineConfig(block_size=4)), prompts, params)
    # A small cache: sequences are preempted and recomputed, the head's cache and states with them.
    engine = LLMEngine(target, EngineConfig(block_size=4, num_kv_blocks=40), speculative=SpeculativeConfig(
        "eagle3", num_draft_tokens=k, draft_head=head, adaptive=False))
    spec = _run(engine, prompts, params)
    for a, b in zip(plain, spec):
        assert a.output_token_ids == b.output_token_ids
        assert a.finish_reason == b.finish_reason
    assert {o.finish_reason for o in plain} == {"stop", "length"}
    assert sum(o.stats.num_preemptions for o in spec) > 0
    accepted = sum(o.stats.num_accepted_tokens for o in spec)
    assert accepted > 0.1 * sum(len(o.output_token_ids) for o in spec)  # a random head: about 0.005
    # eos inside a window: a sequence that stopped in a step where drafts were accepted
    stopped = [o for o in spec if o.finish_reason == "stop"]
    assert stopped and all(o.output_token_ids[-1] == EOS for o in stopped)


def test_a_head_in_a_lone_unzeroed_region_reads_only_what_it_wrote(target_and_head):
    """With one KV region (``generate()`` at batch 1) neither the target's pool nor the head's is zeroed: filled
    with NaN first, the engine gives the tokens, drafts and acceptances of one shared pool, so no step of the target
    or the head reads a slot it did not write."""
    target, head = target_and_head
    spec_config = SpeculativeConfig("eagle3", num_draft_tokens=4, draft_head=head, adaptive=False)
    accepted = 0
    for prompt in _prompts()[:4]:
        params = [SamplingParams(max_tokens=20, temperature=0)]
        shared = _run(LLMEngine(target, EngineConfig(block_size=4), speculative=spec_config), [prompt], params)[0]
        engine = LLMEngine(target, EngineConfig(block_size=4, kv_region_tokens=64, max_num_seqs=1),
                           speculative=spec_config)
        for pool in (engine.runner.pool, engine.proposer.runner.pool):
            pool._k.fill_(float("nan"))
            pool._v.fill_(float("nan"))
        lone = _run(engine, [prompt], params)[0]
        assert lone.output_token_ids == shared.output_token_ids
        assert lone.stats.acceptance_histogram == shared.stats.acceptance_histogram
        accepted += lone.stats.num_accepted_tokens
    assert accepted > 0


def test_drop_in_generate_with_a_head(target_and_head):
    target, head = target_and_head
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate([4, 12, 7]):
        ids[row, 12 - n:] = torch.tensor(random_prompt(n, VOCAB, seed=row, low=4))
        mask[row, 12 - n:] = 1
    reference = target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    out = cospec.generate(target, ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          draft_head=head, num_assistant_tokens=4)
    assert torch.equal(out, reference)


def test_drafts_equal_the_training_time_test(target_and_head):
    """The engine's paged drafting and the training-time-test unrolling compute the same thing: step s of an anchor
    fed the drafts themselves gives draft s + 1."""
    target, head = target_and_head
    engine = LLMEngine(target, EngineConfig(block_size=4), speculative=SpeculativeConfig(
        "eagle3", num_draft_tokens=5, draft_head=head, adaptive=False))
    prompt = random_prompt(13, VOCAB, seed=5, low=4)
    engine.add_request("r", prompt, SamplingParams(max_tokens=8, temperature=0))
    engine.step()  # prefill; the head receives the target's states of the 13 prompt positions
    seq, = engine._requests["r"]
    tokens = list(seq.token_ids)  # the prompt and the first token
    engine.block_manager.grow(seq.seq_id, len(tokens) + 5)  # room for the drafts, as the scheduler makes
    drafts = engine.proposer.propose([DraftRequest(seq.seq_id, tokens, 5)])[0].token_ids
    with torch.no_grad():
        aux = _aux_states(target, head, prompt)  # [13, 3H]
        fed = torch.tensor([tokens[1:] + drafts[:-1]])
        states = unrolled_states(head, head.combine(aux)[None], fed, causal_mask(torch.tensor([13]), 13), 5)
        reference = [int(head.to_target_ids(head.compute_logits(s[0, -1]).argmax())) for s in states]
    assert drafts == reference


def _aux_states(target, head, token_ids) -> torch.Tensor:
    with torch.no_grad():
        hidden = target(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
    return torch.cat([hidden[layer][0] for layer in head.aux_layer_ids], dim=-1)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_states_captured_in_a_ragged_step_equal_hf_hidden_states(family):
    target = _target(family)
    layers = (2, 3, 5)
    block_manager = BlockManager(64, 4)
    runner = ModelRunner(target, block_manager, 64, torch.float64, capture_layers=layers)
    prompts = [random_prompt(n, VOCAB, seed=n, low=4) for n in (9, 3, 14)]
    # Step 1: whole prompts and one chunk; step 2: a decode, a multi-token window and the rest of the chunked prompt.
    step1 = [ForwardItem(0, prompts[0], 0, 1), ForwardItem(1, prompts[1][:1], 0, 0),
             ForwardItem(2, prompts[2][:6], 0, 0)]
    extra = [[7], [8, 9, 10]]
    step2 = [ForwardItem(0, extra[0], 9, 1), ForwardItem(1, prompts[1][1:] + extra[1], 1, 5),
             ForwardItem(2, prompts[2][6:], 6, 1)]
    full = [prompts[0] + extra[0], prompts[1] + extra[1], prompts[2]]
    captured = []
    for items in (step1, step2):
        for it in items:
            block_manager.grow(it.seq_id, it.start_pos + len(it.token_ids))
        runner.forward(items)
        rows = runner.aux_hidden_states.split([len(it.token_ids) for it in items])
        captured.append({it.seq_id: r for it, r in zip(items, rows)})
    for seq_id, tokens in enumerate(full):
        with torch.no_grad():
            hidden = target(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[layer][0] for layer in layers], dim=-1)
        got = torch.cat([captured[0][seq_id], captured[1][seq_id]])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seeded", [True, False], ids=["coupled", "rejection-sampling"])
def test_sampled_speculation_with_a_head_preserves_the_target_distribution(seeded):
    """10^4 three-token samples, seeded (drafts coupled to the target's noise) or not (rejection sampling against
    the head's probabilities); the head's vocabulary leaves out tokens the target can sample (their draft
    probability is 0). Chi-square of (t2, t3) against the target's exact law."""
    vocab = 16
    target = tiny_model("llama", vocab_size=vocab, num_hidden_layers=5, logit_scale=6.0)
    torch.manual_seed(1)
    head = Eagle3Head.for_target(target, list(range(0, vocab, 2)) + [5, 7])
    with torch.no_grad():
        head.lm_head.weight.mul_(30.0)  # peaked drafts, far from the target
    prompt = [4, 9, 5, 12, 6]
    num_samples, temperature = 10_000, 1.0
    engine = LLMEngine(target, EngineConfig(block_size=16, max_num_seqs=num_samples, max_num_batched_tokens=10 ** 6,
                                            num_kv_blocks=2 * num_samples),
                       speculative=SpeculativeConfig("eagle3", num_draft_tokens=3, draft_head=head, adaptive=False))
    outs = _run(engine, [prompt] * num_samples,
                [SamplingParams(max_tokens=3, temperature=temperature, seed=i if seeded else None, ignore_eos=True)
                 for i in range(num_samples)])
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for o in outs:
        counts[o.output_token_ids[1], o.output_token_ids[2]] += 1
    assert sum(o.stats.num_drafted_tokens for o in outs) > 0.5 * num_samples
    assert 0 < sum(o.stats.num_accepted_tokens for o in outs) < sum(o.stats.num_drafted_tokens for o in outs)
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        p2 = torch.softmax(target(torch.tensor([prompt + [a] for a in range(vocab)])).logits[:, -1] / temperature, -1)
        pairs = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
        p3 = torch.softmax(target(pairs).logits[:, -1] / temperature, -1).view(vocab, vocab, vocab)
    expected = torch.einsum("a,ab,abc->bc", p1, p2, p3) * num_samples
    assert_chi_square_fits(counts, expected)


def test_draft_probabilities_are_zero_outside_the_draft_vocabulary():
    target = _target("llama")
    head = Eagle3Head.for_target(target, [5, 9, 17, 40])
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]], dtype=torch.float64)
    probs = torch.softmax(head.target_logits(logits), dim=-1)[0]
    assert torch.allclose(probs[[5, 9, 17, 40]], torch.softmax(logits[0], -1))
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[[5, 9, 17, 40]] = False
    assert bool((probs[outside] == 0).all())


def _engine_outputs(target, head_or_path, prompts):
    engine = LLMEngine(target, EngineConfig(block_size=4), speculative=SpeculativeConfig(
        "eagle3", num_draft_tokens=4, draft_head=head_or_path, adaptive=False))
    outs = _run(engine, prompts, [SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)] * len(prompts))
    return [(o.output_token_ids, o.stats.acceptance_histogram) for o in outs]


def test_saved_head_loads_with_the_same_outputs(target_and_head, tmp_path):
    target, head = target_and_head
    save_head(head, tmp_path, verifier_name="tiny", verifier_architectures=["LlamaForCausalLM"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    for key in ("transformer_layer_config", "draft_vocab_size", "target_hidden_size",
                "eagle_aux_hidden_state_layer_ids", "norm_before_residual"):
        assert key in config
    assert set(config["speculators_config"]) == {"algorithm", "proposal_methods", "default_proposal_method", "verifier"}
    assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny"
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "layers.0.self_attn.q_proj.weight",
            "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight"} <= names
    assert not any(n.startswith("embed_tokens") for n in names)  # the target's
    loaded = load_head(tmp_path, target)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    prompts = _prompts()[:4]
    assert _engine_outputs(target, head, prompts) == _engine_outputs(target, str(tmp_path), prompts)


def test_head_in_the_eagle_repository_layout_loads_and_runs(target_and_head, tmp_path):
    target, head = target_and_head
    weights = {name.replace("layers.0.", "midlayer.", 1): t.detach().clone()
               for name, t in head.state_dict().items()}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    layer = head.config
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": layer.hidden_size,
        "intermediate_size": layer.intermediate_size, "num_attention_heads": layer.num_attention_heads,
        "num_key_value_heads": layer.num_key_value_heads, "head_dim": layer.head_dim, "num_hidden_layers": 1,
        "rms_norm_eps": layer.rms_norm_eps, "rope_theta": layer.rope_parameters["rope_theta"],
        "max_position_embeddings": layer.max_position_embeddings, "vocab_size": VOCAB,
        "draft_vocab_size": head.draft_vocab_size, "tie_word_embeddings": False,
        "eagle_aux_hidden_state_layer_ids": list(head.aux_layer_ids)}))
    loaded = load_head(tmp_path, target)
    assert not loaded.norm_before_residual
    states = torch.randn(1, 5, layer.hidden_size, dtype=torch.float64)
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    mask = causal_mask(torch.tensor([5]), 5)
    with torch.no_grad():
        expected = head.compute_logits(unrolled_states(head, states, ids, mask, 1)[0])
        got = loaded.compute_logits(unrolled_states(loaded, states, ids, mask, 1)[0])
    torch.testing.assert_close(got, expected)
    assert _engine_outputs(target, loaded, _prompts()[:3]) == _engine_outputs(target, head, _prompts()[:3])


def test_speculators_checkpoint_with_norm_before_residual_loads(tmp_path):
    target = _target("llama")
    head = Eagle3Head.for_target(target, list(range(VOCAB)), norm_before_residual=True)
    save_head(head, tmp_path)
    loaded = load_head(tmp_path, target)
    assert loaded.norm_before_residual and loaded.layers[0].norm_before_residual
    assert loaded.draft_vocab_size == VOCAB and bool(loaded.t2d.all())


@pytest.mark.parametrize("other,match", [
    (dict(hidden_size=48), "hidden size"),
    (dict(vocab_size=VOCAB + 8), "vocabulary"),
    (dict(num_hidden_layers=3), "layers"),
])
def test_a_head_for_another_model_is_refused(tmp_path, other, match):
    head = Eagle3Head.for_target(_target("llama"), list(range(0, VOCAB, 3)), aux_layer_ids=(1, 3, 5))
    save_head(head, tmp_path)
    different = tiny_model("llama", **{**dict(vocab_size=VOCAB, num_hidden_layers=6, eos_token_id=EOS), **other})
    with pytest.raises(ValueError, match=match):
        load_head(tmp_path, different)
    with pytest.raises(ValueError, match=match):
        LLMEngine(different, speculative=SpeculativeConfig("eagle3", draft_head=str(tmp_path)))


def test_not_a_head_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        load_head(tmp_path, _target("llama"))


def test_missing_default_head_says_how_to_train_it(tmp_path, monkeypatch):
    monkeypatch.setenv("COSPEC_CACHE_DIR", str(tmp_path))
    target = _target("llama")
    target.name_or_path = "/models/tiny-llama"
    with pytest.raises(FileNotFoundError, match="cospec train-draft --model /models/tiny-llama"):
        LLMEngine(target, speculative=SpeculativeConfig("eagle3", draft_head="default"))


def test_missing_default_head_of_an_embedded_model_names_it_as_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("COSPEC_CACHE_DIR", str(tmp_path))
    target = _target("llama")
    target.name_or_path = str(tmp_path / "models" / "smollm2-135m")  # where the embedded model's copy is loaded from
    with pytest.raises(FileNotFoundError, match=r"train it with: cospec train-draft --model smollm2-135m$"):
        LLMEngine(target, speculative=SpeculativeConfig("eagle3", draft_head="default"))


def test_default_head_is_found_where_train_draft_puts_it(target_and_head, tmp_path, monkeypatch):
    from cospec.engine.models import default_draft_head_dir

    target, head = target_and_head
    monkeypatch.setenv("COSPEC_CACHE_DIR", str(tmp_path))
    target.name_or_path = "/models/tiny-llama"
    save_head(head, default_draft_head_dir("tiny-llama"))
    engine = LLMEngine(target, speculative=SpeculativeConfig("eagle3", draft_head="default"))
    assert isinstance(engine.proposer, Eagle3Proposer)


def test_a_head_with_prefix_caching_prefills_in_full_and_keeps_drafting(target_and_head):
    """A prefix served from the cache has no target states for the head, so a sequence under a head reuses none of it
    (``max_reusable_prefix``): it prefills in full and drafts as usual, with the same output as plain decoding."""
    target, head = target_and_head
    shared = random_prompt(17, VOCAB, seed=50, low=4)
    prompts = [shared + random_prompt(3, VOCAB, seed=60 + i, low=4) for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = _run(LLMEngine(target, EngineConfig(block_size=4)), prompts, [params] * len(prompts))
    engine = LLMEngine(target, EngineConfig(block_size=4, enable_prefix_caching=True), speculative=SpeculativeConfig(
        "eagle3", num_draft_tokens=4, draft_head=head, adaptive=False))
    first = _run(engine, prompts[:1], [params])  # fills the prefix cache
    rest = _run(engine, prompts[1:], [params] * 3)
    for a, b in zip(plain, first + rest):
        assert a.output_token_ids == b.output_token_ids
    for out in rest:
        assert out.stats.num_cached_prompt_tokens == 0
        assert out.stats.num_drafted_tokens > 0  # the head drafts for it
    assert sum(out.stats.num_accepted_tokens for out in rest) > 0
