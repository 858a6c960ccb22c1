"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status that goes with them."""

from __future__ import annotations

from typing import Any

from rtpllm.protocol.messages import ErrorCode, ErrorInfo

# Status recorded in metrics for a request whose client went away first (nginx's code).
CLIENT_CLOSED = 499


class APIError(Exception):
    """An error the API returns to the client as-is (never a crash)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found"
    )


def not_found(path: str) -> APIError:
    return APIError(404, f"Unknown path {path}", "invalid_request_error", None, "not_found")


def payload_too_large(limit: int, size: int | None = None) -> APIError:
    if size is not None:
        message = f"The request body has {size} bytes; this server accepts at most {limit} bytes."
    else:
        message = f"The request body is larger than the {limit} bytes this server accepts."
    return APIError(
        413,
        message,
        "invalid_request_error",
        None,
        "request_too_large",
    )


def overloaded(
    retry_after_s: int, message: str = "The server is overloaded: too many requests are queued. Retry later."
) -> APIError:
    return APIError(
        429, message, "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": str(retry_after_s)}
    )


def unavailable(message: str, code: str = "no_workers", retry_after_s: int = 1) -> APIError:
    # Retry-After: a worker may be starting, or coming back after a stall.
    return APIError(503, message, "server_error", None, code, {"Retry-After": str(retry_after_s)})


def deadline_exceeded(message: str = "The request did not finish before its deadline.") -> APIError:
    return APIError(504, message, "timeout_error", None, ErrorCode.DEADLINE_EXCEEDED)


def internal(message: str) -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def from_error_info(error: ErrorInfo) -> APIError:
    """The API error for an error an engine instance reported."""
    if error.code == ErrorCode.INVALID_REQUEST:
        return bad_request(error.message)
    if error.code == ErrorCode.DEADLINE_EXCEEDED:
        return deadline_exceeded(error.message)
    if error.code in (
        ErrorCode.WORKER_LOST,
        ErrorCode.WORKER_SHUTDOWN,
        ErrorCode.LOST_DELTAS,
        ErrorCode.DRAINING,
    ):
        return unavailable(error.message, error.code)
    return APIError(500, error.message, "server_error", None, error.code)
