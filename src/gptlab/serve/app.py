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

import asyncio
import functools
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..finetune.templates import chat_prompt_ids
from ..inference.sampling import GenerationOptions, Token
from ..tokenizer import Tokenizer
from .engine import (
    Done,
    Engine,
    EngineStopped,
    Failed,
    Job,
    Piece,
    Prefilled,
    QueueFull,
)
from .protocol import (
    MAX_STOP_STRINGS,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)

PLAYGROUND = Path(__file__).parent / "static" / "playground.html"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    """What the routes share. `engine` is None until the model has loaded."""

    name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
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
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry in a moment (GET /health says when it is ready)",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.engine


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


def invalid_request(error: RequestValidationError) -> APIError:
    """A validation error's first problem as one line naming the field."""
    problem = error.errors()[0]
    location = [str(part) for part in problem.get("loc", ()) if part != "body"]
    if problem.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({problem.get('ctx', {}).get('error', problem['msg'])})")
    if problem.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {'.'.join(location)!r}: gptlab does not support it; drop it",
                        param=".".join(location))
    if not location:
        return APIError(400, f"the request body must be a JSON object ({problem['msg']})")
    field = ".".join(location)
    return APIError(400, f"{field}: {problem['msg']}", param=field)


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, whether or not they declare their length. The body is
    read here, up to the limit, and handed on whole (a body is at most max_bytes, 1 MiB by default)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        body, more = b"", True
        while more and len(body) <= self.max_bytes and not (declared.isdigit() and int(declared) > self.max_bytes):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if more or len(body) > self.max_bytes:
            return await APIError(413, f"the request body is larger than {self.max_bytes:,} bytes")\
                .response()(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: wait for the client to go away
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def check_model(state: ServerState, requested: str | None) -> None:
    if requested is not None and requested != state.name:
        raise APIError(400, f"model {requested!r} is not served here; this server serves {state.name!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")


def check_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.tokenizer.vocab_size
    bad = next((token for token in ids if not 0 <= token < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param=param)


def prompt_rows(state: ServerState, prompt) -> list[list[int]]:
    """A prompt in any of OpenAI's four forms → a list of token id lists. An empty string starts from
    end-of-text, as `gptlab generate` does."""
    if isinstance(prompt, str) or prompt and all(isinstance(item, int) for item in prompt):
        prompts = [prompt]
    else:
        prompts = prompt
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    rows = []
    for item in prompts:
        ids = (state.tokenizer.encode(item) or [state.tokenizer.eot_id]) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "a prompt of token ids must hold at least one id", param="prompt")
        check_ids(state, ids, "prompt")
        if len(ids) > state.context_length:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the model's context of "
                           f"{state.context_length}; shorten it", param="prompt", code="context_length_exceeded")
        rows.append(ids)
    return rows


def length_limit(state: ServerState, prompts: list[list[int]], requested: int | None, param: str) -> int:
    """The tokens to generate: as requested (None: up to the end of the context), if prompt and answer fit."""
    room = state.context_length - max(len(prompt) for prompt in prompts)
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"the model's context is {state.context_length} tokens and the prompt takes "
                       f"{state.context_length - room}, so {param} can be at most {room}, not {requested}",
                       param=param, code="context_length_exceeded")
    return requested


