"""The formats a corpus file may be in, told by its name and checked by its first bytes, each read as a
stream of texts: a plain text file is one document; a file of records gives one document per record.

    .txt, .md, ... (any other name)        text, UTF-8
    .gz, .zst (e.g. .txt.gz)               the same, gzip- or zstd-compressed
    .jsonl, .jsonl.gz, .jsonl.zst          JSON Lines: one object per line, its text field a document
    .json                                  one JSON array of such objects (read whole: prefer .jsonl)
    .parquet                               Parquet: the text field's column, read one row group at a time
    .arrow                                 Arrow IPC streams, as Hugging Face datasets stores its rows
                                           (save_to_disk): --data hf-disk:FOLDER names a saved dataset

The text field is `text` unless the caller names another (--text-field), as FineWeb, TinyStories and
most Hugging Face corpora store it. Records are separated by BOUNDARY in the stream, which the token
cache writes as one end-of-text id, as between two files. A record whose text is empty gives nothing.
Every file is hashed as its bytes are on disk, so the cache notices any change to it.
"""

from __future__ import annotations

import codecs
import itertools
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

BOUNDARY = None  # between two records of one file, in a stream of texts
RECORD_FORMATS = ("jsonl", "json", "parquet", "arrow")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # by name; the first bytes must agree
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "parquet": b"PAR1", "arrow": b"\xff\xff\xff\xff"}
SAVED_DATASET = "hf-disk:"  # --data hf-disk:FOLDER, a Hugging Face dataset saved with save_to_disk
HUB_DATASET = "hf:"
PARQUET_BATCH_ROWS = 1024  # rows turned into Python strings at once, from the one row group held


def file_format(path: str) -> tuple[str, str | None]:
    """(format, compression) from a file's name: ("jsonl", "zstd") for data.jsonl.zst, ("text", None) for
    notes.md."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes[-2:]]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = suffixes[-1].lstrip(".") if suffixes else ""
    if kind in ("parquet", "arrow") and compression is None:
        return kind, None
    if kind in ("jsonl", "json") and (compression is None or kind == "jsonl"):
        return kind, compression
    return "text", compression


def mismatch(path: str, head: bytes) -> str | None:
    """Why a file's first bytes contradict its name (e.g. a .gz that is not gzip), or None."""
    kind, compression = file_format(path)
    expected = compression or (kind if kind in ("parquet", "arrow") else None)
    if expected and not head.startswith(MAGIC[expected]):
        return f"named {Path(path).name}, but its first bytes are not {expected}'s; rename or re-create it"
    return None


def raw_blocks(path: str, hasher, block_bytes: int) -> Iterator[bytes]:
    """The file's bytes as they are on disk, block by block, each fed to `hasher` if given."""
    try:
        file = open(path, "rb")
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}; check the data paths") from None
    with file:
        while block := file.read(block_bytes):
            if hasher is not None:
                hasher.update(block)
            yield block


def decompressed(blocks: Iterator[bytes], compression: str | None, path: str) -> Iterator[bytes]:
    """The bytes of a gzip or zstd stream (several concatenated gzip members too), or the blocks as they are."""
    if compression is None:
        yield from blocks
        return
    if compression == "zstd":
        import zstandard

        decompressor = zstandard.ZstdDecompressor().decompressobj()
        errors = (zstandard.ZstdError,)
    else:
        decompressor, errors = zlib.decompressobj(wbits=31), (zlib.error,)
    started = False  # a gzip member or zstd frame has begun and not yet ended
    try:
        for block in blocks:
            while block:
                yield decompressor.decompress(block)
                started, block = not decompressor.eof, b""
                if decompressor.eof and decompressor.unused_data:  # another gzip member or zstd frame follows
                    block = decompressor.unused_data
                    decompressor = (
                        zlib.decompressobj(wbits=31)
                        if compression == "gzip"
                        else zstandard.ZstdDecompressor().decompressobj()
                    )
    except errors as error:
        raise DataError(f"{path} is damaged: its {compression} data cannot be read ({error}); re-create it") from None
    if started:
        raise DataError(f"{path} is damaged: its {compression} data ends early (a cut-off file?); re-create it")


def decoded(blocks: Iterator[bytes], errors: str, path: str) -> Iterator[str]:
    """UTF-8 text from byte blocks; invalid bytes raise a DataError naming the file and the byte offset,
    unless errors="replace" (U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    for block in itertools.chain(blocks, [b""]):  # the empty block last: the decoder's final call
        pending = len(decoder.getstate()[0])  # an unfinished character from the previous block
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}: invalid UTF-8 at byte {offset - pending + error.start}; fix the file or pass "
                "--replace-invalid-utf8 to read bad bytes as U+FFFD"
            ) from None
        offset += len(block)
        if text:
            yield text


def texts(
    path: str, errors: str, text_field: str | None, hasher=None, block_bytes: int = 1 << 20
) -> Iterator[str | None]:
    """The file's text as a stream: text blocks, with BOUNDARY between records (see the module docstring)."""
    kind, compression = file_format(path)
    if kind == "parquet":
        yield from parquet_texts(path, text_field or "text", hasher, block_bytes)
        return
    if kind == "arrow":
        yield from arrow_texts(path, text_field or "text", hasher, block_bytes)
        return
    text = decoded(decompressed(raw_blocks(path, hasher, block_bytes), compression, path), errors, path)
    if kind == "text":
        yield from text
    elif kind == "jsonl":
        yield from separated(record_texts(jsonl_records(text, path), text_field or "text"))
    else:
        yield from separated(record_texts(json_array_records("".join(text), path), text_field or "text"))


