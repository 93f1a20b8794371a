"""Classification fine-tuning (the textbook's spam classifier, any labels): the output head replaced by one
of n_classes rows, and the logits of each text's last real token used.

Why the last token: under the causal mask it is the only position that has attended to the whole text.
Rows are right-padded with the end-of-text id, so the last real token is at a different position in each
row; the row's one target (its class index) sits there, every other target is IGNORE_INDEX, and the
training loop's cross-entropy is then exactly the classification loss.

A classifier checkpoint is a gptlab checkpoint whose config.json also has the head ("classifier": the
labels in class order, and the pooling rule) and whose out_head.weight has one row per label
(checkpoint.ClassifierHead); gptlab.loading.load_classifier reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, DataError
from ..errors import UserError
from ..loading import Classifier
from ..model import GPTModel
from ..tokenizer import Tokenizer
from ..training.evaluation import autocast
from ..training.runtime import Runtime, sum_across_ranks
from .records import field, read_records
from .rows import Row, RowBatches, pad_rows, rank_batches


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str
    where: str  # "FILE: line 7", for error messages


def read_labeled(path: str | Path) -> list[LabeledText]:
    """The `text` and `label` of each record of a CSV, JSONL or JSON file (a JSON integer label is read as
    its digits)."""
    items = []
    for place, record in read_records(path):
        where = f"{path}: {place}"
        label = record.get("label")
        label = str(label) if isinstance(label, int) and not isinstance(label, bool) else field(record, "label", where)
        if not label.strip():
            raise DataError(f"{where}: the label is empty; give every record a label")
        items.append(LabeledText(field(record, "text", where), label, where))
    return items


def label_set(train: list[LabeledText], others: dict[str, list[LabeledText]], path: str | Path) -> list[str]:
    """The classes, sorted: the training split's labels. A label that only another split has could never
    be predicted, so it is an error."""
    labels = sorted({item.label for item in train})
    if len(labels) < 2:
        found = f"only the label {labels[0]!r}" if labels else "no labels"
        raise DataError(f"the training split of {path} has {found}; a classifier needs at least two classes")
    for split, items in others.items():
        for item in items:
            if item.label not in labels:
                raise DataError(
                    f"{item.where}: label {item.label!r} is only in the {split} split, never in training "
                    f"(training labels: {', '.join(labels)}); add training examples of it or remove it"
                )
    return labels


def text_ids(tokenizer: Tokenizer, text: str, context_length: int, where: str = "text") -> list[int]:
    """The text's first context_length ids (a longer text is cut, as the textbook does)."""
    try:
        ids = tokenizer.encode(text)[:context_length]
    except ValueError as error:  # a character a character-level vocabulary lacks
        raise DataError(f"{where}: {error}") from None
    if not ids:
        raise DataError(f"{where}: the text is empty; a classifier needs at least one token to read")
    return ids


def class_rows(tokenizer: Tokenizer, items: list[LabeledText], labels: list[str], context_length: int) -> list[Row]:
    index = {label: i for i, label in enumerate(labels)}
    rows = []
    for item in items:
        ids = np.asarray(text_ids(tokenizer, item.text, context_length, item.where), dtype=np.int64)
        targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        targets[-1] = index[item.label]  # the last real token's logits classify the text
        rows.append(Row(ids, targets))
    return rows


def freeze_for_classification(model: GPTModel, train_blocks: int | None) -> GPTModel:
    """Train only the last `train_blocks` blocks, the final norm and the head (None: everything)."""
    if train_blocks is not None:
        model.requires_grad_(False)
        for module in [*model.trf_blocks[len(model.trf_blocks) - train_blocks :], model.final_norm, model.out_head]:
            module.requires_grad_(True)
    return model


def last_token_logits(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's logits at its last real token (B, n_classes), float32, and the class there (B,)."""
    logits = model(inputs)  # (B, T, n_classes)
    at = targets != IGNORE_INDEX  # (B, T): one True per row
    return logits[at].float(), targets[at]


@dataclass(frozen=True)
class ClassificationEval:
    loss: float  # mean cross-entropy per text
    accuracy: float
    texts: int

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy}

    def format(self) -> str:
        return f"loss {self.loss:.4f}  accuracy {self.accuracy:.2%}  ({self.texts:,} texts)"


@torch.no_grad()
def evaluate_rows(
    model: torch.nn.Module,
    rows: Sequence[Row],
    pad_id: int,
    batch_size: int,
    runtime: Runtime = Runtime(torch.device("cpu")),
    dtype: str = "float32",
) -> ClassificationEval:
    """Loss and accuracy over every row, each rank taking its share."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with autocast(runtime, dtype):
        for _, inputs, targets in rank_batches(rows, pad_id, batch_size, runtime.rank, runtime.world):
            logits, classes = last_token_logits(
                model, torch.from_numpy(inputs).to(runtime.device), torch.from_numpy(targets).to(runtime.device)
            )
            total_loss += F.cross_entropy(logits, classes, reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == classes).sum())
            count += len(classes)
    total_loss, correct, count = sum_across_ranks(runtime, total_loss, correct, count)
    model.train(was_training)
    return ClassificationEval(total_loss / count, correct / count, int(count))


class ClassificationSource(RowBatches):
    """The training loop's data for classification: training rows, and validation rows scored by loss and
    accuracy at each evaluation."""

    def __init__(self, train_rows: list[Row], val_rows: list[Row], pad_id: int, context_length: int, batch_size: int):
        super().__init__(train_rows, pad_id, context_length, batch_size, name="texts")
        self.val_rows = val_rows

    def evaluate(self, model, batch_size, runtime, dtype) -> ClassificationEval:
        return evaluate_rows(model, self.val_rows, self.pad_id, batch_size, runtime, dtype)


@torch.no_grad()
def classify_texts(classifier: Classifier, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, float]]:
    """Each text's most likely label and its probability."""
    model, tokenizer = classifier.model.eval(), classifier.tokenizer
    results = []
    for first in range(0, len(texts), batch_size):
        rows = []
        for text in texts[first : first + batch_size]:
            ids = np.asarray(text_ids(tokenizer, text, model.cfg.context_length), dtype=np.int64)
            rows.append(Row(ids, np.r_[np.full(len(ids) - 1, IGNORE_INDEX), 0]))  # class 0: a marker, not a label
        inputs, targets = pad_rows(rows, tokenizer.eot_id)
        logits, _ = last_token_logits(
            model, torch.from_numpy(inputs).to(model.device), torch.from_numpy(targets).to(model.device)
        )
        probabilities = logits.softmax(dim=-1)
        best = probabilities.argmax(dim=-1)
        results += [(classifier.labels[i], probabilities[row, i].item()) for row, i in enumerate(best.tolist())]
    return results


def parse_train_blocks(value: str | int, n_layers: int) -> int | None:
    """--train-blocks: a number of final blocks, or "all" (None)."""
    if value == "all":
        return None
    try:
        blocks = int(value)
    except ValueError:
        blocks = 0
    if not 1 <= blocks <= n_layers:
        raise UserError(f"--train-blocks must be 'all' or a number of final blocks from 1 to {n_layers}, got {value!r}")
    return blocks
