"""Serving: the OpenAI-compatible HTTP API above the engine.

``protocol`` (pydantic models of requests, responses, chunks, errors), ``errors`` (OpenAI-style errors), ``app``
(Starlette app and routes), ``engine_client`` (the engine thread of this process), ``text`` (output text, stop
strings, logprobs), ``metrics`` (prometheus-client), ``replicas`` (engines on Ray Serve replicas), ``main``
(``cospec serve``).
"""
