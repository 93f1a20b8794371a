"""Benchmarks in their published formats, scored as lm-evaluation-harness scores them. A continuation's
log-likelihood is the sum of its tokens' log-probabilities after its context.

Multiple choice (acc counts the items whose most likely choice is the right one, acc_norm the same per
character of the choice, so that long endings are not penalised for their length):
    hellaswag   HellaSwag's JSONL (ctx_a, ctx_b, activity_label, endings, label), as its validation file
                hellaswag_val.jsonl is published: the context is "activity_label: ctx_a Ctx_b" and each
                ending a continuation after a space, both cleaned of the WikiHow half's [title] and
                [header] artifacts the way lm-eval's hellaswag task cleans them.
    arc         ARC's JSONL (ARC-Easy or ARC-Challenge), as AI2 publishes it (question.stem,
                question.choices[].text and .label, answerKey) or as Hugging Face's allenai/ai2_arc holds
                it (question, choices.text, choices.label, answerKey): the context is
                "Question: {question}\nAnswer:", each choice a continuation after a space (lm-eval's arc_easy).
A last word to predict (lm-eval's lambada_openai):
    lambada     LAMBADA's JSONL ({"text": ...}, OpenAI's lambada_test.jsonl): the context is the text
                before its last space, the continuation " " + the last word; acc counts the items whose
                every token of it is the most likely one, perplexity is exp(-mean log-likelihood).

Tokenizing follows lm-eval: the whole text is encoded and the context's own ids cut off its front, so a
continuation's first token is the one the whole text has there; spaces that end a context move to the
front of its continuation first. A text longer than the context window keeps its last context_length
tokens.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int  # the index of the right choice


@dataclass(frozen=True)
class Score:
    metrics: dict[str, float]  # acc and acc_norm, or acc and perplexity
    items: int
    loglikelihoods: list[list[float]]  # per item, per choice (one for lambada)

    def format(self) -> str:
        return "  ".join(f"{name} {value:.4f}" for name, value in self.metrics.items()) + f"  ({self.items:,} items)"


def clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts removed, as lm-eval's hellaswag task does."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def records(path: str | Path, task: str):
    """(where, record) for each record of a task's JSONL file."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror}); give {task}'s .jsonl file") from None
    return jsonl_records(iter([text]), str(path))


def checked(items: list[Item], path: str | Path) -> list[Item]:
    if not items:
        raise DataError(f"{path} holds no items")
    for number, item in enumerate(items, 1):
        if not 0 <= item.gold < len(item.choices):
            raise DataError(f"{path}: item {number}'s answer names no choice (it has {len(item.choices)})")
    return items


def hellaswag_items(path: str | Path) -> list[Item]:
    """The items of a HellaSwag JSONL file; a record without its fields is a one-line DataError."""
    items = []
    for where, record in records(path, "HellaSwag"):
        try:
            context = clean(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
            choices = tuple(clean(ending) for ending in record["endings"])
            gold = int(record["label"])
        except (KeyError, TypeError, AttributeError, ValueError):
            raise DataError(
                f"{where} is not a HellaSwag record (activity_label, ctx_a, ctx_b, endings and label); "
                "give HellaSwag's own .jsonl file"
            ) from None
        items.append(Item(context, choices, gold))
    return checked(items, path)


def arc_items(path: str | Path) -> list[Item]:
    """The items of an ARC JSONL file, in AI2's layout or Hugging Face's (see the module docstring)."""
    items = []
    for where, record in records(path, "ARC"):
        try:
            question = record["question"]
            if isinstance(question, dict):  # AI2's: {"stem": ..., "choices": [{"text": ..., "label": ...}]}
                stem, texts, labels = question["stem"], *zip(*((c["text"], c["label"]) for c in question["choices"]))
            else:  # Hugging Face's: "choices": {"text": [...], "label": [...]}
                stem, texts, labels = question, record["choices"]["text"], record["choices"]["label"]
            gold = list(labels).index(record["answerKey"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{where} is not an ARC record (question with its choices, and answerKey naming one of their "
                "labels); give ARC's own .jsonl file"
            ) from None
        items.append(Item(f"Question: {stem}\nAnswer:", tuple(texts), gold))
    return checked(items, path)


def lambada_items(path: str | Path) -> list[Item]:
    """The items of a LAMBADA JSONL file: the text before its last word, and that word (one choice)."""
    items = []
    for where, record in records(path, "LAMBADA"):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            raise DataError(f'{where} is not a LAMBADA record (a "text" of two words or more)')
        context, word = text.rsplit(" ", 1)  # lm-eval: text.split(' ')[:-1] joined, and ' ' + the last
        items.append(Item(context, (word,), 0))
    return checked(items, path)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval cuts them (see the module docstring); an empty context is
    end-of-text, so a continuation's first token is scored too."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def continuation_scores(model: GPTModel, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether every continuation token is the most likely one) for each
    (context ids, continuation ids), in one right-padded batch; a pair longer than the context window keeps
    its last context_length + 1 ids."""
    window = model.cfg.context_length + 1
    rows, targets = [], []
    for context_ids, continuation_ids in pairs:
        ids = (list(context_ids) + list(continuation_ids))[-window:]  # (≤ context + 1,)
        count = min(len(continuation_ids), len(ids) - 1)  # the continuation's tokens, at the end of `ids`
        rows.append(ids[:-1])
        targets.append((ids[-count:], len(ids) - 1 - count))
    width = max(len(row) for row in rows)
    batch = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=model.device)  # (N, T)
    logprobs = model(batch).float().log_softmax(-1)  # (N, T, V): padding on the right changes no earlier position
    results = []
    for row, (ids, start) in enumerate(targets):
        chosen = logprobs[row, start : start + len(ids)]  # (len(ids), V)
        wanted = torch.tensor(ids, device=model.device)
        results.append((float(chosen[torch.arange(len(ids)), wanted].sum()), bool((chosen.argmax(-1) == wanted).all())))
    return results


def loglikelihoods(model: GPTModel, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """continuation_scores of (context, continuation) texts, tokenized by encode_pair."""
    return continuation_scores(
        model, [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    )


def score(model: GPTModel, tokenizer: Tokenizer, items: Sequence[Item], task: str = "hellaswag") -> Score:
    """The task's metrics over the items (see the module docstring)."""
    was_training = model.training
    model.eval()
    results = [
        loglikelihoods(model, tokenizer, [(item.context, " " + choice) for choice in item.choices]) for item in items
    ]
    model.train(was_training)
    lls = [[ll for ll, _ in result] for result in results]
    if task == "lambada":
        metrics = {
            "acc": float(np.mean([result[0][1] for result in results])),
            "perplexity": math.exp(-float(np.mean([ll[0] for ll in lls]))),
        }
        return Score(metrics, len(items), lls)
    right = [int(np.argmax(ll)) == item.gold for ll, item in zip(lls, items)]
    right_norm = [
        int(np.argmax(np.array(ll) / [len(choice) for choice in item.choices])) == item.gold
        for ll, item in zip(lls, items)
    ]
    return Score({"acc": float(np.mean(right)), "acc_norm": float(np.mean(right_norm))}, len(items), lls)


TASKS = {"hellaswag": hellaswag_items, "arc": arc_items, "lambada": lambada_items}  # name → its file's reader
