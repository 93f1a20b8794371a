"""The OpenAI API's request and response bodies, as pydantic models.

Requests follow OpenAI's completions and chat completions, plus the extras vLLM users expect (top_k,
min_p, repetition_penalty). A field OpenAI defines that gptlab does not do (`suffix`, `best_of` other
than n, `tools`, ...) is refused by name rather than ignored: unknown fields are an error (400). Fields
that only ask OpenAI to keep or label a request (`user`, `store`, `metadata`) are accepted and have no
effect, as on a server that stores nothing. Types are strict, as OpenAI's server checks them: "5" is not
a number (an integer is accepted where a number is wanted).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..inference.sampling import MAX_LOGPROBS, REPETITION_PENALTY_RANGE

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 1000  # per stop string: each is searched for at every token
INT64 = 2**63  # OpenAI's seed is any signed 64-bit integer


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """What completions and chat completions share."""

    model: str | None = None  # None: the model served
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)  # taken modulo 2**63 (sampling.offset_seed)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, as OpenAI does, and not used
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)  # None, -1 or 0: every token
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; None: up to the end of the context
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: None = Field(None, description="not supported: GPT-2 does not fill in the middle")
    best_of: int | None = None


class ChatMessage(Strict):
    # developer is OpenAI's newer name for system; tool and function turns are refused by the route, naming them
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None  # a string, or OpenAI's parts: [{"type": "text", "text": ...}, ...]
    name: str | None = None
    tool_call_id: str | None = None  # read so that a tool turn is refused for what it is (checks.chat_messages)
    tool_calls: list | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None  # {"type": "text"}; JSON modes are refused by the route
    store: bool | None = None  # accepted, as OpenAI does, and not used: nothing is stored
    metadata: dict[str, str] | None = None  # likewise


class TokenizeRequest(Strict):
    """llama.cpp's body ({"content"}) or vLLM's ({"prompt", "add_special_tokens"}, which lm-eval's remote tokenizer
    sends); GPT-2's tokenizers add no special tokens, so add_special_tokens changes nothing."""

    content: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(Strict):
    tokens: list[int]


# responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: one entry per token, in order."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptlab"
    max_model_len: int  # the context length, as vLLM reports it
    parameters: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
