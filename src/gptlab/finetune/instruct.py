"""Instruction tuning: conversations in, rows whose targets are the responses only, out.

Each record is an Alpaca record (instruction, optional input, output) or a chat (messages with system,
user and assistant roles). The prompt template (templates.py) turns it into tokens; the loss is taken on
the assistant's tokens and the end-of-text token after each response, never on the prompt. A record
longer than the context is truncated (its response cut short) or dropped. With packing, consecutive
examples share a window (each still ends with end-of-text, and a later one sees the earlier ones, as
documents do in pretraining), which wastes no compute on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import IGNORE_INDEX, DataError
from ..inference.decoder import DecoderSettings
from ..inference.generate import generate_ids
from ..inference.sampling import GenerationOptions
from ..tokenizer import Tokenizer
from ..training.evaluation import autocast, loss_fn, unwrap
from ..training.runtime import Runtime, sum_across_ranks
from ..training.state import read_log, write_log
from .records import field as record_field
from .records import read_records, split_off
from .rows import Row, RowBatches, rank_batches
from .templates import alpaca_messages, chat_prompt_ids, check_messages, encode_chat

SAMPLES_FILE = "samples.jsonl"
SAMPLE_COUNT = 3  # validation prompts answered at each evaluation


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # ends with the assistant's response
    where: str  # "FILE: line 7", for error messages


def read_conversations(path: str | Path, template: str) -> list[Conversation]:
    """The records of a JSON or JSONL file as conversations in the template's words."""
    conversations = []
    for place, record in read_records(path, ("json", "jsonl")):
        where = f"{path}: {place}"
        if "messages" in record:
            try:
                check_messages(record["messages"], "messages")
            except ValueError as error:
                raise DataError(f"{where}: {error}") from None
            messages = record["messages"]
            if messages[-1]["role"] != "assistant":
                raise DataError(
                    f"{where}: the last message is the {messages[-1]['role']}'s; end with the "
                    "assistant's response, which is what the model learns"
                )
        else:
            instruction = record_field(record, "instruction", where)
            output = record_field(record, "output", where)
            messages = alpaca_messages(
                instruction, output, record_field(record, "input", where, required=False) or "", template
            )
        conversations.append(Conversation(messages, where))
    return conversations


def encode_example(tokenizer: Tokenizer, conversation: Conversation, template: str) -> tuple[list[int], list[bool]]:
    try:
        return encode_chat(tokenizer, conversation.messages, template)
    except ValueError as error:  # a character a character-level vocabulary lacks
        raise DataError(f"{conversation.where}: {error}") from None


def to_row(ids: Sequence[int], trained: Sequence[bool]) -> Row:
    """Inputs ids[:-1]; the target at position i is ids[i + 1] where that token is trained on."""
    ids, trained = np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)
    return Row(ids[:-1], np.where(trained[1:], ids[1:], IGNORE_INDEX))


@dataclass
class Fitted:
    examples: list[tuple[list[int], list[bool]]]
    truncated: int = 0  # of the examples kept
    dropped: int = 0

    def describe(self, name: str) -> str:
        return (
            f"{name}: {len(self.examples):,} examples, {self.truncated:,} of them truncated to the context; "
            f"{self.dropped:,} dropped"
        )


def fit_to_context(examples: list[tuple[list[int], list[bool]]], context_length: int, long: str) -> Fitted:
    """Examples of at most context_length + 1 tokens (a row of context_length inputs). A longer one is cut
    (long="truncate") or left out (long="drop"); one left with no trained target is always left out."""
    fitted = Fitted([])
    for ids, trained in examples:
        too_long = len(ids) > context_length + 1
        ids, trained = ids[: context_length + 1], trained[: context_length + 1]
        if (too_long and long == "drop") or not any(trained[1:]):  # no room left for the response
            fitted.dropped += 1
            continue
        fitted.truncated += too_long
        fitted.examples.append((ids, trained))
    return fitted


def pack(examples: list[tuple[list[int], list[bool]]], context_length: int) -> list[tuple[list[int], list[bool]]]:
    """Consecutive examples joined into windows of at most context_length + 1 tokens, whole examples only."""
    windows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    trained: list[bool] = []
    for example_ids, example_trained in examples:
        if ids and len(ids) + len(example_ids) > context_length + 1:
            windows.append((ids, trained))
            ids, trained = [], []
        ids, trained = ids + example_ids, trained + example_trained
    return windows + ([(ids, trained)] if ids else [])


@dataclass(frozen=True)
class InstructionEval:
    loss: float  # mean nats per response token
    tokens: int
    samples: list[dict] = field(default_factory=list)  # prompt, expected and generated response

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.loss))

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity}

    def format(self) -> str:
        shown = [shorten(self.samples[0][key]) for key in ("prompt", "response")] if self.samples else []
        first = f" | {shown[0]!r} -> {shown[1]!r}" if shown else ""
        return f"loss {self.loss:.4f}  perplexity {self.perplexity:.2f}  ({self.tokens:,} response tokens){first}"


