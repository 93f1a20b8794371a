"""Reading fine-tuning data: JSON (an array of objects), JSONL (one object per line) or CSV (a header row),
with a one-line error that names the file and the record for anything malformed."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..data import DataError
from ..data.formats import json_array_records

T = TypeVar("T")


def read_records(path: str | Path, formats: tuple[str, ...] = ("json", "jsonl", "csv")) -> list[tuple[str, dict]]:
    """The records of a .json, .jsonl or .csv file, each with where it is for error messages: "record 3"
    (the third of a JSON array), "line 7" (of a JSONL file or, counting the header, a CSV file)."""
    path = Path(path)
    kind = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}.get(path.suffix.lower())
    if kind not in formats:
        names = ", ".join(f".{name}" for name in formats)
        raise DataError(f"{path}: cannot tell the format from its name; give a {names} file")
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; check the path") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror})") from None
    records = {"json": json_records, "jsonl": jsonl_records, "csv": csv_records}[kind](path, text)
    if not records:
        raise DataError(f"{path} holds no records; give at least one")
    return records


def json_records(path: Path, text: str) -> list[tuple[str, dict]]:
    records = []
    for where, record in json_array_records(text, str(path)):  # where: "PATH: record N"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, not an object")
        records.append((where.removeprefix(f"{path}: "), record))
    return records


def jsonl_records(path: Path, text: str) -> list[tuple[str, dict]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object")
        records.append((f"line {number}", record))
    return records


def csv_records(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.reader(text.splitlines())
    header, records = next(reader, None), []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)}); quote fields that hold commas"
            )
        records.append((f"line {reader.line_num}", dict(zip(header, row))))
    return records


def field(record: dict, name: str, where: str, required: bool = True) -> str | None:
    """A string field of a record; a missing or non-string one is an error naming the file and record
    (`where`: "FILE: line 7")."""
    value = record.get(name)
    if value is None and not required:
        return None
    if value is None:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where} has no {name!r} field (it has: {keys})")
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} is a JSON {type(value).__name__}; it must be a string")
    return value


def split_off(records: list[T], fraction: float, seed: int, path: str | Path, option: str) -> tuple[list[T], list[T]]:
    """(kept, split off): a seeded random `fraction` of the records (at least one) split off, e.g. for
    validation; both keep the file's order. A file sorted by label or topic still splits evenly."""
    if not 0 < fraction < 1:
        raise DataError(f"{option} must be between 0 and 1, got {fraction}")
    count = max(1, round(len(records) * fraction))
    if count >= len(records):
        raise DataError(
            f"{path} has {len(records)} records: too few to split {fraction:g} of them off and keep "
            f"some; give more records or a separate file"
        )
    chosen = set(np.random.default_rng(seed).permutation(len(records))[:count].tolist())
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])