def generation_options(state: ServerState, body: SamplingRequest, max_tokens: int, logprobs: int | None) -> GenerationOptions:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    try:
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (as strings, e.g. {\"50256\": -100})",
                       param="logit_bias") from None
    check_ids(state, list(bias), "logit_bias")
    try:
        return GenerationOptions(
            max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
            stop=tuple(stops), num_samples=body.n, logprobs=logprobs, frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty, logit_bias=bias or None)
    except ValueError as error:  # its message begins with the option's name, hyphenated
        name = str(error).split(" ", 1)[0].replace("-", "_")
        raise APIError(400, str(error).replace(name.replace("_", "-"), name, 1), param=name) from None


class Run:
    """One HTTP request's jobs (one per prompt) in the engine, their events merged in arrival order.
    Prompt p's rows draw with seed + p·n + r, as row p·n + r of a `gptlab generate` batch does."""

    def __init__(self, engine: Engine, prompts: list[list[int]], options: GenerationOptions, prompt_logprobs: bool):
        self.engine, self.prompts, self.options = engine, prompts, options
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.jobs = []
        try:
            for index, prompt in enumerate(prompts):
                seed = None if options.seed is None else options.seed + index * options.num_samples
                deliver = functools.partial(self.deliver, loop, index)
                self.jobs.append(engine.submit(Job(prompt, options.replace(seed=seed), deliver, prompt_logprobs)))
        except QueueFull as error:
            self.cancel()
            raise APIError(429, f"the server is busy ({error}); retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped:
            self.cancel()
            raise APIError(503, "the server is shutting down") from None
        except ValueError as error:
            self.cancel()
            raise APIError(400, str(error), param="n") from None

    def deliver(self, loop: asyncio.AbstractEventLoop, prompt: int, event) -> None:
        """Called from the engine's thread."""
        if not loop.is_closed():
            loop.call_soon_threadsafe(self.queue.put_nowait, (prompt, event))

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, event) until every job is done; the jobs are cancelled if the caller stops early."""
        remaining = len(self.jobs)
        try:
            while remaining:
                prompt, event = await self.queue.get()
                if isinstance(event, Failed):
                    raise APIError(500, event.message)
                remaining -= isinstance(event, Done)
                yield prompt, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            self.engine.cancel(job)

    def choice(self, prompt: int, row: int) -> int:
        return prompt * self.options.num_samples + row

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.options.num_samples

    def usage(self, completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class Completion:
    """A /v1/completions answer, whole or as chunks."""

    def __init__(self, state: ServerState, body: CompletionRequest, run: Run, prompt_texts: list[str]):
        self.state, self.body, self.run, self.prompt_texts = state, body, run, prompt_texts
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.offsets = [0] * run.choices  # each choice's text length so far, for logprobs' text_offset

    def logprobs(self, choice: int, tokens: tuple[Token, ...]) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        tokenizer, result = self.state.tokenizer, CompletionLogprobs()
        for token in tokens:
            text = tokenizer.decode([token.id])
            result.tokens.append(text)
            result.token_logprobs.append(token.logprob)
            result.top_logprobs.append({tokenizer.decode([id_]): value for id_, value in token.top_logprobs}
                                       if token.logprob is not None else None)
            result.text_offset.append(self.offsets[choice])
            self.offsets[choice] += len(text)
        return result

    async def pieces(self) -> AsyncIterator[tuple[CompletionChoice | None, Usage | None]]:
        """Each choice's new text (with the prompt first when echoing), then the usage."""
        completion_tokens = 0
        async for prompt, event in self.run.events():
            if isinstance(event, Prefilled) and self.body.echo:
                for row in range(self.run.options.num_samples):
                    choice = self.run.choice(prompt, row)
                    yield CompletionChoice(index=choice, text=self.prompt_texts[prompt],
                                           logprobs=self.logprobs(choice, event.prompt_logprobs or ())), None
            elif isinstance(event, Piece):
                choice = self.run.choice(prompt, event.row)
                yield CompletionChoice(index=choice, text=event.text, logprobs=self.logprobs(choice, event.tokens),
                                       finish_reason=event.finish_reason), None
            elif isinstance(event, Done):
                completion_tokens += event.completion_tokens
        yield None, self.run.usage(completion_tokens)

    async def chunks(self) -> AsyncIterator[str]:
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        async for choice, usage in self.pieces():
            if choice is not None and (choice.text or choice.finish_reason or choice.logprobs):
                yield self.wrap([choice]).model_dump_json()
            elif usage is not None and include_usage:
                yield self.wrap([], usage).model_dump_json()

    async def response(self) -> CompletionResponse:
        choices = [CompletionChoice(index=index, text="", logprobs=self.logprobs(index, ()))
                   for index in range(self.run.choices)]
        usage = None
        async for piece, usage in self.pieces():
            if piece is not None:
                choice = choices[piece.index]
                choice.text += piece.text
                choice.finish_reason = piece.finish_reason or choice.finish_reason
                if piece.logprobs is not None:
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(choice.logprobs, name).extend(getattr(piece.logprobs, name))
        return self.wrap(choices, usage)

    def wrap(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.state.name, choices=choices, usage=usage)


class Chat:
    """A /v1/chat/completions answer, whole or as chunks."""

    def __init__(self, state: ServerState, body: ChatRequest, run: Run):
        self.state, self.body, self.run = state, body, run
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def logprobs(self, tokens: tuple[Token, ...]) -> ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        tokenizer = self.state.tokenizer

        def entry(token: int, logprob: float) -> dict:
            return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.decode_bytes([token]))}

        return ChatLogprobs(content=[TokenLogprob(**entry(token.id, token.logprob),
                                                  top_logprobs=[TopLogprob(**entry(id_, value)) for id_, value in token.top_logprobs])
                                     for token in tokens])

    async def chunks(self) -> AsyncIterator[str]:
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        completion_tokens = 0
        async for prompt, event in self.run.events():
            if isinstance(event, Prefilled):  # OpenAI's first chunk of each choice names the role
                yield self.chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
                                  for index in range(self.run.choices)])
            elif isinstance(event, Piece) and (event.text or event.finish_reason or (event.tokens and self.body.logprobs)):
                yield self.chunk([ChatChunkChoice(index=self.run.choice(prompt, event.row), delta=ChatDelta(content=event.text),
                                                  logprobs=self.logprobs(event.tokens), finish_reason=event.finish_reason)])
            elif isinstance(event, Done):
                completion_tokens += event.completion_tokens
        if include_usage:
            yield self.chunk([], self.run.usage(completion_tokens))

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatChunk(id=self.id, created=self.created, model=self.state.name, choices=choices,
                         usage=usage).model_dump_json(exclude_none=True)

    async def response(self) -> ChatResponse:
        texts, tokens = [""] * self.run.choices, [[] for _ in range(self.run.choices)]
        finish: list[str | None] = [None] * self.run.choices
        completion_tokens = 0
        async for prompt, event in self.run.events():
            if isinstance(event, Piece):
                choice = self.run.choice(prompt, event.row)
                texts[choice] += event.text
                tokens[choice] += event.tokens
                finish[choice] = event.finish_reason or finish[choice]
            elif isinstance(event, Done):
                completion_tokens += event.completion_tokens
        choices = [ChatChoice(index=index, message=ChatMessageOut(content=texts[index]),
                              logprobs=self.logprobs(tuple(tokens[index])), finish_reason=finish[index])
                   for index in range(self.run.choices)]
        return ChatResponse(id=self.id, created=self.created, model=self.state.name, choices=choices,
                            usage=self.run.usage(completion_tokens))


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, `data: [DONE]` last; an error mid-stream is sent as
    one more event in OpenAI's envelope."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk}\n\n"
        except APIError as error:
            yield f"data: {json.dumps(json.loads(error.response().body))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def unless_disconnected(request: Request, answer: Awaitable) -> Response:
    """Await the answer, but give up (and free its rows) if the client goes away first."""
    task = asyncio.ensure_future(answer)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not task.done():
        task.cancel()  # Run.events' finally cancels the jobs
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return JSONResponse(task.result().model_dump(mode="json"))