def shorten(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[: length - 3] + "..."


def generate_responses(
    model: torch.nn.Module, tokenizer: Tokenizer, conversations: list[list[dict]], template: str, max_new_tokens: int
) -> list[str]:
    """The model's greedy answer to each conversation (which ends with a user's message), up to end-of-text."""
    was_training = model.training
    model.eval()
    prompts = [chat_prompt_ids(tokenizer, messages, template) for messages in conversations]
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    # The weights change between calls during training: decode with them as they are, no prepared copy.
    ids = generate_ids(
        model, prompts, options, eot_id=tokenizer.eot_id, settings=DecoderSettings(prepare_weights=False)
    )
    model.train(was_training)
    return [tokenizer.decode(row) for row in ids]


class InstructionSource(RowBatches):
    """The training loop's data for instruction tuning: training rows, validation rows (loss on responses),
    and a few validation prompts answered at each evaluation."""

    def __init__(
        self,
        train_rows: list[Row],
        val_rows: list[Row],
        val_conversations: list[Conversation],
        tokenizer: Tokenizer,
        template: str,
        context_length: int,
        batch_size: int,
        sample_tokens: int,
    ):
        super().__init__(train_rows, tokenizer.eot_id, context_length, batch_size)
        self.val_rows, self.tokenizer, self.template, self.sample_tokens = val_rows, tokenizer, template, sample_tokens
        self.sample_conversations = [c.messages for c in val_conversations[:SAMPLE_COUNT]]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int, runtime: Runtime, dtype: str) -> InstructionEval:
        was_training = model.training
        model.eval()
        total_loss, total_tokens = 0.0, 0
        with autocast(runtime, dtype):
            for _, inputs, targets in rank_batches(
                self.val_rows, self.tokenizer.eot_id, batch_size, runtime.rank, runtime.world
            ):
                x, y = torch.from_numpy(inputs).to(runtime.device), torch.from_numpy(targets).to(runtime.device)
                total_loss += loss_fn(model, x, y, reduction="sum").item()
                total_tokens += int((y != IGNORE_INDEX).sum())
        total_loss, total_tokens = sum_across_ranks(runtime, total_loss, total_tokens)
        samples = []
        if runtime.is_main and self.sample_tokens:
            prompts = [messages[:-1] for messages in self.sample_conversations]
            responses = generate_responses(unwrap(model), self.tokenizer, prompts, self.template, self.sample_tokens)
            samples = [
                {"prompt": messages[-2]["content"], "expected": messages[-1]["content"], "response": response}
                for messages, response in zip(self.sample_conversations, responses)
            ]
        model.train(was_training)
        return InstructionEval(total_loss / total_tokens, int(total_tokens), samples)


def write_samples(out_dir: Path, step: int, result: InstructionEval) -> None:
    """Append this evaluation's responses to samples.jsonl, next to metrics.jsonl. Lines from a step this
    late or later are a crashed run's, which the resumed run repeats: they are replaced."""
    path = out_dir / SAMPLES_FILE
    kept = [record for record in read_log(path)[0] if record["step"] < step]  # a line a crash cut short goes too
    write_log(path, kept + [{"step": step, **sample} for sample in result.samples])


def instruction_source(
    tokenizer: Tokenizer,
    data: str,
    val_data: str | None,
    val_fraction: float,
    template: str,
    context_length: int,
    batch_size: int,
    long: str,
    packed: bool,
    seed: int,
    sample_tokens: int,
    log=print,
) -> InstructionSource:
    """Read, split, encode and fit the records; say how many were truncated or dropped."""
    train = read_conversations(data, template)
    if val_data:
        val = read_conversations(val_data, template)
    else:
        train, val = split_off(train, val_fraction, seed, data, "--val-fraction")
    fitted = {
        name: fit_to_context([encode_example(tokenizer, c, template) for c in split], context_length, long)
        for name, split in (("training", train), ("validation", val))
    }
    for name, split in fitted.items():
        if not split.examples:
            advice = "--long truncate, " if long == "drop" else ""
            raise DataError(
                f"no {name} example leaves room for its response in the context of {context_length} "
                f"tokens; use {advice}a model with a longer context, or shorter prompts"
            )
        log(split.describe(name))
    train_examples = fitted["training"].examples
    if packed:
        train_examples = pack(train_examples, context_length)
        log(f"packed into {len(train_examples):,} windows of up to {context_length} tokens")
    return InstructionSource(
        [to_row(*e) for e in train_examples],
        [to_row(*e) for e in fitted["validation"].examples],
        val,
        tokenizer,
        template,
        context_length,
        batch_size,
        sample_tokens,
    )
