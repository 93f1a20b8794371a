"""The HTTP side of `gptlab serve`: OpenAI's routes on FastAPI, over the Engine.

    POST /v1/completions        prompt(s) → text, streamed as server-sent events with "stream": true
    POST /v1/chat/completions   messages → the assistant's reply, for models fine-tuned with a chat template
    GET  /v1/models             the model served
    GET  /health                503 while the model loads (and once shutting down), then 200
    POST /tokenize, /detokenize as llama.cpp's server has them
    GET  /                      the playground page

Errors use OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, with the status the
problem calls for: 400 for a bad request, 401 without the right key, 413 for an oversized body, 429
when the waiting line is full (with Retry-After), 503 while loading or shutting down.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..finetune.templates import chat_prompt_ids
from .answers import Chat, Completion, Run, event_stream, unless_disconnected
from .checks import (
    BodyLimit,
    check_ids,
    check_model,
    generation_options,
    invalid_request,
    length_limit,
    prompt_rows,
)
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


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None)  # the docs pages would load assets from a CDN
    app.add_exception_handler(APIError, lambda request, error: error.response())
    app.add_exception_handler(RequestValidationError, lambda request, error: invalid_request(error).response())
    app.add_exception_handler(StarletteHTTPException, lambda request, error: APIError(
        error.status_code, str(error.detail), headers=getattr(error, "headers", None)).response())
    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):  # constant time: no timing hints
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    protected = [Depends(authorize)]

    @app.get("/", include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    def health() -> JSONResponse:
        body = {"status": state.status}
        if state.engine is not None:
            body.update(requests_decoding=len(state.engine.jobs), requests_waiting=len(state.engine.waiting))
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/models", dependencies=protected)
    def models() -> ModelList:
        state.ready()
        return ModelList(data=[ModelCard(id=state.name, created=state.created, max_model_len=state.context_length,
                                         parameters=state.parameters)])

    @app.post("/tokenize", dependencies=protected)
    def tokenize(body: TokenizeRequest) -> dict:
        state.ready()
        return {"tokens": state.tokenizer.encode(body.content)}

    @app.post("/detokenize", dependencies=protected)
    def detokenize(body: DetokenizeRequest) -> dict:
        state.ready()
        check_ids(state, body.tokens, "tokens")
        return {"content": state.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", dependencies=protected)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = state.ready()
        check_model(state, body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported (every sample is returned); drop it or set it to n",
                           param="best_of")
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
        check_model(state, body.model)
        if state.chat_template is None:
            raise APIError(400, f"{state.name} has no chat template: it was not fine-tuned to follow instructions "
                           "(`gptlab finetune instruct` gives a model one); use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        messages = [message.model_dump(include={"role", "content"}) for message in body.messages]
        try:
            prompt = chat_prompt_ids(state.tokenizer, messages, state.chat_template)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
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
