"""The OpenAI sampling parameters end to end, against a direct computation from the model's logits: logprobs in
both shapes (chat ``logprobs``/``top_logprobs``, completions ``logprobs``), streamed and not; ``presence_penalty``,
``frequency_penalty``, ``repetition_penalty`` and ``logit_bias`` (greedy decoding with the penalized logits, step by
step with Hugging Face's forward); ``n`` samples, equal to offline ``LLM`` with the same seed.
"""

import json

import httpx
import pytest
import torch

import cospec

from _serving import InProcessServer, served_in_process, served_model_dir

MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_model_dir(tmp_path_factory.mktemp("tiny-llama-sampling"))


@pytest.fixture(scope="module")
def served(model_dir):
    from cospec.serving.app import ServeOptions

    with served_in_process(model_dir, ServeOptions(MODEL, max_tokens_limit=64)) as server:
        yield server


@pytest.fixture(scope="module")
def hf(model_dir):
    """The model and tokenizer as Hugging Face loads them: the direct computation."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def _post(served, path: str, body: dict) -> dict:
    response = httpx.post(served.url + path, json={"model": MODEL} | body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _stream(served, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", served.url + path, json={"model": MODEL, "stream": True} | body, timeout=60) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _logprobs_along(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's next-token logits at each output position: ``[len(output_ids), vocab]``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0].double()
    return torch.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)


def _greedy_with(model, prompt_ids: list[int], steps: int, process) -> list[int]:
    """Greedy decoding where ``process(logits [vocab], output_ids)`` edits each step's logits."""
    output: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + output])).logits[0, -1].double()
        output.append(int(process(logits.clone(), output).argmax()))
    return output


PROMPT_IDS = [5, 9, 12, 7]


# ---- logprobs ------------------------------------------------------------------------------------------------
def test_completion_logprobs_equal_the_model_log_softmax(served, hf):
    model, tokenizer = hf
    answer = _post(served, "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True, "logprobs": 3})
    logprobs = answer["choices"][0]["logprobs"]
    output_ids = [tokenizer.convert_tokens_to_ids(t.strip()) for t in logprobs["tokens"]]
    assert len(output_ids) == 8 and answer["usage"]["completion_tokens"] == 8
    expected = _logprobs_along(model, PROMPT_IDS, output_ids)
    for i, token in enumerate(output_ids):
        assert token == int(expected[i].argmax())  # greedy
        assert logprobs["token_logprobs"][i] == pytest.approx(float(expected[i, token]), abs=1e-4)
        top = torch.topk(expected[i], 3)
        want = {tokenizer.decode([int(t)]): float(v) for t, v in zip(top.indices, top.values)}
        got = {k.strip(): v for k, v in logprobs["top_logprobs"][i].items()}  # tokens after the first: " word"
        assert got.keys() == want.keys()  # the greedy token is among the top 3
        assert all(got[k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
    text = answer["choices"][0]["text"]
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(text[o: o + len(t)] == t for o, t in zip(offsets, logprobs["tokens"])
               if t not in tokenizer.all_special_tokens)  # special tokens are shown, but not in the text


def test_chat_logprobs_equal_the_model_log_softmax_streamed_or_not(served, hf):
    model, tokenizer = hf
    messages = [{"role": "user", "content": "the cat sat on the"}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 2}
    content = _post(served, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    output_ids = [tokenizer.convert_tokens_to_ids(entry["token"].strip()) for entry in content]
    expected = _logprobs_along(model, prompt_ids, output_ids)
    for i, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(float(expected[i, output_ids[i]]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        top = torch.topk(expected[i], 2)
        assert [t["token"].strip() for t in entry["top_logprobs"]] == [tokenizer.decode([int(t)]) for t in top.indices]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    streamed = [e for chunk in _stream(served, "/v1/chat/completions", body) for choice in chunk["choices"]
                if choice["logprobs"] for e in choice["logprobs"]["content"]]
    assert streamed == content


def test_logprobs_of_sampled_tokens_come_from_the_sampling_distribution(served, hf):
    model, tokenizer = hf
    answer = _post(served, "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0.7,
                                                "seed": 11, "ignore_eos": True, "logprobs": 1})
    logprobs = answer["choices"][0]["logprobs"]
    output_ids = [tokenizer.convert_tokens_to_ids(t.strip()) for t in logprobs["tokens"]]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT_IDS + output_ids])).logits[0].double()
    expected = torch.log_softmax(logits[len(PROMPT_IDS) - 1: -1] / 0.7, dim=-1)
    assert logprobs["token_logprobs"] == pytest.approx([float(expected[i, t]) for i, t in enumerate(output_ids)],
                                                       abs=1e-4)


# ---- penalties and biases ---------------------------------------------------------------------------------------
def _presence_frequency(presence: float, frequency: float):
    def process(logits, output):
        counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=logits.numel()).double()
        return logits - presence * (counts > 0) - frequency * counts
    return process


def _repetition(penalty: float):
    def process(logits, output):
        seen = torch.tensor(sorted(set(PROMPT_IDS + output)))
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
        return logits
    return process


def _bias(biases: dict[int, float]):
    def process(logits, output):
        for token, bias in biases.items():
            logits[token] += bias
        return logits
    return process


@pytest.mark.parametrize("params, process", [
    ({"presence_penalty": 1.5}, _presence_frequency(1.5, 0.0)),
    ({"frequency_penalty": 0.8}, _presence_frequency(0.0, 0.8)),
    ({"presence_penalty": -0.5, "frequency_penalty": 1.2}, _presence_frequency(-0.5, 1.2)),
    ({"repetition_penalty": 1.3}, _repetition(1.3)),
    ({"logit_bias": {"9": 6.0, "12": -100}}, _bias({9: 6.0, 12: -100.0})),
])
def test_penalties_and_biases_equal_direct_greedy_decoding(served, hf, params, process):
    model, tokenizer = hf
    steps = 12
    expected_ids = _greedy_with(model, PROMPT_IDS, steps, process)
    plain_ids = _greedy_with(model, PROMPT_IDS, steps, lambda logits, output: logits)
    assert expected_ids != plain_ids, "the parameter should change this output"
    answer = _post(served, "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": steps, "temperature": 0,
                                                "ignore_eos": True} | params)
    assert answer["choices"][0]["text"] == tokenizer.decode(expected_ids, skip_special_tokens=True)


