"""Which files a corpus reads (data/files.py): text by content, not by suffix; include/exclude patterns;
what was skipped and why."""

import bz2
import lzma
import os

import pytest
from data_helpers import write

from gptlab.data import DataError, build_token_cache, read_corpus
from gptlab.data.files import SNIFF_BYTES
from gptlab.tokenizer import EOT_TEXT

BOOK = "Call me Ishmael. Some years ago — never mind how long precisely — I went to sea.\n" * 4000  # 336 KB


def names(corpus, root):
    return [os.path.relpath(doc.path, root) for doc in corpus.documents]


def test_a_folder_gives_every_text_file_whatever_its_name_and_says_what_it_skipped(tmp_path):
    write(tmp_path / "BOOK", BOOK)
    write(tmp_path / "notes.log", "12:00 started\n")
    write(tmp_path / "src" / "Makefile", "all:\n\tcc main.c\n")
    write(tmp_path / "photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    write(tmp_path / "latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"))
    write(tmp_path / "empty.md", "")
    write(tmp_path / ".env", "SECRET=1\n")
    write(tmp_path / ".git" / "HEAD", "ref: refs/heads/main\n")
    os.mkfifo(tmp_path / "pipe")  # opening it would wait for a writer
    corpus = read_corpus([tmp_path])
    assert names(corpus, tmp_path) == ["BOOK", "notes.log", "src/Makefile"]
    assert corpus.text() == EOT_TEXT.join([BOOK, "12:00 started\n", "all:\n\tcc main.c\n"])
    assert corpus.skipped == (
        (str(tmp_path / "latin1.txt"), "not UTF-8: invalid byte at offset 3 (--replace-invalid-utf8 reads it)"),
        (str(tmp_path / "photo.jpg"), "binary: NUL byte at offset 4"),
        (str(tmp_path / "pipe"), "not a regular file: a device, pipe or socket"),
        (str(tmp_path / "empty.md"), "empty"),
    )
    assert corpus.hidden == 2
    n_bytes = sum(len(doc.read_text().encode("utf-8")) for doc in corpus.documents)
    assert corpus.summary() == (
        f"read 3 documents ({n_bytes:,} bytes: {tmp_path / 'BOOK'}, {tmp_path / 'notes.log'}, "
        f"{tmp_path / 'src' / 'Makefile'}); skipped 4 files: 1 not UTF-8, 1 binary, "
        "1 not a regular file, 1 empty; left out 2 hidden files or folders"
    )


def test_replace_mode_reads_text_that_is_not_utf8_but_never_binary_files(tmp_path):
    write(tmp_path / "latin1.txt", "caf\u00e9\n".encode("latin-1"))
    write(tmp_path / "data.bin", b"abc\x00def")
    corpus = read_corpus([tmp_path], errors="replace")
    assert names(corpus, tmp_path) == ["latin1.txt"] and corpus.text() == "caf\ufffd\n"
    assert corpus.skipped == ((str(tmp_path / "data.bin"), "binary: NUL byte at offset 3"),)


def test_text_is_decided_from_the_first_block_only_and_a_character_may_straddle_it(tmp_path, gpt2):
    straddling = "a" * (SNIFF_BYTES - 1) + "é" * 10  # the block ends inside the first "é"
    write(tmp_path / "straddling.txt", straddling)
    late_bad = ("b" * (SNIFF_BYTES + 100)).encode() + b"\xff tail"  # invalid only after the first block
    write(tmp_path / "late.txt", late_bad)
    corpus = read_corpus([tmp_path])
    assert names(corpus, tmp_path) == ["late.txt", "straddling.txt"] and not corpus.skipped
    with pytest.raises(DataError, match=rf"late.txt: invalid UTF-8 at byte {SNIFF_BYTES + 100};"):
        build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False)  # found when decoded, with the offset


@pytest.fixture
def tree(tmp_path):
    for name in ["docs/a.md", "docs/b.txt", "drafts/c.md", "drafts/deep/d.md", "notes/drafts.md", "x.py"]:
        write(tmp_path / name, f"{name}\n")
    return tmp_path


def test_include_patterns_match_the_relative_path_or_the_name(tree):
    corpus = read_corpus([tree], include=["*.md"])
    assert names(corpus, tree) == ["docs/a.md", "drafts/c.md", "drafts/deep/d.md", "notes/drafts.md"]
    assert sorted(corpus.skipped) == [
        (str(tree / "docs/b.txt"), "not included: matches no include pattern"),
        (str(tree / "x.py"), "not included: matches no include pattern"),
    ]
    assert names(read_corpus([tree], include=["docs/*", "x.py"]), tree) == ["docs/a.md", "docs/b.txt", "x.py"]


