"""Reading a request: validation errors as one line naming the field, the body size limit, and the checks
that turn a request's fields into prompts and GenerationOptions (each failure an APIError naming its field)."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

from ..inference.sampling import GenerationOptions
from .protocol import MAX_STOP_STRINGS, SamplingRequest
from .state import APIError, ServerState


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
