"""Which files a corpus is made of: files named, folders searched, glob patterns matched; and why any
file found was left out.

A file named directly is read as given. Files found by searching a folder or matching a glob are read
when they hold text, decided by content rather than by suffix, from their first SNIFF_BYTES: a NUL byte
means binary; bytes that are not UTF-8 mean not text, unless invalid bytes are to be read as U+FFFD.
Hidden files and folders (names starting with ".") are not searched; they are counted. Links to folders
are not followed. A file whose name gives a format formats.py reads (.jsonl, .json, .parquet, .gz,
.zst) is read in that format if its first bytes agree; other compressed files are named as such. include/exclude
are shell-style patterns (fnmatch) tried on a found file's path relative to the folder searched (for a
file that a glob matched, to the folder before the glob's first wildcard) and on its name; an excluded
folder is not searched; a file named directly is not filtered.
Every file left out is recorded as (path, "category: detail") so the caller can say what happened.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .formats import HUB_DATASET, SAVED_DATASET, file_format, hub_dataset_error, mismatch, saved_dataset_files

SNIFF_BYTES = 8192  # enough to meet a binary format's header or the first invalid byte of a non-UTF-8 text
WILDCARDS = "*?["


def check_patterns(patterns: tuple[str, ...] | list[str], option: str) -> tuple[str, ...]:
    """The patterns as a tuple, or a DataError naming the first that cannot work as meant."""
    for pattern in patterns:
        if not pattern or os.path.isabs(pattern):
            problem = "cannot match: patterns apply to paths relative to the folders given and to file names"
        elif pattern.endswith("/"):
            problem = f"ends with '/': write {pattern.rstrip('/')!r} to match a folder"
        elif "{" in pattern and "," in pattern and "}" in pattern:
            problem = "uses {a,b}, which shell-style patterns do not expand: give one pattern for each"
        else:
            continue
        raise DataError(f"{option} pattern {pattern!r} {problem}; use patterns such as '*.md' or 'drafts/*'")
    return tuple(patterns)


def matches(patterns: tuple[str, ...], relative: str, name: str) -> str | None:
    """The first pattern that matches the relative path or the name, if any."""
    return next((p for p in patterns if fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p)), None)


COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"PK\x03\x04": "zip",
}  # each format's first bytes


def compression(head: bytes) -> str | None:
    """The compression format a file's first bytes announce, if any."""
    return next((kind for magic, kind in COMPRESSED.items() if head.startswith(magic)), None)


def format_reason(path: str, head: bytes) -> tuple[str | None, bool]:
    """(why the file cannot be read, as "category: detail", or None; whether that is decided by its
    format, not by a look at its text). A compressed file is read when its name says how (.gz, .zst) and
    its first bytes agree; a Parquet file when it starts as one."""
    if reason := mismatch(path, head):
        return f"not what its name says: {reason}", True
    named_kind, named_compression = file_format(path)
    if named_compression or named_kind == "parquet":
        return None, True
    if kind := compression(head):
        if kind in ("gzip", "zstd"):
            return (
                f"compressed: {kind} (name it {Path(path).name}{'.gz' if kind == 'gzip' else '.zst'} to read it)",
                True,
            )
        return f"compressed: {kind} (gptlab reads gzip .gz and zstd .zst files; decompress it to read it)", True
    return None, False


