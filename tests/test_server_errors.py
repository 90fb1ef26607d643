"""The server's error paths, one regression test per defect an outside probe found: every input problem is a 400
naming the parameter (seed bounds, lone surrogates in any string, a non-string model, a bad max_tokens beside
max_completion_tokens), a body that is not JSON gets 415, a non-ASCII API key matches, an unexpected error is a
complete 500 with an error id after which the keep-alive connection still serves, and tokenizing does not block the
event loop. The app runs on uvicorn in a thread of this process, so that a test can reach inside it.
"""

from http.client import HTTPConnection
import json
import logging
import threading

import httpx
import pytest

from _serving import served_in_process, served_model_dir

API_KEY = "clé-секрет-鍵"  # non-ASCII: clients send its UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + API_KEY.encode("utf-8")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return served_model_dir(tmp_path_factory.mktemp("tiny-llama-errors"))


@pytest.fixture(scope="module")
def served(model_dir):
    from cospec.serving.app import ServeOptions

    with served_in_process(model_dir, ServeOptions("tiny", api_key=API_KEY, max_tokens_limit=64)) as server:
        yield server


@pytest.fixture()
def http(served):
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as client:
        yield client


def _post(http, path: str, body: dict) -> httpx.Response:
    """``body`` as JSON with \\u escapes (so that lone surrogates can be sent)."""
    return http.post(path, content=json.dumps(body).encode("ascii"), headers={"Content-Type": "application/json"})


def _assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


COMPLETION = {"model": "tiny", "prompt": "the cat", "max_tokens": 3}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


@pytest.mark.parametrize("seed, status", [(-1, 400), (2**63, 400), (2**64 - 1, 400), (2**64, 400), (0, 200),
                                          (2**63 - 1, 200)])
def test_seed_bounds(http, seed, status):
    response = _post(http, "/v1/completions", COMPLETION | {"seed": seed, "temperature": 1.0})
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        _assert_error(response, 400, "seed")


SURROGATE = "a\ud800b"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", COMPLETION | {"prompt": SURROGATE}, "prompt"),
    ("/v1/completions", COMPLETION | {"prompt": [SURROGATE]}, "prompt"),
    ("/v1/completions", COMPLETION | {"model": SURROGATE}, "model"),
    ("/v1/completions", COMPLETION | {"stop": [SURROGATE]}, "stop"),
    ("/v1/completions", COMPLETION | {"user": SURROGATE}, "user"),
    ("/v1/completions", COMPLETION | {"suffix": SURROGATE}, "suffix"),
    ("/v1/completions", COMPLETION | {"logit_bias": {SURROGATE: 1}}, "logit_bias"),
    ("/v1/completions", COMPLETION | {"metadata": {"k": [SURROGATE]}}, "metadata"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": SURROGATE, "content": "x"}]}, "messages"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": [{"type": "text",
                                                                                  "text": SURROGATE}]}]}, "messages"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "x", "name": SURROGATE}]}, "messages"),
    ("/v1/chat/completions", CHAT | {"stop": SURROGATE}, "stop"),
    ("/v1/chat/completions", CHAT | {"tool_choice": SURROGATE}, "tool_choice"),
])
def test_lone_surrogates_in_any_string_get_400(http, path, body, param):
    _assert_error(_post(http, path, body), 400, param)


