"""Multiple-choice benchmarks in their published formats, scored as lm-evaluation-harness scores them: each
choice is a continuation of the item's context, its log-likelihood the sum of its tokens' log-probabilities;
acc counts the items whose most likely choice is the right one, acc_norm the same per character of the
choice (so that long endings are not penalised for their length).

    hellaswag   HellaSwag's JSONL (ctx_a, ctx_b, activity_label, endings, label), as its validation file
                hellaswag_val.jsonl is published: the context is "activity_label: ctx_a Ctx_b" and each
                ending a continuation after a space, both cleaned of the WikiHow half's [title] and
                [header] artifacts the way lm-eval's hellaswag task cleans them.

Tokenizing follows lm-eval: the whole text is encoded and the context's own ids cut off its front, so a
continuation's first token is the one the whole text has there. A text longer than the context window
keeps its last context_length tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import DataError
from ..data.formats import jsonl_records
from ..model import GPTModel
from ..tokenizer import Tokenizer

TASKS = ("hellaswag",)


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int  # the index of the right choice


@dataclass(frozen=True)
class Score:
    acc: float
    acc_norm: float
    items: int
    loglikelihoods: list[list[float]]  # per item, per choice

    def format(self) -> str:
        return f"acc {self.acc:.4f}  acc_norm {self.acc_norm:.4f}  ({self.items:,} items)"


def clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts removed, as lm-eval's hellaswag task does."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_items(path: str | Path) -> list[Item]:
    """The items of a HellaSwag JSONL file; a record without its fields is a one-line DataError."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror}); give HellaSwag's .jsonl file") from None
    items = []
    for where, record in jsonl_records(iter([text]), str(path)):
        try:
            context = clean(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
            choices = tuple(clean(ending) for ending in record["endings"])
            gold = int(record["label"])
        except (KeyError, TypeError, AttributeError, ValueError):
            raise DataError(
                f"{where} is not a HellaSwag record (activity_label, ctx_a, ctx_b, endings and label); "
                "give HellaSwag's own .jsonl file"
            ) from None
        if not 0 <= gold < len(choices):
            raise DataError(f"{where}: label {gold} names no ending (it has {len(choices)})")
        items.append(Item(context, choices, gold))
    if not items:
        raise DataError(f"{path} holds no items")
    return items


@torch.no_grad()
def continuation_loglikelihoods(
    model: GPTModel, tokenizer: Tokenizer, context: str, continuations: Sequence[str]
) -> list[float]:
    """log P(continuation | context) for each continuation, in one right-padded batch."""
    context_ids = tokenizer.encode(context)
    window = model.cfg.context_length + 1
    rows, targets = [], []
    for continuation in continuations:
        whole = tokenizer.encode(context + continuation)
        ids = whole[-window:]  # (≤ context + 1,)
        count = min(len(whole) - len(context_ids), len(ids) - 1)  # the continuation's tokens, at the end of `ids`
        rows.append(ids[:-1])
        targets.append((ids[-count:], len(ids) - 1 - count))
    width = max(len(row) for row in rows)
    batch = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=model.device)  # (N, T)
    logprobs = model(batch).float().log_softmax(-1)  # (N, T, V): padding on the right changes no earlier position
    sums = []
    for row, (ids, start) in enumerate(targets):
        positions = torch.arange(start, start + len(ids), device=model.device)
        sums.append(float(logprobs[row, positions, torch.tensor(ids, device=model.device)].sum()))
    return sums


def score(model: GPTModel, tokenizer: Tokenizer, items: Sequence[Item]) -> Score:
    """acc and acc_norm over the items (see the module docstring)."""
    was_training = model.training
    model.eval()
    lls = [
        continuation_loglikelihoods(model, tokenizer, item.context, [" " + choice for choice in item.choices])
        for item in items
    ]
    model.train(was_training)
    right = [int(np.argmax(ll)) == item.gold for ll, item in zip(lls, items)]
    right_norm = [
        int(np.argmax(np.array(ll) / [len(choice) for choice in item.choices])) == item.gold
        for ll, item in zip(lls, items)
    ]
    return Score(float(np.mean(right)), float(np.mean(right_norm)), len(items), lls)