# ---- n samples ------------------------------------------------------------------------------------------------
def test_n_samples_equal_offline_samples_with_the_same_seed(served, model_dir):
    params = cospec.SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    llm = cospec.LLM(str(model_dir), max_num_seqs=4)
    expected = [out.text for out in llm.generate(PROMPT_IDS, params, use_tqdm=False)]
    body = {"prompt": PROMPT_IDS, "n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 10, "ignore_eos": True}
    answer = _post(served, "/v1/completions", body)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert [c["text"] for c in answer["choices"]] == expected
    assert len(set(expected)) > 1, "three samples of a random model should differ"
    assert answer["usage"]["completion_tokens"] == 30 and answer["usage"]["prompt_tokens"] == len(PROMPT_IDS)
    chunks = _stream(served, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    texts = ["", "", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == expected and chunks[-1]["usage"]["completion_tokens"] == 30
    chat = _post(served, "/v1/chat/completions", {"messages": [{"role": "user", "content": "the sun"}], "n": 2,
                                                  "max_tokens": 4, "temperature": 0})
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]  # greedy: the same answer twice


def test_cached_tokens_count_what_earlier_requests_left_not_sibling_samples(served):
    # usage.prompt_tokens_details.cached_tokens: a new 40-token prompt with n = 3 found nothing cached (its samples
    # share blocks with each other, which is not a hit of the prompt); sent again, its 2 full 16-token blocks are.
    body = {"prompt": [(7 * i + 3) % 30 + 5 for i in range(40)], "n": 3, "temperature": 1.0, "seed": 1, "max_tokens": 2}
    first = _post(served, "/v1/completions", body)["usage"]
    second = _post(served, "/v1/completions", body)["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == 32


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": -2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
])
def test_bad_sampling_parameters_get_400(served, path, body, param):
    response = httpx.post(served.url + path, json={"model": MODEL} | body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# ---- seeds ----------------------------------------------------------------------------------------------------
def test_a_seed_reproduces_a_request_alone_or_in_a_batch_with_speculation(model_dir):
    """Through a server that drafts by prompt lookup: a seeded request gives the same text alone, among 7 others
    sent at once, and as offline plain sampling with that seed."""
    import asyncio

    from cospec.engine.config import EngineConfig, SpeculativeConfig
    from cospec.engine.llm_engine import LLMEngine
    from cospec.serving.app import ServeOptions

    prompt = [5, 9, 12, 7, 5, 9, 12, 7, 5, 9]  # repetitive: prompt lookup drafts
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0.8, "seed": 1234,
            "ignore_eos": True}
    params = cospec.SamplingParams(temperature=0.8, seed=1234, max_tokens=16, ignore_eos=True)
    (offline,) = cospec.LLM(str(model_dir), max_num_seqs=1).generate(prompt, params, use_tqdm=False)
    engine = LLMEngine(str(model_dir), EngineConfig(max_num_seqs=8, max_model_len=512),
                       speculative=SpeculativeConfig("prompt_lookup", num_draft_tokens=4))
    with InProcessServer(engine, ServeOptions(MODEL, max_tokens_limit=64)) as served:
        alone = _post(served, "/v1/completions", body)["choices"][0]["text"]

        async def batch():
            async with httpx.AsyncClient(base_url=served.url, timeout=60) as http:
                others = [body | {"seed": 7 + i, "prompt": prompt[i % 4:]} for i in range(7)]
                answers = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in [*others, body]))
            return answers[-1].json()["choices"][0]["text"]

        in_batch = asyncio.run(batch())
        drafted = served.server.metrics.num_drafted
    assert alone == in_batch == offline.text
    assert drafted > 0, "prompt lookup should have drafted"
