"""What the server's routes share: the error they answer with, and the server's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from ..tokenizer import Tokenizer
from .engine import Engine
from .metrics import EngineMetrics

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    """What the routes share. `engine` is None until the model has loaded."""

    name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_batch: int = 16  # rows decoded together: the most samples (n) one request may ask for
    max_prompts: int = 64  # prompts one request may carry (each waits in the queue as a job)
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    engine: Engine | None = None
    tokenizer: Tokenizer | None = None
    chat_template: str | None = None
    context_length: int = 0
    parameters: int = 0
    status: str = "loading"  # then "ready", or "failed", and "stopping" once told to stop
    created: int = 0

    def ready(self) -> Engine:
        if self.status == "stopping":
            raise APIError(503, "the server is shutting down")
        if self.engine is not None and self.engine.health() != "ok":
            raise APIError(503, f"the decoding loop is {self.engine.health()}; the server cannot answer (see its log)")
        if self.engine is None:
            raise APIError(
                503,
                "the model is still loading; retry in a moment (GET /health says when it is ready)",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return self.engine
