"""The token cache: a corpus tokenized once (tokens.py) into memory-mappable files per split, with a JSON
manifest of what it was built from. Reusing a cache reads nothing when every source's path, size and
modification time match the manifest (see reuse_token_cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..tokenizer import EOT_TEXT, Tokenizer
from .corpus import TRAIN_FRACTION, Corpus, DataError, split_index
from .tokens import CHUNK_CHARS, SplitWriter, scan_source, source_path, token_dtype, write_tokens

CACHE_FORMAT = "gptlab-token-cache"
CACHE_VERSION = 2
# A file changed within this long after it was checked may keep its recorded modification time on file
# systems with coarse timestamps (FAT: 2 s; some network file systems: 1 s), so such a file is hashed again.
RACY_WINDOW_NS = 2 * 10**9
MANIFEST_FILE = "tokens.json"
LOCK_FILE = ".lock"  # held while a process checks or builds the cache (build_lock)
SPLIT_FILES = {"train": "tokens-train.bin", "val": "tokens-val.bin"}
PARTIAL_FILE = "tokens.partial.json"  # how far an interrupted build got, and which files hold its tokens
CHECKPOINT_CHARS = 64 << 20  # a build records its progress after the document that passes each 64M characters


@dataclass(frozen=True)
class TokenCache:
    """A built token cache: both sides' tokens as read-only memory maps, and its manifest."""

    directory: Path
    manifest: dict
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    built: bool  # True when this call tokenized the corpus, False when it reused the cache
    resumed_chars: int = 0  # characters an interrupted build had tokenized, which this one kept

    @property
    def val_bytes(self) -> int:
        """UTF-8 bytes of the validation text (document boundaries count 0)."""
        return self.manifest["splits"]["val"]["bytes"]

    @property
    def val_target_bytes(self) -> int:
        """UTF-8 bytes that the targets of validation_batches(val_tokens, ...) stand for: val_bytes less
        the first validation token's, which is context only. The bits-per-byte denominator."""
        return self.manifest["splits"]["val"]["target_bytes"]


def read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        return None
    return manifest


def open_token_cache(cache_dir: str | os.PathLike) -> TokenCache:
    """Open an existing cache without checking it against a corpus (e.g. on ranks other than 0 after
    rank 0 ran build_token_cache). Raises DataError if there is no complete cache there."""
    directory = Path(cache_dir)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"no token cache in {directory}; build one with build_token_cache")
    dtype = np.dtype(manifest["dtype"])
    arrays = {}
    for side, info in manifest["splits"].items():
        path = directory / info["file"]
        if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
            raise DataError(f"token cache file {path} is missing or has the wrong size; delete {directory} and rebuild")
        arrays[side] = map_tokens(path, dtype, info["tokens"])
    return TokenCache(directory, manifest, arrays["train"], arrays["val"], built=False)


def map_tokens(path: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    """A read-only memory map of a token file (an empty array for none: an empty file cannot be mapped)."""
    return np.memmap(path, dtype=dtype, mode="r") if tokens else np.empty(0, dtype)


def temporary_path(directory: Path, name: str) -> Path:
    """A hidden name beside `name`, unique to this process and call, to write before renaming it into place:
    several processes (ranks, nodes sharing the folder) may build or update the same cache at once."""
    return directory / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def write_manifest(directory: Path, manifest: dict) -> None:
    temporary = temporary_path(directory, MANIFEST_FILE)
    try:
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temporary, directory / MANIFEST_FILE)
    finally:
        temporary.unlink(missing_ok=True)


def progress_bar(show: bool, total: int, unit: str, desc: str) -> tqdm:
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not show)


