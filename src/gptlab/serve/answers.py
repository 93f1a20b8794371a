"""Answering a generation request: its jobs in the engine (Run), and the completion or chat answer built from
their events, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..inference.sampling import GenerationOptions, Token, offset_seed
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
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .state import RETRY_AFTER_S, APIError, ServerState


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
                seed = offset_seed(options.seed, index * options.num_samples)
                deliver = functools.partial(self.deliver, loop, index)
                self.jobs.append(engine.submit(Job(prompt, options.replace(seed=seed), deliver, prompt_logprobs)))
        except QueueFull as error:
            self.cancel()
            raise APIError(
                429, f"the server is busy ({error}); retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)}
            ) from None
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
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class Completion:
    """A /v1/completions answer, whole or as chunks."""

    def __init__(self, state: ServerState, body: CompletionRequest, run: Run, prompt_texts: list[str]):
        self.state, self.body, self.run, self.prompt_texts = state, body, run, prompt_texts
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.offsets = [0] * run.choices  # each choice's text length so far, for logprobs' text_offset

    def logprobs(self, choice: int, tokens: tuple[Token, ...]) -> CompletionLogprobs | None:
        """The legacy format's entries for these tokens. A generated end-of-text token has one too (as OpenAI's
        and vLLM's servers give it: evaluation harnesses drop the last entry of an echoed prompt), though it
        adds nothing to the text."""
        if self.body.logprobs is None:
            return None
        tokenizer, result = self.state.tokenizer, CompletionLogprobs()
        for token in tokens:
            text = tokenizer.decode([token.id])
            result.tokens.append(text)
            result.token_logprobs.append(token.logprob)
            result.top_logprobs.append(
                {tokenizer.decode([id_]): value for id_, value in token.top_logprobs}
                if token.logprob is not None
                else None
            )
            result.text_offset.append(self.offsets[choice])
            if token.id != tokenizer.eot_id:
                self.offsets[choice] += len(text)
        return result

    async def pieces(self) -> AsyncIterator[tuple[CompletionChoice | None, Usage | None]]:
        """Each choice's new text (with the prompt first when echoing), then the usage."""
        completion_tokens = 0
        async for prompt, event in self.run.events():
            if isinstance(event, Prefilled) and self.body.echo:
                for row in range(self.run.options.num_samples):
                    choice = self.run.choice(prompt, row)
                    yield (
                        CompletionChoice(
                            index=choice,
                            text=self.prompt_texts[prompt],
                            logprobs=self.logprobs(choice, event.prompt_logprobs or ()),
                        ),
                        None,
                    )
            elif isinstance(event, Piece):
                choice = self.run.choice(prompt, event.row)
                yield (
                    CompletionChoice(
                        index=choice,
                        text=event.text,
                        logprobs=self.logprobs(choice, event.tokens),
                        finish_reason=event.finish_reason,
                    ),
                    None,
                )
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
        choices = [
            CompletionChoice(index=index, text="", logprobs=self.logprobs(index, ()))
            for index in range(self.run.choices)
        ]
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
        """The chat format's entries; the end-of-text token that ends a reply has none (as in OpenAI's)."""
        if not self.body.logprobs:
            return None
        tokenizer = self.state.tokenizer
        tokens = tuple(token for token in tokens if token.id != tokenizer.eot_id)

        def entry(token: int, logprob: float) -> dict:
            return {
                "token": tokenizer.decode([token]),
                "logprob": logprob,
                "bytes": list(tokenizer.decode_bytes([token])),
            }

        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **entry(token.id, token.logprob),
                    top_logprobs=[TopLogprob(**entry(id_, value)) for id_, value in token.top_logprobs],
                )
                for token in tokens
            ]
        )

    async def chunks(self) -> AsyncIterator[str]:
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        completion_tokens = 0
        async for prompt, event in self.run.events():
            if isinstance(event, Prefilled):  # OpenAI's first chunk of each choice names the role
                yield self.chunk(
                    [
                        ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
                        for index in range(self.run.choices)
                    ]
                )
            elif isinstance(event, Piece) and (
                event.text or event.finish_reason or (self.body.logprobs and self.replies_with(event.tokens))
            ):
                yield self.chunk(
                    [
                        ChatChunkChoice(
                            index=self.run.choice(prompt, event.row),
                            delta=ChatDelta(content=event.text),
                            logprobs=self.logprobs(event.tokens),
                            finish_reason=event.finish_reason,
                        )
                    ]
                )
            elif isinstance(event, Done):
                completion_tokens += event.completion_tokens
        if include_usage:
            yield self.chunk([], self.run.usage(completion_tokens))

    def replies_with(self, tokens: tuple[Token, ...]) -> bool:
        return any(token.id != self.state.tokenizer.eot_id for token in tokens)

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatChunk(
            id=self.id, created=self.created, model=self.state.name, choices=choices, usage=usage
        ).model_dump_json(exclude_none=True)

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
        choices = [
            ChatChoice(
                index=index,
                message=ChatMessageOut(content=texts[index]),
                logprobs=self.logprobs(tuple(tokens[index])),
                finish_reason=finish[index],
            )
            for index in range(self.run.choices)
        ]
        return ChatResponse(
            id=self.id,
            created=self.created,
            model=self.state.name,
            choices=choices,
            usage=self.run.usage(completion_tokens),
        )


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

    return StreamingResponse(
        lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


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
