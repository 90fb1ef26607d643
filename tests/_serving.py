"""Shared by the server tests: the tiny served model, and the app on uvicorn in a thread of the test process (for
tests that reach inside the server: fault injection, a blocked tokenizer)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from _tiny_models import save_tiny_llama_dir

SENTENCES = [
    "the cat sat on the mat and the dog sat on the rug",
    "a dog ran in the park with a ball",
    "the sun is warm and the sky is blue today",
    "we write code and tests every day",
    "system user assistant : hello how are you",
]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant :{% endif %}")
CONTEXT = 4096


def served_model_dir(path):
    """A float32 tiny random Llama and a word-level tokenizer (trained in memory) with a chat template and eos.
    Peaked next-token distributions (logits x 8): float32 rounding across batch shapes never flips the argmax."""
    return save_tiny_llama_dir(path, SENTENCES, context=CONTEXT, chat_template=CHAT_TEMPLATE, logit_scale=8.0)


class InProcessServer:
    """``build_app`` over an engine of this process, served by uvicorn on a free loopback port in a thread."""

    def __init__(self, engine, options) -> None:
        import uvicorn

        from cospec.serving.app import build_app
        from cospec.serving.engine_client import LocalEngineClient

        self.app = build_app(LocalEngineClient(engine), options)
        self.server = self.app.server  # the cospec Server (handlers, metrics)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._uvicorn.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)


@contextlib.contextmanager
def served_in_process(model_dir, options):
    """``InProcessServer`` over a fresh engine on the tiny model at ``model_dir`` (8 sequences, 512-token context)."""
    from cospec.engine.config import EngineConfig
    from cospec.engine.llm_engine import LLMEngine

    engine = LLMEngine(str(model_dir), EngineConfig(max_num_seqs=8, max_model_len=512))
    with InProcessServer(engine, options) as server:
        yield server


@contextlib.contextmanager
def offline_llm(model_dir):
    """The offline reference the servers' answers are checked against (one thread, one sequence at a time)."""
    import torch

    import cospec

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield cospec.LLM(str(model_dir), max_num_seqs=1)
    finally:
        torch.set_num_threads(previous)