def reuse_token_cache(
    directory: Path, manifest: dict, corpus: Corpus, tokenizer: Tokenizer, train_fraction: float, show_progress: bool
) -> TokenCache | None:
    """The cache in `directory` if its manifest says it was built from this corpus, tokenizer and split;
    None if it was not (or is damaged).

    A source whose path, size and modification time match its record is taken as unchanged without
    being read. One whose time differs, or lies within RACY_WINDOW_NS before the record was checked
    (a later change could have kept that time), or that has none (the embedded text) is hashed, and the
    cache kept if the hash is the same: touching a file keeps its cache. Its new time is then recorded,
    so the next run reads nothing.
    """
    inputs, recorded = manifest["inputs"], manifest["inputs"]["sources"]
    if (inputs["tokenizer"], inputs["train_fraction"], len(recorded)) != (
        tokenizer.spec(),
        train_fraction,
        len(corpus.documents),
    ):
        return None
    to_hash = []
    for index, (source, doc) in enumerate(zip(recorded, corpus.documents)):
        if (source["path"], source["bytes"], source["errors"], source.get("text_field")) != (
            source_path(doc),
            doc.n_bytes,
            doc.errors,
            doc.text_field,
        ):
            return None
        if (
            doc.mtime_ns is None
            or doc.mtime_ns != source["mtime_ns"]
            or (doc.mtime_ns > manifest["checked_ns"] - RACY_WINDOW_NS)
        ):
            to_hash.append(index)
    if to_hash:
        checked_ns = time.time_ns()
        total = sum(corpus.documents[index].n_bytes for index in to_hash)
        with progress_bar(show_progress, total, "B", "checking") as bar:
            fresh = {index: scan_source(corpus.documents[index], bar) for index in to_hash}
        if any(fresh[i]["sha256"] != recorded[i]["sha256"] for i in to_hash):
            return None
        if any(fresh[index]["mtime_ns"] is not None for index in to_hash):
            sources = [fresh.get(index, source) for index, source in enumerate(recorded)]
            updated = {**manifest, "inputs": {**inputs, "sources": sources}, "checked_ns": checked_ns}
            try:
                write_manifest(directory, updated)
            except OSError:
                pass  # a read-only cache is still valid; the next run hashes those files again
    try:
        return open_token_cache(directory)
    except DataError:
        return None  # a damaged cache is rebuilt