def separated(documents: Iterator[str]) -> Iterator[str | None]:
    """The non-empty documents with BOUNDARY between them."""
    first = True
    for document in documents:
        if document:
            if not first:
                yield BOUNDARY
            yield document
            first = False


def jsonl_records(text: Iterator[str], path: str) -> Iterator[tuple[str, object]]:
    """(where, value) for each non-blank line of JSON Lines text, where = "FILE: line N"."""
    number, rest = 0, ""
    for block in itertools.chain(text, ["\n"]):
        lines = (rest + block).split("\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            if line.strip():
                where = f"{path}: line {number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{where} is not valid JSON ({error.msg} at column {error.colno}); fix or remove that line"
                    ) from None


def json_array_records(text: str, path: str) -> Iterator[tuple[str, object]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno} ({error.msg}); a .json "
            "file holds one array of objects (use .jsonl for one object per line)"
        ) from None
    if not isinstance(document, list):
        raise DataError(f"{path} holds a JSON {type(document).__name__}; a .json file holds an array of objects")
    for number, record in enumerate(document, 1):
        yield f"{path}: record {number}", record


def record_texts(records: Iterator[tuple[str, object]], text_field: str) -> Iterator[str]:
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with a {text_field!r} field")
        value = record.get(text_field)
        if not isinstance(value, str):
            keys = ", ".join(sorted(record)) or "none"
            problem = (
                f"has no {text_field!r} field (it has: {keys})"
                if value is None
                else f"has a {type(value).__name__} in {text_field!r}, not a string"
            )
            raise DataError(f"{where} {problem}; name the text field with --text-field")
        yield value


def parquet_texts(path: str, text_field: str, hasher, block_bytes: int) -> Iterator[str | None]:
    """The column's strings, a batch of rows at a time (pyarrow reads one row group at a time); the file's
    bytes are hashed in a pass of their own first."""
    import pyarrow.parquet as pq

    for _ in raw_blocks(path, hasher, block_bytes):
        pass
    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid and OSError: the file is not Parquet it can read
        raise DataError(f"{path} is not a readable Parquet file ({error}); re-create it") from None
    check_text_column(path, file.schema_arrow, text_field)

    def documents() -> Iterator[str]:
        for group in range(file.num_row_groups):  # one at a time: iter_batches would buffer them all ahead
            column = file.read_row_group(group, columns=[text_field]).column(0)
            for start in range(0, len(column), PARQUET_BATCH_ROWS):
                yield from (value for value in column.slice(start, PARQUET_BATCH_ROWS).to_pylist() if value)

    yield from separated(documents())


def check_text_column(path: str, schema, text_field: str) -> None:
    """A DataError unless the Arrow schema has a string column named text_field."""
    if text_field not in schema.names:
        raise DataError(
            f"{path} has no {text_field!r} column (it has: {', '.join(schema.names)}); name the text column "
            "with --text-field"
        )
    column_type = str(schema.field(text_field).type)
    if column_type not in ("string", "large_string"):
        raise DataError(
            f"{path}: column {text_field!r} holds {column_type}, not strings; name the text column with --text-field"
        )


def arrow_texts(path: str, text_field: str, hasher, block_bytes: int) -> Iterator[str | None]:
    """The column's strings from an Arrow IPC stream, a record batch at a time, memory-mapped; the file's
    bytes are hashed in a pass of their own first."""
    import pyarrow as pa

    for _ in raw_blocks(path, hasher, block_bytes):
        pass
    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
    except Exception as error:  # pyarrow's ArrowInvalid: not an Arrow stream it can read
        raise DataError(f"{path} is not a readable Arrow stream ({error}); re-create it") from None
    check_text_column(path, reader.schema, text_field)
    index = reader.schema.names.index(text_field)

    def documents() -> Iterator[str]:
        for batch in reader:
            yield from (value for value in batch.column(index).to_pylist() if value)

    yield from separated(documents())


def saved_dataset_files(spec: str) -> list[str]:
    """The Arrow files of `hf-disk:FOLDER`, a Hugging Face dataset saved with save_to_disk, in its order."""
    folder = Path(spec.removeprefix(SAVED_DATASET))
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        raise DataError(
            f"{folder} holds the splits {', '.join(splits)}; name one: --data {SAVED_DATASET}{folder / splits[0]}"
        )
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        raise DataError(
            f"{folder} is not a dataset saved with save_to_disk (no readable state.json); save one with "
            "datasets' Dataset.save_to_disk(FOLDER)"
        ) from None
    files = [str(folder / entry["filename"]) for entry in state.get("_data_files", [])]
    missing = [file for file in files if not Path(file).is_file()]
    if not files or missing:
        raise DataError(f"{folder} lacks {missing[0] if missing else 'its data files'}; save the dataset again")
    return files


def hub_dataset_error(spec: str) -> DataError:
    name = spec.removeprefix(HUB_DATASET)
    return DataError(
        f"gptlab does not download datasets; on a machine with the network, save it with "
        f"datasets.load_dataset({name.split(':')[0]!r}).save_to_disk(FOLDER) (a split: "
        f"load_dataset(..., split='train')) and pass --data {SAVED_DATASET}FOLDER"
    )
