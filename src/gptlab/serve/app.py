"""The HTTP side of `gptlab serve`: OpenAI's routes on FastAPI, over the Engine.

    POST /v1/completions        prompt(s) → text, streamed as server-sent events with "stream": true
    POST /v1/chat/completions   messages → the assistant's reply, for models fine-tuned with a chat template
    GET  /v1/models             the model served
    GET  /health                503 while the model loads, once shutting down, or if the decoding loop is dead
                                or wedged; else 200
    GET  /metrics               Prometheus' text format (metrics.py)
    POST /tokenize, /detokenize as llama.cpp's and vLLM's servers have them; GET /tokenizer_info as vLLM's
    GET  /                      the playground page (HEAD too)

One model is served, so the `model` a request names is not checked (as llama-server does): every answer
names the model served. Errors use OpenAI's envelope, {"error": {"message", "type", "param", "code"}},
with the status the problem calls for: 400 for a bad request (or a Host this server does not answer to),
401 without the right key, 408 for a body that takes too long, 413 for an oversized body, 429 when the
waiting line is full (with Retry-After), 503 while loading, shutting down or with the loop dead.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..finetune.templates import chat_prompt_ids
from ..tokenizer import EOT_TEXT
from .answers import Chat, Completion, Run, event_stream, unless_disconnected
from .checks import (
    chat_messages,
    check_ids,
    check_response_format,
    generation_options,
    invalid_request,
    length_limit,
    prompt_rows,
)
from .guards import BodyLimit, HostGuard
from .protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from .state import APIError, ServerState

PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


def create_app(
    state: ServerState,
    allowed_hosts: frozenset[str] | None = None,
    allowed_origins: tuple[str, ...] = (),
    body_timeout: float = 30.0,
) -> FastAPI:
    """The routes over `state`. allowed_hosts: the Host names answered to (None: any; guards.allowed_hosts);
    allowed_origins: the browser origins allowed to call the API from their pages (CORS), none by default."""
    # no docs pages (they would load assets from a CDN) and no /openapi.json (it would answer without the key)
    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None)

    def answer(error: APIError) -> Response:
        state.metrics.errors.inc(error.type)
        return error.response()

    app.add_exception_handler(APIError, lambda request, error: answer(error))
    app.add_exception_handler(RequestValidationError, lambda request, error: answer(invalid_request(error)))
    app.add_exception_handler(
        StarletteHTTPException,
        lambda request, error: answer(
            APIError(error.status_code, str(error.detail), headers=getattr(error, "headers", None))
        ),
    )
    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes, timeout=body_timeout, metrics=state.metrics)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostGuard, allowed=allowed_hosts, metrics=state.metrics)  # added last: runs first

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(
                401,
                "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):  # constant time: no timing hints
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    protected = [Depends(authorize)]

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    def health() -> JSONResponse:
        body = {"status": state.status}
        if state.engine is not None:
            body.update(
                engine=state.engine.health(),
                requests_decoding=len(state.engine.jobs),
                requests_waiting=len(state.engine.waiting),
            )
        ok = state.status == "ready" and body.get("engine") == "ok"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=protected)
    def metrics() -> PlainTextResponse:
        engine = state.engine
        text = state.metrics.render(
            running=len(engine.jobs) if engine else 0,
            waiting=len(engine.waiting) if engine else 0,
            healthy=engine is not None and engine.health() == "ok",
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=protected)
    def models() -> ModelList:
        state.ready()
        return ModelList(
            data=[
                ModelCard(
                    id=state.name,
                    created=state.created,
                    max_model_len=state.context_length,
                    parameters=state.parameters,
                )
            ]
        )

    @app.post("/tokenize", dependencies=protected)
    def tokenize(body: TokenizeRequest) -> dict:
        """The ids of a text; `<|endoftext|>` in it is that token, as Hugging Face tokenizers read it."""
        state.ready()
        if (body.content is None) == (body.prompt is None):
            raise APIError(
                400, "give the text as exactly one of content (llama.cpp's) or prompt (vLLM's)", param="content"
            )
        tokens = state.tokenizer.encode(body.content if body.content is not None else body.prompt, allow_special=True)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.context_length}

    @app.post("/detokenize", dependencies=protected)
    def detokenize(body: DetokenizeRequest) -> dict:
        state.ready()
        check_ids(state, body.tokens, "tokens")
        text = state.tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}  # llama.cpp's and vLLM's names

    @app.get("/tokenizer_info", dependencies=protected)
    def tokenizer_info() -> dict:
        """vLLM's: what lm-eval's remote tokenizer reads, so that `lm_eval --model local-completions` tokenizes with
        the served model's own tokenizer and needs no tokenizer files."""
        state.ready()
        return {
            "eos_token": EOT_TEXT,
            "bos_token": None,
            "pad_token": None,
            "model_max_length": state.context_length,
            "vocab_size": state.tokenizer.vocab_size,
            "tokenizer_class": type(state.tokenizer).__name__,
        }

    @app.post("/v1/completions", dependencies=protected)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = state.ready()
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(
                400, "best_of is not supported (every sample is returned); drop it or set it to n", param="best_of"
            )
        prompts = prompt_rows(state, body.prompt)
        max_tokens = length_limit(state, prompts, body.max_tokens, "max_tokens")
        options = generation_options(state, body, max_tokens, body.logprobs)
        run = Run(engine, prompts, options, prompt_logprobs=body.echo and body.logprobs is not None)
        completion = Completion(state, body, run, [state.tokenizer.decode(prompt) for prompt in prompts])
        if body.stream:
            return event_stream(completion.chunks())
        return await unless_disconnected(request, completion.response())

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        engine = state.ready()
        if state.chat_template is None:
            raise APIError(
                400,
                f"{state.name} has no chat template: it was not fine-tuned to follow instructions "
                "(`gptlab finetune instruct` gives a model one); use /v1/completions with a plain prompt",
                param="messages",
                code="no_chat_template",
            )
        check_response_format(body.response_format)
        try:
            prompt = chat_prompt_ids(state.tokenizer, chat_messages(body.messages), state.chat_template)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        if len(prompt) >= state.context_length:  # the reply needs one position at least
            raise APIError(
                400,
                f"the conversation takes {len(prompt)} tokens in the chat template, and the model's "
                f"context is {state.context_length}: no room is left for a reply; send fewer or shorter "
                "messages",
                param="messages",
                code="context_length_exceeded",
            )
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = length_limit(state, [prompt], requested, param)
        top = body.top_logprobs or 0
        options = generation_options(state, body, max_tokens, top if body.logprobs else None)
        chat = Chat(state, body, Run(engine, [prompt], options, prompt_logprobs=False))
        if body.stream:
            return event_stream(chat.chunks())
        return await unless_disconnected(request, chat.response())

    return app
