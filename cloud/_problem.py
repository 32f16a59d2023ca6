"""Error answers: a stable problem code (protocol.PROBLEM_STATUS) and a message saying what to fix."""

from __future__ import annotations

from aiohttp import web

from splitinfer import protocol

__all__ = ["RETRY_AFTER_S", "Problem", "error_response", "oip_path", "problem_response"]

#: Seconds a client is told to wait before retrying a 503.
RETRY_AFTER_S = 1


class Problem(Exception):
    """An error answer. Raised anywhere in a handler; the middleware turns it into problem+json."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None):
        if code not in protocol.PROBLEM_STATUS:
            raise ValueError(f"unknown problem code {code!r}")
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return protocol.PROBLEM_STATUS[self.code]

    @classmethod
    def unavailable(cls, code: str, detail: str) -> Problem:
        """A 503 that tells the client when to come back."""
        return cls(code, detail, {"Retry-After": str(RETRY_AFTER_S)})


def problem_response(problem: Problem, extra_headers: dict[str, str] | None = None) -> web.Response:
    status, body = protocol.problem_body(problem.code, problem.detail)
    headers = {**problem.headers, **(extra_headers or {})}
    return web.Response(status=status, body=body, content_type=protocol.PROBLEM_CONTENT_TYPE, headers=headers)


def oip_path(path: str) -> bool:
    """Whether errors on ``path`` are answered in the protocol's form (health keeps /v1's)."""
    return (path == "/v2" or path.startswith("/v2/")) and not path.startswith("/v2/health/")


def error_response(problem: Problem) -> web.Response:
    """``{"error": ...}`` with the protocol's status: what /v1 calls 409 or 422 is a 400 here."""
    status = 400 if problem.status in (409, 422) else problem.status
    return web.json_response({"error": problem.detail}, status=status, headers=problem.headers)