def not_text_reason(path: str, errors: str) -> str | None:
    """Why a found file is not read as text (a "category: detail" string), or None if it is text."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file: a device, pipe or socket"  # opening a pipe would wait for a writer
        with open(path, "rb") as file:
            head = file.read(SNIFF_BYTES)
    except OSError as error:
        return f"unreadable: {error.strerror}"
    reason, by_format = format_reason(path, head)
    if by_format:
        return reason
    if b"\0" in head:
        return f"binary: NUL byte at offset {head.index(0)}"
    if errors == "strict":
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            # A read that stops inside a multi-byte character is not an error: the rest follows.
            if not (len(head) == SNIFF_BYTES and error.reason == "unexpected end of data"):
                return f"not UTF-8: invalid byte at offset {error.start} (--replace-invalid-utf8 reads it)"
    return None


@dataclass
class FileSearch:
    """The files that data paths stand for, in order, and the files found but left out."""

    errors: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    hidden: int = 0  # hidden files and folders met (a hidden folder counts once, its contents are not searched)

    def add(self, path: str) -> None:
        """The files of one data path: a file itself, a folder's text files, a glob pattern's matches."""
        skipped_before = len(self.skipped)
        if path.startswith(SAVED_DATASET):
            self.files += saved_dataset_files(path)
        elif path.startswith(HUB_DATASET):
            raise hub_dataset_error(path)
        elif os.path.isdir(path):
            self.add_found(path, self.search_folder(path), "folder", skipped_before)
        elif os.path.exists(path):
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise DataError(f"{path} is not a regular file; name text files, folders or glob patterns")
            with open(path, "rb") as file:
                reason, _ = format_reason(path, file.read(8))
            if reason:
                raise DataError(f"{path}: {reason}")
            self.files.append(path)
        elif any(char in path for char in WILDCARDS):
            found = sorted(glob.glob(path, recursive=True))
            if not found:
                raise DataError(f"the pattern {path!r} matches no files; check the pattern and the current folder")
            base = glob_base(path)
            taken = []
            for match in found:
                taken += self.search_folder(match) if os.path.isdir(match) else self.consider(match, base)
            self.add_found(path, taken, "pattern", skipped_before)
        else:
            raise DataError(f"no such file or folder: {path}")

    def add_found(self, path: str, taken: list[str], what: str, skipped_before: int) -> None:
        if not taken:
            left_out = [reason for _, reason in self.skipped[skipped_before:]]
            detail = f"left out {summarise(left_out)}" if left_out else "it holds no files"
            filtered = self.include or self.exclude
            advice = "check --include/--exclude or name the files" if filtered else "name text files"
            if any(reason.startswith("not UTF-8") for reason in left_out):
                advice += " (--replace-invalid-utf8 reads text that is not UTF-8)"
            raise DataError(f"{what} {path} gives no text files to read ({detail}); {advice}")
        self.files += taken

    def search_folder(self, folder: str) -> list[str]:
        """Text files under `folder`, recursively, in sorted path order; the others go to `skipped`."""
        found = []

        def unreadable(error: OSError) -> None:
            self.skipped.append((error.filename, f"unreadable: {error.strerror}"))

        for root, dirs, files in os.walk(folder, onerror=unreadable):
            kept_dirs = []
            for name in sorted(dirs):
                relative = relative_to(os.path.join(root, name), folder)
                if name.startswith("."):
                    self.hidden += 1
                elif os.path.islink(os.path.join(root, name)):
                    self.skipped.append(
                        (
                            os.path.join(root, name),
                            "link: to a folder, not followed (name the folder itself to read it)",
                        )
                    )
                elif pattern := matches(self.exclude, relative, name):
                    self.skipped.append((os.path.join(root, name), f"excluded: matches {pattern!r}"))
                else:
                    kept_dirs.append(name)
            dirs[:] = kept_dirs
            for name in sorted(files):
                if name.startswith("."):
                    self.hidden += 1
                else:
                    found += self.consider(os.path.join(root, name), folder)
        return [str(path) for path in sorted(map(Path, found), key=lambda path: path.parts)]

    def consider(self, path: str, base: str) -> list[str]:
        """[path] if a found file passes the filters and holds text; else [] and the reason in `skipped`."""
        relative, name = relative_to(path, base), os.path.basename(path)
        if pattern := matches(self.exclude, relative, name):
            reason = f"excluded: matches {pattern!r}"
        elif self.include and not matches(self.include, relative, name):
            reason = "not included: matches no include pattern"
        else:
            reason = not_text_reason(path, self.errors)
        if reason:
            self.skipped.append((path, reason))
            return []
        return [path]


def relative_to(path: str, base: str) -> str:
    """path relative to base with "/" separators, as patterns are written."""
    return Path(os.path.relpath(path, base)).as_posix()


def glob_base(pattern: str) -> str:
    """The folder before a glob pattern's first wildcard: what its matches' relative paths start from."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(char in part for char in WILDCARDS))
    return str(Path(*parts[:fixed])) if fixed else "."


def summarise(reasons: list[str]) -> str:
    """'3 files: 2 binary, 1 excluded' from "category: detail" reasons."""
    counts: dict[str, int] = {}
    for reason in reasons:
        category = reason.split(":")[0]
        counts[category] = counts.get(category, 0) + 1
    listed = ", ".join(f"{count} {category}" for category, count in counts.items())
    return f"{len(reasons)} file{'s' if len(reasons) != 1 else ''}: {listed}"
