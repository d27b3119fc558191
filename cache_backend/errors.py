"""Anthropic-shaped API errors, so every failure reaches the client as `{"type":"error",...}` JSON."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error with an HTTP status and an Anthropic error type; `message` says what and where."""

    status: int = 500
    error_type: str = "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.error_type, self.message)


class InvalidRequest(APIError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status = 401
    error_type = "authentication_error"


class NotFound(APIError):
    status = 404
    error_type = "not_found_error"


class RequestTooLarge(APIError):
    status = 413
    error_type = "request_too_large"


class ClientClosed(Exception):
    """The client went away before its request body arrived: nobody to answer."""


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The JSON body Anthropic's API uses for errors (HTTP bodies and SSE `error` events alike)."""
    return {"type": "error", "error": {"type": error_type, "message": message}}
