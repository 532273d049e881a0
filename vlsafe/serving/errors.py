"""`ServingError`: every refusal the server gives, as an HTTP status plus OpenAI's error body.

OpenAI clients read `{"error": {"message", "type", "code"}}` and raise by status (400 -> BadRequestError,
429 -> RateLimitError, ...), so every 4xx/5xx this server sends has that shape and a message that names the
field or limit at fault.
"""
from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """A request the server answers with `status` and OpenAI's error body instead of a completion."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ServingError:
    return ServingError(400, message, code, param=param)


def too_large(message: str, code: str, param: str | None = None) -> ServingError:
    return ServingError(413, message, code, param=param)