def test_an_error_echoing_a_surrogate_still_encodes(http):
    # An unknown parameter whose name is a lone surrogate: the message names it, escaped.
    error = _assert_error(_post(http, "/v1/completions", COMPLETION | {SURROGATE: 1}), 400, "a\\ud800b")
    assert "a\\ud800b" in error["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_bodies_not_sent_as_json_get_415(http, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = http.post("/v1/completions", content=json.dumps(COMPLETION).encode(), headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_accepted(http):
    response = http.post("/v1/completions", content=json.dumps(COMPLETION).encode(),
                         headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("model", [5, ["tiny"], {"id": "tiny"}, True])
def test_a_non_string_model_gets_400(http, model):
    _assert_error(_post(http, "/v1/completions", COMPLETION | {"model": model}), 400, "model")


def test_a_bad_max_tokens_is_refused_beside_max_completion_tokens(http):
    body = CHAT | {"max_tokens": "garbage", "max_completion_tokens": 3}
    _assert_error(_post(http, "/v1/chat/completions", body), 400, "max_tokens")
    assert _post(http, "/v1/chat/completions", CHAT | {"max_tokens": 50, "max_completion_tokens": 3}).json()[
        "usage"]["completion_tokens"] <= 3


def test_a_non_ascii_api_key_matches(served):
    assert httpx.get(served.url + "/v1/models", headers=AUTH).status_code == 200
    for header in [b"Bearer " + API_KEY.encode("latin-1", "replace"), b"Bearer " + API_KEY[:-1].encode("utf-8"),
                   b""]:
        response = httpx.get(served.url + "/v1/models", headers={"Authorization": header} if header else {})
        assert response.status_code == 401


def test_after_a_forced_500_the_connection_still_serves(served, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(served.server, "_job", broken)
    connection = HTTPConnection("127.0.0.1", served.port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": AUTH["Authorization"]}
    with caplog.at_level(logging.ERROR, logger="cospec.serving"):
        connection.request("POST", "/v1/completions", body=json.dumps(COMPLETION), headers=headers)
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
    assert response.status == 500 and error["type"] == "server_error"
    error_id = error["message"].split("error id ")[1].split(";")[0]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)
    sock = connection.sock
    assert sock is not None, "the server closed the connection after its 500"
    monkeypatch.undo()
    connection.request("POST", "/v1/completions", body=json.dumps(COMPLETION), headers=headers)
    second = connection.getresponse()
    assert second.status == 200 and json.loads(second.read())["usage"]["completion_tokens"] >= 1
    assert connection.sock is sock  # the same keep-alive connection
    connection.close()


def test_tokenizing_does_not_block_the_event_loop(served, monkeypatch):
    """A tokenizer call that takes long (a huge prompt) must not stall other requests: block it, and /health and
    /metrics still answer."""
    entered, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        def __init__(self, tokenizer) -> None:
            self.tokenizer = tokenizer

        def __call__(self, text):
            entered.set()
            release.wait(30)
            return self.tokenizer(text)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    monkeypatch.setattr(served.server, "tokenizer", SlowTokenizer(served.server.tokenizer))
    result = {}
    thread = threading.Thread(target=lambda: result.update(response=httpx.post(
        served.url + "/v1/completions", json=COMPLETION, headers=AUTH, timeout=60)))
    thread.start()
    try:
        assert entered.wait(30)
        assert httpx.get(served.url + "/health", timeout=5).status_code == 200
        assert httpx.get(served.url + "/metrics", headers=AUTH, timeout=5).status_code == 200
    finally:
        release.set()
        thread.join(60)
    assert result["response"].status_code == 200


def test_replicas_without_ray_serve_say_what_to_install(monkeypatch, capsys):
    import sys

    from cospec.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "cospec.serving.replicas", raising=False)
    assert main(["serve", "--replicas", "2", "--model", "unused"]) == 2
    assert "pip install 'cospec[serve]'" in capsys.readouterr().err


def test_tiny_temperatures_decode_greedily(http):
    """A temperature that underflows float32 must not turn the distribution into NaN (token 0 every step)."""
    body = COMPLETION | {"max_tokens": 6, "ignore_eos": True}
    greedy = _post(http, "/v1/completions", body | {"temperature": 0}).json()["choices"][0]["text"]
    assert greedy
    for temperature in (1e-45, 1e-39, 1e-30):
        response = _post(http, "/v1/completions", body | {"temperature": temperature})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == greedy, temperature
