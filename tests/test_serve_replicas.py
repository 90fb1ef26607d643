"""``cospec serve --replicas 2``: two engines on Ray Serve replicas behind one endpoint on loopback.

The official ``openai`` client gets the same greedy answers as offline decoding; one conversation stays on one
replica; killing the replica that runs a request ends that request with an error event and no other, and the
deployment keeps serving. Skipped without Ray Serve (the ``serve`` extra).
"""

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

import cospec

pytest.importorskip("ray.serve")

from _serving import offline_llm, served_model_dir  # noqa: E402
from benchmarks.bench_serve import ServerProcess  # noqa: E402

STARTUP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_model_dir(tmp_path_factory.mktemp("tiny-llama-replicas"))


@pytest.fixture(scope="module")
def deployment(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("replica-logs") / "serve.log"
    server = ServerProcess(["--model", str(model_dir), "--replicas", "2", "--drain-timeout", "2",
                            "--max-tokens-limit", "4000"], log,
                           env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield server
    finally:
        server.stop(timeout_s=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    with offline_llm(model_dir) as reference:
        yield reference


def _client(deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=deployment.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _replica(raw) -> str:
    return raw.headers["x-cospec-replica"]


def test_replicas_answer_the_openai_client(deployment, model_dir, llm):
    client = _client(deployment)
    for prompt in ["the cat sat", "a dog ran in the"]:
        expected = llm.generate(prompt, cospec.SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                                chat=False)[0]
        response = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=12, temperature=0)
        assert response.choices[0].text == expected.text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=str(model_dir), prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert streamed == expected.text
    # One conversation (one user) stays on one replica; different users spread over both.
    replicas = {}
    for user in [f"user-{i}" for i in range(8)]:
        seen = {_replica(client.chat.completions.with_raw_response.create(
            model=str(model_dir), messages=[{"role": "user", "content": f"hello {turn}"}], max_tokens=2, user=user))
            for turn in range(3)}
        assert len(seen) == 1, (user, seen)
        replicas[user] = seen.pop()
    assert len(set(replicas.values())) == 2, replicas
    metrics = deployment.metrics()
    assert metrics["cospec_kv_blocks_total"] > 0 and metrics['cospec_http_requests_total{status="200"}'] >= 28


def test_killing_a_replica_fails_only_its_requests(deployment, model_dir):
    async def stream(http: httpx.AsyncClient, user: str, max_tokens: int, started: asyncio.Event, replica: list):
        body = {"model": str(model_dir), "prompt": "the cat sat", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "user": user}
        events = []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            replica.append(response.headers["x-cospec-replica"])
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()
        return events

    async def run():
        async with httpx.AsyncClient(base_url=deployment.url, timeout=120) as http:
            doomed_started, doomed_replica = asyncio.Event(), []
            doomed = asyncio.create_task(stream(http, "doomed", 3000, doomed_started, doomed_replica))
            await asyncio.wait_for(doomed_started.wait(), 60)
            # A request of another user that runs on the other replica.
            for i in range(32):
                survivor_started, survivor_replica = asyncio.Event(), []
                survivor = asyncio.create_task(stream(http, f"survivor-{i}", 400, survivor_started, survivor_replica))
                await asyncio.wait_for(survivor_started.wait(), 60)
                if survivor_replica[0] != doomed_replica[0]:
                    break
                await survivor
            else:
                pytest.fail("no user was routed to the second replica")
            os.kill(int(doomed_replica[0].rsplit(":", 1)[1]), signal.SIGKILL)
            return await doomed, await survivor

    doomed, survivor = asyncio.run(run())
    assert doomed[-1] == "[DONE]" and json.loads(doomed[-2])["error"]["code"] == "engine_error", doomed[-3:]
    assert survivor[-1] == "[DONE]" and json.loads(survivor[-2])["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in survivor[:-1])
    # The deployment keeps serving (Ray Serve replaces the dead replica meanwhile).
    client = _client(deployment)
    deadline = time.monotonic() + 120
    successes = 0
    while successes < 4:
        assert time.monotonic() < deadline, "the deployment stopped serving after a replica died"
        try:
            response = client.completions.create(model=str(model_dir), prompt="the cat", max_tokens=3,
                                                 user=f"after-{successes}-{time.monotonic()}")
            successes += response.usage.completion_tokens > 0
        except openai.APIError:
            successes = 0
            time.sleep(1)


def test_app_builder_takes_the_flags_of_cospec_serve(model_dir):
    """What ``serve run cospec.serving.replicas:app_builder key=value ...`` deploys on a cluster."""
    from cospec.serving.replicas import app_builder

    ingress = app_builder({"model": str(model_dir), "replicas": "3", "max-num-seqs": 8, "prompt_lookup": 3,
                           "threads": 2})._bound_deployment
    engines = ingress.init_args[0]._bound_deployment
    assert (ingress.name, engines.name, engines.num_replicas) == ("OpenAIIngress", "EngineReplica", 3)
    assert engines.max_ongoing_requests == 8 and engines.ray_actor_options["num_cpus"] == 2
    args = engines.init_args[0]
    assert (args.model, args.prompt_lookup, args.max_num_seqs) == (str(model_dir), 3, 8)


def test_prefix_affinity_ranking_is_stable_and_moves_only_a_lost_replicas_keys():
    from types import SimpleNamespace

    from cospec.serving.replicas import PrefixAffinityRouter

    def replica(name: str):
        return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name))

    def preferred(replicas, key):
        pending = SimpleNamespace(kwargs={"affinity_key": key})
        ranks = asyncio.run(PrefixAffinityRouter.choose_replicas(None, replicas, pending))
        assert sorted(r[0].replica_id.unique_id for r in ranks) == sorted(r.replica_id.unique_id for r in replicas)
        return ranks[0][0].replica_id.unique_id

    four = [replica(name) for name in "abcd"]
    keys = [f"user:{i}" for i in range(200)]
    before = {key: preferred(four, key) for key in keys}
    assert before == {key: preferred(list(reversed(four)), key) for key in keys}  # order of candidates is irrelevant
    assert set(before.values()) == set("abcd")  # keys spread over every replica
    after = {key: preferred(four[:3], key) for key in keys}  # replica d is gone
    assert all(after[key] == before[key] for key in keys if before[key] != "d")
    no_key = asyncio.run(PrefixAffinityRouter.choose_replicas(None, four, SimpleNamespace(kwargs={})))
    assert no_key == [four]  # no preference: the least loaded of all