def build_token_cache(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    progress: bool | None = None,
    chunk_chars: int = CHUNK_CHARS,
    train_fraction: float = TRAIN_FRACTION,
    checkpoint_chars: int = CHECKPOINT_CHARS,
) -> TokenCache:
    """Tokenize the corpus into cache_dir, or reuse what is there if it was built from the same inputs:
    tokenizer spec, train_fraction, and each source's path, size and content (reuse_token_cache says when
    the content is trusted from the modification time and when it is hashed again).

    train_fraction: the share of the joined text's characters on the training side (0.9: the held-out
    split); 0.0 puts every token on the validation side, for scoring a whole text. It is part of the
    inputs, so a cache for evaluation is never taken for a training cache.

    cache_dir holds tokens.json (the manifest) and tokens-train.bin / tokens-val.bin (raw uint16 ids,
    uint32 for vocabularies over 65536); other files there are left alone. The token files are written
    under temporary names unique to the build and renamed into place, the manifest last, so an interrupted
    build leaves either the old cache or none; processes building the same cache at once take turns
    (build_lock), or, where the lock does not hold (across machines), each leave a whole one. An
    interrupted build goes on where it was: after the document that passes each checkpoint_chars
    characters, the tokens so far are flushed to disk and tokens.partial.json records how far they go;
    a build over the same inputs (the first pass checks them again) keeps them and starts at the next
    document (TokenCache.resumed_chars says how much was kept). progress: tqdm bars on stderr; None shows
    them when stderr is a tty. Memory stays bounded whatever the corpus' size.
    """
    if not 0.0 <= train_fraction <= 1.0:
        raise DataError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    directory = Path(cache_dir)
    show_progress = sys.stderr.isatty() if progress is None else progress
    with build_lock(directory):
        return build_or_reuse(
            corpus, tokenizer, directory, show_progress, chunk_chars, train_fraction, checkpoint_chars
        )


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Held while one process checks or builds the cache in `directory`: the others wait here, for as long
    as it takes (no collective's timeout), then find the cache whole and reuse it. Where the lock file
    cannot be made (a read-only cache), there is none: reusing needs no lock."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK_FILE, "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def adopt_partial_build(directory: Path, inputs: dict, dtype: np.dtype, own: dict[str, Path]) -> dict | None:
    """An interrupted build's progress record, its token files renamed to this build's `own` names, if it
    was made from these inputs and its files hold what it says; else None (the build starts over). Two
    builders cannot both adopt one: the second finds the files gone."""
    try:
        record = json.loads((directory / PARTIAL_FILE).read_text())
        files = {side: directory / Path(record["files"][side]).name for side in SPLIT_FILES}
        short = any(
            path.stat().st_size < record["writers"][side]["tokens"] * dtype.itemsize for side, path in files.items()
        )
        if record["inputs"] != inputs or record["dtype"] != dtype.name or short:  # stale: its files go
            for path in [*files.values(), directory / PARTIAL_FILE]:
                path.unlink(missing_ok=True)
            return None
        for side, path in files.items():
            os.replace(path, own[side])
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or its files gone (adopted by another)
        for path in [*own.values(), directory / PARTIAL_FILE]:
            path.unlink(missing_ok=True)
        return None
    return record


def records_own(directory: Path, own: dict[str, Path]) -> bool:
    """Whether the progress record in directory is of the build whose token files are `own`."""
    try:
        files = json.loads((directory / PARTIAL_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return files == {side: path.name for side, path in own.items()}


def build_or_reuse(
    corpus: Corpus,
    tokenizer: Tokenizer,
    directory: Path,
    show_progress: bool,
    chunk_chars: int,
    train_fraction: float,
    checkpoint_chars: int,
) -> TokenCache:
    manifest = read_manifest(directory)
    if manifest is not None:
        cache = reuse_token_cache(directory, manifest, corpus, tokenizer, train_fraction, show_progress)
        if cache is not None:
            return cache
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    partial = {side: temporary_path(directory, name) for side, name in SPLIT_FILES.items()}  # this build's own
    checked_ns = time.time_ns()
    with progress_bar(show_progress, corpus.n_bytes, "B", "reading") as bar:
        sources = [scan_source(doc, bar) for doc in corpus.documents]
    total_chars = sum(source["chars"] for source in sources) + len(EOT_TEXT) * (len(sources) - 1)
    inputs = {"tokenizer": tokenizer.spec(), "train_fraction": train_fraction, "sources": sources}
    earlier = adopt_partial_build(directory, inputs, dtype, partial)
    files = {side: open(path, "r+b" if earlier else "wb") for side, path in partial.items()}
    writers = {side: SplitWriter(file, dtype) for side, file in files.items()}
    start, split = (0, 0), split_index(total_chars, train_fraction)
    if earlier:
        for side, writer in writers.items():
            kept = earlier["writers"][side]
            writer.file.truncate(kept["tokens"] * dtype.itemsize)
            writer.file.seek(0, os.SEEK_END)
            writer.tokens, writer.chars, writer.bytes, writer.first_token = (
                kept["tokens"],
                kept["chars"],
                kept["bytes"],
                kept["first_token"],
            )
        start, split = (earlier["documents"], earlier["position"]), earlier["split"]

    def save(documents: int, position: int, split: int) -> None:
        for file in files.values():
            file.flush()
            os.fsync(file.fileno())  # the tokens are on disk before the record that counts them
        record = {
            "inputs": inputs,
            "dtype": dtype.name,
            "files": {side: path.name for side, path in partial.items()},
            "documents": documents,
            "position": position,
            "split": split,
            "writers": {
                side: {"tokens": w.tokens, "chars": w.chars, "bytes": w.bytes, "first_token": w.first_token}
                for side, w in writers.items()
            },
        }
        temporary = temporary_path(directory, PARTIAL_FILE)
        temporary.write_text(json.dumps(record) + "\n")
        os.replace(temporary, directory / PARTIAL_FILE)

    try:
        with progress_bar(show_progress, total_chars, "char", "tokenizing") as bar, files["train"], files["val"]:
            bar.update(start[1])
            split = write_tokens(
                corpus, sources, split, tokenizer, writers, chunk_chars, bar, start, (checkpoint_chars, save)
            )
    except BaseException as error:  # an interruption keeps what a checkpoint recorded; anything else is dropped
        if isinstance(error, DataError) or not records_own(directory, partial):
            for path in partial.values():
                path.unlink(missing_ok=True)
            if isinstance(error, DataError) and records_own(directory, partial):
                (directory / PARTIAL_FILE).unlink(missing_ok=True)
        raise
    splits = {
        side: {"file": SPLIT_FILES[side], "tokens": w.tokens, "chars": w.chars, "bytes": w.bytes}
        for side, w in writers.items()
    }
    first = writers["val"].first_token
    first_bytes = 0 if first in (None, tokenizer.eot_id) else len(tokenizer.decode_bytes([first]))
    splits["val"]["target_bytes"] = writers["val"].bytes - first_bytes
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "inputs": inputs,
        "checked_ns": checked_ns,
        "dtype": dtype.name,
        "total_chars": total_chars,
        "split_char": split,
        "splits": splits,
    }
    # Mapped before the renames, the arrays stay this build's own even if the files are replaced later.
    arrays = {side: map_tokens(partial[side], dtype, info["tokens"]) for side, info in splits.items()}
    (directory / MANIFEST_FILE).unlink(missing_ok=True)  # no manifest: no cache, until the new one is whole
    for side, name in SPLIT_FILES.items():
        os.replace(partial[side], directory / name)
    write_manifest(directory, manifest)
    if records_own(directory, partial):
        (directory / PARTIAL_FILE).unlink(missing_ok=True)
    return TokenCache(
        directory, manifest, arrays["train"], arrays["val"], built=True, resumed_chars=start[1] if earlier else 0
    )


def default_cache_dir(corpus: Corpus, tokenizer: Tokenizer, train_fraction: float = TRAIN_FRACTION) -> Path:
    """One cache folder per (sources, tokenizer kind, train_fraction) under the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache); its manifest decides reuse."""
    kind = {name: value for name, value in tokenizer.spec().items() if name != "chars"}
    key = json.dumps([[source_path(doc) for doc in corpus.documents], kind, train_fraction])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gptlab" / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]
