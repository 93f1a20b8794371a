"""Reading a request: validation errors as one line naming the field, the body size limit, and the checks
that turn a request's fields into prompts and GenerationOptions (each failure an APIError naming its field)."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

from ..inference.sampling import GenerationOptions, offset_seed
from .protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, ChatMessage, SamplingRequest
from .state import APIError, ServerState

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def invalid_request(error: RequestValidationError) -> APIError:
    """A validation error's first problem as one line naming the field."""
    problem = error.errors()[0]
    location = [str(part) for part in problem.get("loc", ()) if part != "body"]
    if problem.get("type") == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON ({problem.get('ctx', {}).get('error', problem['msg'])})"
        )
    if problem.get("type") == "extra_forbidden":
        return APIError(
            400, f"unknown field {'.'.join(location)!r}: gptlab does not support it; drop it", param=".".join(location)
        )
    if not location:
        return APIError(400, f"the request body must be a JSON object ({problem['msg']})")
    field = ".".join(location)
    return APIError(400, f"{field}: {problem['msg']}", param=field)


def check_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.tokenizer.vocab_size
    bad = next((token for token in ids if not 0 <= token < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param=param)


def prompt_rows(state: ServerState, prompt) -> list[list[int]]:
    """A prompt in any of OpenAI's four forms → a list of token id lists. An empty string starts from
    end-of-text, as `gptlab generate` does. Each prompt waits in the engine's queue as a job of its own, so
    a request may carry at most state.max_prompts of them."""
    if isinstance(prompt, str) or prompt and all(isinstance(item, int) for item in prompt):
        prompts = [prompt]
    else:
        prompts = prompt
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if len(prompts) > state.max_prompts:
        raise APIError(
            400,
            f"this server takes at most {state.max_prompts} prompts per request (its --max-queue), "
            f"got {len(prompts)}; send the others in further requests",
            param="prompt",
        )
    rows = []
    for item in prompts:
        ids = (state.tokenizer.encode(item) or [state.tokenizer.eot_id]) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "a prompt of token ids must hold at least one id", param="prompt")
        check_ids(state, ids, "prompt")
        if len(ids) > state.context_length:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, more than the model's context of "
                f"{state.context_length}; shorten it",
                param="prompt",
                code="context_length_exceeded",
            )
        rows.append(ids)
    return rows


def length_limit(state: ServerState, prompts: list[list[int]], requested: int | None, param: str) -> int:
    """The tokens to generate: as requested (None: up to the end of the context), if prompt and answer fit."""
    room = state.context_length - max(len(prompt) for prompt in prompts)
    if requested is None:
        return room
    if requested > room:
        raise APIError(
            400,
            f"the model's context is {state.context_length} tokens and the prompt takes "
            f"{state.context_length - room}, so {param} can be at most {room}, not {requested}",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def generation_options(
    state: ServerState, body: SamplingRequest, max_tokens: int, logprobs: int | None
) -> GenerationOptions:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        longest = max(len(stop) for stop in stops)
        raise APIError(
            400, f"a stop string may have at most {MAX_STOP_CHARS:,} characters, got {longest:,}", param="stop"
        )
    if body.n > state.max_batch:
        raise APIError(
            400, f"n must be at most {state.max_batch} (the server's --max-batch rows), got {body.n}", param="n"
        )
    try:
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
    except ValueError:
        raise APIError(
            400, 'logit_bias keys must be token ids (as strings, e.g. {"50256": -100})', param="logit_bias"
        ) from None
    check_ids(state, list(bias), "logit_bias")
    try:
        return GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=offset_seed(body.seed, 0),
            stop=tuple(stops),
            num_samples=body.n,
            logprobs=logprobs,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=bias or None,
        )
    except ValueError as error:  # its message begins with the option's name, hyphenated
        name = str(error).split(" ", 1)[0].replace("-", "_")
        raise APIError(400, str(error).replace(name.replace("_", "-"), name, 1), param=name) from None


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI's messages as {"role", "content"} in gptlab's roles: text parts joined, developer read as system.
    A part that is not text, and a tool or function turn (GPT-2's templates have none), is a 400 naming it."""
    result = []
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES or message.tool_calls:
            what = f"has role {message.role!r}" if message.role not in CHAT_ROLES else "calls tools"
            raise APIError(
                400,
                f"messages[{index}] {what}: gptlab's chat templates have no tool or function turns; "
                "send system (or developer), user and assistant messages",
                param=f"messages[{index}].role",
            )
        content = message.content
        if content is None:
            raise APIError(400, f"messages[{index}] has no content", param=f"messages[{index}].content")
        if not isinstance(content, str):
            texts = []
            for part_index, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400,
                        f"messages[{index}].content[{part_index}] is a {part.get('type')!r} part: "
                        'gptlab reads text parts only ({"type": "text", "text": ...})',
                        param=f"messages[{index}].content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        result.append({"role": CHAT_ROLES[message.role], "content": content})
    return result


def check_response_format(response_format: dict | None) -> None:
    kind = (response_format or {}).get("type", "text")
    if kind != "text":
        raise APIError(
            400,
            f"response_format {kind!r} is not supported: gptlab cannot constrain a reply to JSON; "
            'drop response_format or send {"type": "text"}',
            param="response_format",
        )
