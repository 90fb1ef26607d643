"""The OpenAI-compatible server, end to end: real server processes on loopback, the official ``openai`` client.

Two servers share the module: a plain one, and one with prompt-lookup speculation, an API key and room for one
running and one waiting request (for 401 and 429). Greedy answers must equal offline ``cospec.LLM`` token for token
(compared as text and token counts), alone or 32 at a time, streamed or not; every bad request gets its 4xx and the
server keeps serving.
"""

import asyncio
import json
import time

import httpx
import openai
import pytest

import cospec

from _serving import CONTEXT, SENTENCES, offline_llm, served_model_dir
from benchmarks.bench_serve import ServerProcess

API_KEY = "test-key-123"
MAX_TOKENS_LIMIT = 4000
MAX_REQUEST_BYTES = 65536
STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_model_dir(tmp_path_factory.mktemp("tiny-llama-served"))


def _server(model_dir, log_path, *flags: str) -> ServerProcess:
    return ServerProcess(["--model", str(model_dir), "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
                          "--max-request-bytes", str(MAX_REQUEST_BYTES), *flags],
                         log_path, env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})


def _wait_ready(server: ServerProcess) -> None:
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """(plain, speculative) servers, started together; always killed at the end."""
    logs = tmp_path_factory.mktemp("server-logs")
    plain = _server(model_dir, logs / "plain.log")
    spec = _server(model_dir, logs / "spec.log", "--prompt-lookup", "3", "--api-key", API_KEY,
                   "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        _wait_ready(plain)
        _wait_ready(spec)
        yield plain, spec
    finally:
        plain.stop()
        spec.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def llm(model_dir):
    """The offline reference."""
    with offline_llm(model_dir) as reference:
        yield reference


def _offline(llm, prompt: str, max_tokens: int, chat: bool, **params) -> cospec.RequestOutput:
    (out,) = llm.generate(prompt, cospec.SamplingParams(temperature=0.0, max_tokens=max_tokens, **params),
                          use_tqdm=False, chat=chat)
    return out


def _client(server, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def _model(model_dir) -> str:
    return str(model_dir)


PROMPTS = ["the cat sat", "a dog ran in the", "we write code", "the sky is blue and", "hello how are you"]


# ---- answers equal offline decoding --------------------------------------------------------------------------
def test_models_and_health(server, model_dir):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    (entry,) = _client(server).models.list().data
    assert entry.id == _model(model_dir)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_offline(server, model_dir, llm, stream):
    client = _client(server)
    for prompt in PROMPTS[:3]:
        expected = _offline(llm, prompt, 12, chat=False)
        if stream:
            chunks = list(client.completions.create(model=_model(model_dir), prompt=prompt, max_tokens=12,
                                                    temperature=0, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish_reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            response = client.completions.create(model=_model(model_dir), prompt=prompt, max_tokens=12, temperature=0)
            text, finish_reason, usage = response.choices[0].text, response.choices[0].finish_reason, response.usage
        assert text == expected.text
        assert finish_reason == expected.finish_reason
        assert usage.prompt_tokens == len(expected.prompt_token_ids)
        assert usage.completion_tokens == len(expected.output_token_ids)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline(server, model_dir, llm, stream):
    client = _client(server)
    for prompt in PROMPTS[3:]:
        expected = _offline(llm, prompt, 10, chat=True)
        messages = [{"role": "user", "content": prompt}]
        if stream:
            chunks = list(client.chat.completions.create(model=_model(model_dir), messages=messages, max_tokens=10,
                                                         temperature=0, stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish_reason = chunks[-1].choices[0].finish_reason
        else:
            response = client.chat.completions.create(model=_model(model_dir), messages=messages, max_tokens=10,
                                                      temperature=0)
            assert response.choices[0].message.role == "assistant"
            text, finish_reason = response.choices[0].message.content, response.choices[0].finish_reason
            assert response.usage.completion_tokens == len(expected.output_token_ids)
        assert text == expected.text
        assert finish_reason == expected.finish_reason


def test_32_concurrent_requests_equal_each_alone(server, model_dir, llm):
    words = " ".join(SENTENCES).split()
    prompts = [" ".join(words[i: i + 2 + i % 5]) for i in range(32)]
    expected = [_offline(llm, p, 8 + i % 9, chat=False, ignore_eos=True) for i, p in enumerate(prompts)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

    async def one(i: int) -> str:
        kwargs = dict(model=_model(model_dir), prompt=prompts[i], max_tokens=8 + i % 9, temperature=0,
                      extra_body={"ignore_eos": True})
        if i % 2:
            return "".join([c.choices[0].text async for c in await client.completions.create(stream=True, **kwargs)])
        return (await client.completions.create(**kwargs)).choices[0].text

    async def all_of_them():
        async with client:
            return await asyncio.gather(*(one(i) for i in range(32)))

    assert asyncio.run(all_of_them()) == [e.text for e in expected]


def test_load_test_sends_back_the_answers_it_received(server, model_dir, llm):
    # bench_serve's multi-turn sessions behave as a chat client: turn 2 carries the server's answer to turn 1.
    from benchmarks.bench_serve import run_load
    from benchmarks.serve_workloads import Session

    first_turn = [{"role": "user", "content": PROMPTS[0]}]
    session = Session("s", [first_turn, first_turn + [{"role": "assistant", "content": "a recorded reply"},
                                                      {"role": "user", "content": PROMPTS[1]}]])
    results, _ = asyncio.run(run_load(server.url, "none", _model(model_dir), [session], 8, 0.0, None, 1, 60, 0,
                                      own_answers=True))
    first, second = results
    assert first.ok and second.ok
    assert first.text == _offline(llm, PROMPTS[0], 8, chat=True).text
    sent = session.messages(1, [first.text])
    assert sent[1] == {"role": "assistant", "content": first.text}
    ids = llm.tokenizer.apply_chat_template(sent, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    (expected,) = llm.generate([ids], cospec.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert second.prompt_tokens == len(ids) and second.text == expected.text
    # usage.prompt_tokens_details.cached_tokens: turn 2 found turn 1's prompt in the prefix cache (all its full
    # 16-token blocks), never its own last token.
    assert first.prompt_tokens // 16 * 16 <= second.cached_tokens < second.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server, model_dir, llm, stream):
    expected = _offline(llm, "the cat sat", 30, chat=False, ignore_eos=True)
    words = expected.text.split()
    stop = next((w for w in words[2:] if w not in words[:2]), words[-1])
    cut = expected.text[: expected.text.index(stop)]
    kwargs = dict(model=_model(model_dir), prompt="the cat sat", max_tokens=30, temperature=0, stop=[stop, "zzz"],
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(_client(server).completions.create(stream=True, **kwargs))
        text, finish_reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = _client(server).completions.create(**kwargs).choices[0]
        text, finish_reason = choice.text, choice.finish_reason
    assert text == cut
    assert finish_reason == "stop"


# ---- resources ---------------------------------------------------------------------------------------------
def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_dropped_stream_aborts_and_frees_blocks(server, model_dir):
    aborted_before = server.metrics().get('cospec_requests_finished_total{reason="abort"}', 0)
    body = {"model": _model(model_dir), "prompt": "the cat sat", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events = [line for line in (next(lines) for _ in range(6)) if line]
        assert len(events) == 3 and events[0].startswith("data: {")
        assert server.metrics()["cospec_kv_blocks_used"] > 0
        lines.close()  # drops the connection (httpx closes an unfinished stream)
    # The connection closed mid-stream: the request is aborted and its blocks are free long before it could finish
    # (4000 tokens take seconds).
    assert _wait_for(lambda: server.metrics()["cospec_kv_blocks_used"] == 0, timeout_s=5)
    metrics = server.metrics()
    assert metrics['cospec_requests_finished_total{reason="abort"}'] == aborted_before + 1
    assert metrics["cospec_num_requests_running"] == 0 and metrics["cospec_kv_blocks_total"] > 0
    assert metrics["cospec_generation_tokens_total"] > 0 and metrics['cospec_http_requests_total{status="200"}'] > 0


def test_client_leaving_a_non_streaming_request_aborts_it(server, model_dir):
    aborted = 'cospec_requests_finished_total{reason="abort"}'
    aborted_before = server.metrics().get(aborted, 0)
    body = {"model": _model(model_dir), "prompt": "the cat sat", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert _wait_for(lambda: server.metrics().get(aborted, 0) == aborted_before + 1, timeout_s=5)
    assert server.metrics()["cospec_kv_blocks_used"] == 0


# ---- bad requests ------------------------------------------------------------------------------------------
def _bad_requests(model: str) -> list:
    """(path, body (dict, or bytes sent as is), status, param)."""
    ok = {"model": model, "prompt": "the cat", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", b"\xff\xfe", 400, None),
        ("/v1/completions", b"x" * (MAX_REQUEST_BYTES + 1), 413, None),
        ("/v1/completions", ok | {"model": "gpt-4"}, 404, "model"),
        ("/v1/completions", ok | {"max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", ok | {"max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", ok | {"max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens"),
        ("/v1/completions", ok | {"max_tokens": True}, 400, "max_tokens"),
        ("/v1/completions", ok | {"temperature": -1}, 400, "temperature"),
        ("/v1/completions", ok | {"temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", ok | {"top_p": 0}, 400, "top_p"),
        ("/v1/completions", ok | {"top_k": 1.5}, 400, "top_k"),
        ("/v1/completions", ok | {"min_p": 2}, 400, "min_p"),
        ("/v1/completions", ok | {"seed": "x"}, 400, "seed"),
        ("/v1/completions", ok | {"n": 0}, 400, "n"),
        ("/v1/completions", ok | {"stream": "yes"}, 400, "stream"),
        ("/v1/completions", ok | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", ok | {"stop": ""}, 400, "stop"),
        ("/v1/completions", ok | {"stop": 5}, 400, "stop"),
        ("/v1/completions", ok | {"logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", ok | {"frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ("/v1/completions", ok | {"no_such_param": 1}, 400, "no_such_param"),
        ("/v1/completions", ok | {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", ok | {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", ok | {"prompt": []}, 400, "prompt"),
        ("/v1/completions", ok | {"prompt": [1, 2, 10 ** 6]}, 400, "prompt"),
        ("/v1/completions", ok | {"prompt": [3] * (CONTEXT + 1)}, 400, "prompt"),
        ("/v1/completions", ok | {"prompt": [3] * (CONTEXT - 10), "max_tokens": 20}, 400, "max_tokens"),
        ("/v1/completions", ok | {"stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/chat/completions", chat | {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", chat | {"messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", chat | {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": 7}]}, 400, "messages"),
        ("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages"),
        ("/v1/chat/completions", chat | {"prompt": "x"}, 400, "prompt"),
        ("/v1/chat/completions", chat | {"max_completion_tokens": -3}, 400, "max_completion_tokens"),
        ("/v1/nothing-here", ok, 404, None),
    ]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, model_dir):
    model = _model(model_dir)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, status, param in _bad_requests(model):
            if isinstance(body, bytes):
                response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                response = http.post(path, json=body)
            assert response.status_code == status, (path, body if isinstance(body, dict) else body[:20], response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, (body, error)
            good = http.post("/v1/completions", json={"model": model, "prompt": "the cat", "max_tokens": 3})
            assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/v1/completions").status_code == 405
    # The official client raises its typed errors for them.
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        _client(server).completions.create(model=model, prompt="x", max_tokens=2, n=0)


# ---- the speculative server: API key, backpressure, identical greedy output -------------------------------------
def test_api_key_is_enforced(servers, model_dir):
    spec = servers[1]
    assert httpx.get(spec.url + "/health").status_code == 200  # open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(spec.url + "/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(spec, api_key="wrong").completions.create(model=_model(model_dir), prompt="x", max_tokens=2)
    assert _client(spec, api_key=API_KEY).models.list().data[0].id == _model(model_dir)


def test_speculation_gives_identical_greedy_outputs(servers, model_dir, llm):
    spec = servers[1]
    client = _client(spec, api_key=API_KEY)
    for prompt in ["the cat sat on the mat and the cat", "a dog ran in the park with a dog", "we write code"]:
        expected = _offline(llm, prompt, 40, chat=False, ignore_eos=True)
        response = client.completions.create(model=_model(model_dir), prompt=prompt, max_tokens=40, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert response.choices[0].text == expected.text
        assert response.usage.completion_tokens == 40
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=_model(model_dir), prompt=prompt, max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        assert streamed == expected.text
    metrics = spec.metrics(Authorization=f"Bearer {API_KEY}")
    assert metrics["cospec_spec_draft_tokens_total"] > 0, "prompt lookup should have drafted on these prompts"
    assert 0 <= metrics["cospec_spec_acceptance_rate"] <= 1
    # Each accepted draft token was accepted at exactly one draft position.
    per_position = {k: v for k, v in metrics.items()
                    if k.startswith("cospec_spec_accepted_tokens_per_position_total{")}
    assert sum(per_position.values()) == metrics["cospec_spec_accepted_tokens_total"] > 0
    assert per_position['cospec_spec_accepted_tokens_per_position_total{position="1"}'] == max(per_position.values())
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        assert metrics[f"cospec_{histogram}_count"] >= 6, histogram
        assert metrics[f'cospec_{histogram}_bucket{{le="+Inf"}}'] == metrics[f"cospec_{histogram}_count"]


def test_full_queue_gets_429_with_retry_after(servers, model_dir):
    spec = servers[1]  # one running, one waiting at most
    body = {"model": _model(model_dir), "prompt": "the cat sat", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one(http: httpx.AsyncClient) -> tuple[int, str | None, int]:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
            return response.status_code, response.headers.get("retry-after"), len(lines)

    async def burst():
        async with httpx.AsyncClient(base_url=spec.url, timeout=60) as http:
            return await asyncio.gather(*(one(http) for _ in range(4)))

    results = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in results)
    assert 200 in statuses and 429 in statuses, results
    assert all(retry == "1" for status, retry, _ in results if status == 429)
    assert all(n > 0 for status, _, n in results if status == 200)
    # The queue drained; the next request is served.
    response = httpx.post(spec.url + "/v1/completions", headers=headers, timeout=30,
                          json={"model": _model(model_dir), "prompt": "the cat", "max_tokens": 3})
    assert response.status_code == 200
    assert json.loads(response.text)["choices"][0]["finish_reason"] in ("stop", "length")


# ---- shutdown ----------------------------------------------------------------------------------------------
def test_sigterm_drains_then_ends_every_stream(model_dir, tmp_path):
    """16 streams run; SIGTERM. New requests get 503 at once; each stream ends with either its full output or an
    error event, then [DONE]; the process exits. Long streams (3000 tokens) cannot finish within the 3 s drain."""
    import signal

    server = _server(model_dir, tmp_path / "drain.log", "--drain-timeout", "3")
    _wait_ready(server)
    lengths = [40] * 8 + [3000] * 8
    started = asyncio.Semaphore(0)

    async def one(http: httpx.AsyncClient, max_tokens: int) -> list[str]:
        body = {"model": _model(model_dir), "prompt": "the cat sat", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        events = []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) == 1:
                        started.release()
        return events

    async def run() -> tuple[list[list[str]], int, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            streams = [asyncio.create_task(one(http, n)) for n in lengths]
            for _ in lengths:
                await asyncio.wait_for(started.acquire(), 60)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            refused = await http.post("/v1/completions", json={"model": _model(model_dir), "prompt": "the cat",
                                                                 "max_tokens": 2})
            health = await http.get("/health")
            return await asyncio.gather(*streams), refused.status_code, health.status_code

    try:
        results, refused, health = asyncio.run(run())
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert refused == 503 and health == 503
    outcomes = []
    for max_tokens, events in zip(lengths, results):
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == "shutting_down"
            outcomes.append("cut")
        else:  # the full output: the usage chunk after the finish chunk
            assert last["usage"]["completion_tokens"] == max_tokens
            assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
            outcomes.append("full")
    assert outcomes[8:] == ["cut"] * 8, outcomes