def test_exclude_patterns_leave_out_files_and_whole_folders(tree):
    corpus = read_corpus([tree], exclude=["drafts", "*.txt"])
    assert names(corpus, tree) == ["docs/a.md", "notes/drafts.md", "x.py"]  # the folder drafts/, not drafts.md
    assert corpus.skipped == (
        (str(tree / "drafts"), "excluded: matches 'drafts'"),
        (str(tree / "docs/b.txt"), "excluded: matches '*.txt'"),
    )
    assert names(read_corpus([tree], include=["*.md"], exclude=["drafts/*"]), tree) == ["docs/a.md", "notes/drafts.md"]


def test_glob_matches_are_filtered_relative_to_the_folder_before_the_wildcard(tree):
    corpus = read_corpus([str(tree / "**" / "*.md")], exclude=["drafts/deep/*"])
    assert names(corpus, tree) == ["docs/a.md", "drafts/c.md", "notes/drafts.md"]
    assert corpus.skipped == ((str(tree / "drafts/deep/d.md"), "excluded: matches 'drafts/deep/*'"),)


def test_a_file_named_directly_is_read_whatever_the_filters(tree):
    corpus = read_corpus([tree / "x.py", tree / "docs"], include=["*.md"])
    assert names(corpus, tree) == ["x.py", "docs/a.md"]


def test_bad_patterns_and_nothing_left_are_one_line_errors(tree):
    cases = [
        (
            dict(include=["*.{md,txt}"]),
            r"include pattern '\*.\{md,txt\}' uses \{a,b\}, .* give one pattern for each; "
            r"use patterns such as '\*.md' or 'drafts/\*'",
        ),
        (dict(exclude=["drafts/"]), r"exclude pattern 'drafts/' ends with '/': write 'drafts' to match a folder"),
        (dict(exclude=[""]), r"exclude pattern '' cannot match: patterns apply to paths relative"),
        (dict(include=["/abs/*.md"]), r"include pattern '/abs/\*.md' cannot match"),
        (
            dict(include=["*.rst"]),
            r"folder .* gives no text files to read \(left out 6 files: 6 not included\); "
            r"check --include/--exclude or name the files",
        ),
        (dict(exclude=["*"]), r"left out 4 files: 4 excluded\)"),  # 3 folders and x.py
    ]
    for filters, message in cases:
        with pytest.raises(DataError, match=message) as error:
            read_corpus([tree], **filters)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=r"the pattern '.*\*.rst' matches no files; check the pattern"):
        read_corpus([str(tree / "*.rst")])
    os.mkfifo(tree / "pipe")
    with pytest.raises(DataError, match=r"pipe is not a regular file; name text files"):
        read_corpus([tree / "pipe"])


def test_links_never_read_a_text_twice_and_are_said(tmp_path):
    write(tmp_path / "notes" / "a.txt", "alpha\n")
    write(tmp_path / "elsewhere" / "b.txt", "beta\n")
    os.symlink(tmp_path / "notes" / "a.txt", tmp_path / "notes" / "a-again.txt")  # found before a.txt
    os.symlink(tmp_path / "elsewhere", tmp_path / "notes" / "linked-folder")
    corpus = read_corpus([tmp_path / "notes", tmp_path / "notes" / "a.txt"])
    assert corpus.text() == "alpha\n"  # once, whichever name is met first
    assert corpus.skipped == (
        (
            str(tmp_path / "notes" / "linked-folder"),
            "link: to a folder, not followed (name the folder itself to read it)",
        ),
        (str(tmp_path / "notes" / "a.txt"), f"duplicate: the same file as {tmp_path / 'notes' / 'a-again.txt'}"),
    )
    assert "skipped 2 files: 1 link, 1 duplicate" in corpus.summary()


@pytest.mark.parametrize(
    "kind, compress, name", [("bzip2", bz2.compress, "corpus.txt.bz2"), ("xz", lzma.compress, "corpus.txt.xz")]
)
def test_a_compressed_file_gptlab_does_not_read_is_named_as_such(tmp_path, kind, compress, name):
    """gzip and zstd files named .gz or .zst are read (test_formats.py); other compressions are named."""
    write(tmp_path / "folder" / name, compress(b"some text\n" * 100))
    write(tmp_path / "folder" / "plain.txt", "plain\n")
    corpus = read_corpus([tmp_path / "folder"])
    reason = f"compressed: {kind} (gptlab reads gzip .gz and zstd .zst files; decompress it to read it)"
    assert corpus.skipped == ((str(tmp_path / "folder" / name), reason),)
    with pytest.raises(DataError, match=rf"{name}: compressed: {kind} \(gptlab reads gzip .gz and zstd .zst files"):
        read_corpus([tmp_path / "folder" / name])


def test_a_summary_counts_many_documents_by_extension(tmp_path):
    for index in range(4):
        write(tmp_path / f"note-{index}.md", "x\n")
    write(tmp_path / "a.txt", "y\n")
    write(tmp_path / "README", "z\n")
    assert read_corpus([tmp_path]).summary() == "read 6 documents (12 bytes: 4 .md, 1 without extension, 1 .txt)"
