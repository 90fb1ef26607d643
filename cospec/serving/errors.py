"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``.

400 bad JSON, types or values and context overflow, 401 a missing or wrong API key, 404 an unknown model or path,
405 a wrong method, 413 a body over the size limit, 415 a body that is not ``application/json``, 429 a full waiting
queue (with ``Retry-After``), 500 an unexpected error (with a request id that the log repeats), 503 a server that is
shutting down.
"""

from __future__ import annotations

from pydantic import ValidationError

from cospec.serving.protocol import ErrorInfo, ErrorResponse, json_type


class ApiError(Exception):
    """A request the server refuses, rendered as OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        # Messages may echo what a client sent; lone surrogates in it would make the body unencodable.
        return ErrorResponse(error=ErrorInfo(message=_printable(self.message), type=self.type,
                                             param=None if self.param is None else _printable(self.param),
                                             code=self.code))


def from_validation_error(error: ValidationError) -> ApiError:
    """The 400 for the first problem pydantic found; ``param`` is the top-level parameter."""
    problems = error.errors(include_url=False)
    first = problems[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    if first["type"] == "extra_forbidden" and len(loc) == 1:
        message = f"unrecognized request argument: '{param}'"
    else:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        message = first["msg"]
        if first["type"].endswith("_type") and "input" in first:
            message += f", got {json_type(first['input'])}"
        if where:
            message = f"'{where}': {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return ApiError(message, param)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
