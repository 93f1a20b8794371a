"""Prompt templates: how a conversation (system, user and assistant messages) becomes one text.

Instruction tuning, `generate --chat` and the server's chat endpoint must render a conversation the same
way, or the model sees prompts at inference that it never saw in training. They all call `render`:

    [system]  user  assistant <|endoftext|>  user  assistant <|endoftext|>  ...

Only the assistant's words and the end-of-text token after them are trained on (Segment.trained); the
end-of-text token is what teaches the model to stop. A template is stored by name in a fine-tuned
checkpoint's config.json ("chat_template"), so whatever loads it can apply the same one.

Alpaca's template (Taori et al., 2023, as the textbook writes it) is the default:

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:            <- only when the record has one
    {input}

    ### Response:
    {output}<|endoftext|>
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CHAT_TEMPLATE_FIELD, CONFIG_FILE, read_json
from ..errors import UserError
from ..tokenizer import EOT_TEXT, Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str  # the system message a conversation without one gets ("" for none)
    system_with_input: str  # Alpaca words its preamble differently when the record has an input
    system_format: str  # each takes {content}
    user_format: str
    input_format: str  # an Alpaca record's input, appended to the user's message
    assistant_prefix: str  # what precedes every response: the generation prompt ends with it


TEMPLATES = {
    "alpaca": ChatTemplate(
        name="alpaca",
        system="Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.",
        system_with_input="Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.",
        system_format="{content}\n\n",
        user_format="### Instruction:\n{content}\n\n",
        input_format="\n\n### Input:\n{content}",
        assistant_prefix="### Response:\n",
    ),
    # ChatML's markers as plain text: GPT-2's vocabulary has no special tokens for them.
    "chatml": ChatTemplate(
        name="chatml",
        system="",
        system_with_input="",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        input_format="\n\n{content}",
        assistant_prefix="<|im_start|>assistant\n",
    ),
}
DEFAULT_TEMPLATE = "alpaca"


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool  # an assistant's response: its tokens are targets
    end_of_text: bool = False  # the end-of-text token follows the text (and is a target too)


def alpaca_messages(
    instruction: str, output: str | None, input: str = "", template: str = DEFAULT_TEMPLATE
) -> list[dict]:
    """An Alpaca record (instruction, optional input, output) as a conversation in the template's words.
    Without an output it is a prompt: the conversation ends with the user's message."""
    chat = get_template(template)
    user = instruction + (chat.input_format.format(content=input) if input else "")
    messages = [
        {"role": "system", "content": chat.system_with_input if input else chat.system},
        {"role": "user", "content": user},
    ]
    return messages + ([{"role": "assistant", "content": output}] if output is not None else [])


def render(messages: list[dict], template: str = DEFAULT_TEMPLATE, generation_prompt: bool = False) -> list[Segment]:
    """The conversation's text in pieces, in order. generation_prompt=True ends it with the assistant
    prefix, where the model's answer begins."""
    chat = get_template(template)
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": chat.system}, *messages]
    segments = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            if content:
                segments.append(Segment(chat.system_format.format(content=content), trained=False))
        elif role == "user":
            segments.append(Segment(chat.user_format.format(content=content), trained=False))
        else:
            segments.append(Segment(chat.assistant_prefix, trained=False))
            segments.append(Segment(content, trained=True, end_of_text=True))
    if generation_prompt:
        segments.append(Segment(chat.assistant_prefix, trained=False))
    return segments


def format_chat(messages: list[dict], template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt that asks for the assistant's next message, as text: the conversation so far (each
    earlier response followed by <|endoftext|>) and the assistant prefix. To run a model on it, use
    chat_prompt_ids, which tokenizes it exactly as training did."""
    check_messages(messages)
    return "".join(
        segment.text + EOT_TEXT * segment.end_of_text for segment in render(messages, template, generation_prompt=True)
    )


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict], template: str = DEFAULT_TEMPLATE, generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, for each, whether it is trained on (a response or the end-of-text
    after it). Each segment is encoded on its own: a BPE merge across the boundary between a prompt and
    its response would make the prompt's tokens depend on the response, so training and inference
    (which has no response yet) would see different prompts."""
    ids, trained = [], []
    for segment in render(messages, template, generation_prompt):
        piece = tokenizer.encode(segment.text) + [tokenizer.eot_id] * segment.end_of_text
        ids += piece
        trained += [segment.trained] * len(piece)
    return ids, trained


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict], template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The ids to generate the assistant's next message from (format_chat's text, tokenized as in training)."""
    check_messages(messages)
    return encode_chat(tokenizer, messages, template, generation_prompt=True)[0]


def chat_template_of(checkpoint: str | Path) -> str | None:
    """The template a fine-tuned checkpoint was trained with (config.json's "chat_template"), or None."""
    return read_json(Path(checkpoint) / CONFIG_FILE).get(CHAT_TEMPLATE_FIELD)


def jinja_template(template: str, segment_mark: str = "") -> str:
    """The template as the Jinja source transformers' apply_chat_template and llama.cpp render: messages in,
    format_chat's text out (add_generation_prompt: ending with the assistant prefix). It is rendered from
    render()'s definitions, and a message with another role, or a system message after the first, is
    refused with raise_exception.

    `segment_mark` is written between the pieces that encode_chat encodes apart (none where end-of-text,
    a special token, already parts them): a tokenizer that splits the text at it and drops it, as
    interop.hf_tokenizer's does, then gives encode_chat's ids although it tokenizes the whole text at once.
    Every tag trims the whitespace before it, so the source's line breaks never reach the text."""
    chat = get_template(template)

    def text(value: str) -> str:  # a Jinja string literal: JSON's escapes are Jinja's
        return json.dumps(value)

    def joined(*parts: str) -> str:  # Jinja's sum of string literals (given as text) and variables (as names)
        return " + ".join(part.removeprefix("=") if part.startswith("=") else text(part) for part in parts if part)

    system_before, _, system_after = chat.system_format.partition("{content}")
    user_before, _, user_after = chat.user_format.partition("{content}")
    content = "=message['content']"
    lines = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}",
        f"{{%- else -%}}{{%- set system = {text(chat.system)} -%}}{{%- set rest = messages -%}}",
        "{%- endif -%}",
        f"{{%- if system -%}}{{{{- {joined(system_before, '=system', system_after, segment_mark)} }}}}{{%- endif -%}}",
        "{%- for message in rest -%}",
        "{%- if message['role'] == 'user' -%}",
        f"{{{{- {joined(user_before, content, user_after, segment_mark)} }}}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{{{- {joined(chat.assistant_prefix, segment_mark, content, EOT_TEXT)} }}}}",
        "{%- else -%}",
        "{{- raise_exception('gptlab\\'s ' + " + text(chat.name) + " + ' template takes system (first only), user "
        "and assistant messages, not ' + message['role']) }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {text(chat.assistant_prefix)} }}}}{{%- endif -%}}",
    ]
    return "\n".join(lines)


def check_messages(messages: list, where: str = "messages") -> None:
    """A list of {"role", "content"} with known roles, a system message only first, and a non-empty
    content for users and assistants; a one-line ValueError otherwise."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where} must be a non-empty list of {{"role", "content"}} objects')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f'{where}[{index}] must be an object with a string "content"')
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where}[{index}] has role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and index:
            raise UserError(f"{where}[{index}] is a system message; only the first message may be one")
