"""Training data: corpus reading, the character split, the token cache, and training/validation windows."""

import hashlib
import os

import numpy as np
import pytest
from data_helpers import CountingTokenizer, write

from gptlab.data import (
    EMBEDDED_PATH,
    IGNORE_INDEX,
    DataError,
    TokenWindows,
    build_token_cache,
    build_tokenizer,
    chunks,
    default_corpus,
    default_corpus_text,
    open_token_cache,
    read_corpus,
    split_text,
    validation_batches,
)
from gptlab.data.formats import texts
from gptlab.data.tokens import token_dtype
from gptlab.errors import UserError
from gptlab.tokenizer import EOT_TEXT

# ---------------------------------------------------------------- corpus


def test_default_corpus_is_cpythons_reference_documentation():
    from pydoc_data.topics import topics

    text = default_corpus_text()
    assert text == "\n\n".join(topics[key] for key in sorted(topics))
    assert 400_000 < len(text) < 550_000  # about 466 KB
    (document,) = default_corpus().documents
    assert (document.path, document.text, document.mtime_ns) == (EMBEDDED_PATH, text, None)
    assert document.n_bytes == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", ["0123456789", "é" * 7 + "日本", "x" * 1001, "a"])
def test_split_text_takes_the_last_tenth_of_the_characters(text):
    train, val = split_text(text)
    assert train + val == text
    assert len(train) == int(0.9 * len(text))
    assert split_text("0123456789") == ("012345678", "9")


def test_folders_are_searched_recursively_in_sorted_order_skipping_hidden_and_non_text(tmp_path):
    for name in ["b.txt", "a.txt", "a/z.md", "a/b/c.py", "a/B.rst", ".hidden/x.txt", "a/.dot.txt"]:
        write(tmp_path / name, f"text of {name}\n")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    corpus = read_corpus([tmp_path])
    names = [os.path.relpath(doc.path, tmp_path) for doc in corpus.documents]
    assert names == ["a/B.rst", "a/b/c.py", "a/z.md", "a.txt", "b.txt"]
    assert corpus.text() == EOT_TEXT.join(f"text of {name}\n" for name in names)
    assert corpus.skipped == ((str(tmp_path / "image.png"), "binary: NUL byte at offset 8"),)
    assert corpus.hidden == 2


def test_globs_and_files_keep_argument_order_and_a_file_is_read_once(tmp_path):
    for name in ["b.txt", "a/x.md", "a/b/y.md", "notes.log"]:
        write(tmp_path / name, name)
    corpus = read_corpus([tmp_path / "notes.log", str(tmp_path / "**" / "*.md"), tmp_path / "a" / "x.md"])
    assert [os.path.relpath(doc.path, tmp_path) for doc in corpus.documents] == ["notes.log", "a/b/y.md", "a/x.md"]


def test_files_are_read_byte_exact(tmp_path):
    text = "line one\r\nline two\r\n\ufeffend"
    path = write(tmp_path / "t.txt", text)
    (document,) = read_corpus([path]).documents
    assert document.read_text() == text
    assert (document.n_bytes, document.mtime_ns) == (len(text.encode("utf-8")), path.stat().st_mtime_ns)


def test_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path, gpt2):
    path = write(tmp_path / "bad.txt", b"hello\n\xffworld")
    corpus = read_corpus([path])  # a file named directly is taken as given: decoding is the build's
    with pytest.raises(DataError) as error:
        build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False)
    message = str(error.value)
    assert str(path) in message and "byte 6" in message and "--replace-invalid-utf8" in message
    assert "\n" not in message


@pytest.mark.parametrize("block_bytes", range(1, 10))
def test_invalid_utf8_offset_is_exact_across_read_blocks(tmp_path, block_bytes):
    data = "aé€".encode("utf-8") + b"\xc3(" + b"tail"  # a, 2-byte, 3-byte chars; then a broken sequence at byte 6
    path = write(tmp_path / "bad.txt", data)
    with pytest.raises(DataError, match="byte 6;"):
        list(texts(str(path), "strict", None, hashlib.sha256(), block_bytes))
    truncated = write(tmp_path / "truncated.txt", "ab€".encode("utf-8")[:-1])  # ends inside a character
    with pytest.raises(DataError, match="byte 2;"):
        list(texts(str(truncated), "strict", None, hashlib.sha256(), block_bytes))


def test_replace_mode_reads_invalid_bytes_as_replacement_characters(tmp_path):
    data = b"caf\xe9 ok\n\xff\xfe end"
    corpus = read_corpus([write(tmp_path / "latin1.txt", data)], errors="replace")
    assert corpus.text() == data.decode("utf-8", errors="replace")
    assert corpus.text().count("\ufffd") == 3


def test_bad_paths_and_empty_corpora_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder: .*missing.txt"):
        read_corpus([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="matches no files"):
        read_corpus([str(tmp_path / "*.nothing")])
    write(tmp_path / "pictures" / "a.png", b"\x89PNG")
    no_text = r"folder .*pictures gives no text files to read \(left out 1 file: 1 not UTF-8\); name text files \(--"
    with pytest.raises(DataError, match=no_text):
        read_corpus([tmp_path / "pictures"])
    empty = [write(tmp_path / "e1.txt", ""), write(tmp_path / "e2.txt", "")]
    with pytest.raises(DataError, match="the corpus has no text: .*e1.txt, .*e2.txt are empty"):
        read_corpus(empty)
    with pytest.raises(DataError, match="no data paths"):
        read_corpus([])
    with pytest.raises(DataError, match="errors must be"):
        read_corpus(empty, errors="ignore")
    assert [doc.path for doc in read_corpus([*empty, write(tmp_path / "t.txt", "x")]).documents] == [
        str(tmp_path / "t.txt")
    ]


def test_char_tokenizer_covers_every_character_of_the_corpus_including_validation(tmp_path):
    texts = ["aaaa bbbb\n" * 9, "zZ€\n"]
    corpus = read_corpus([write(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)])
    tokenizer = build_tokenizer("char", corpus)
    assert tokenizer.chars == "".join(sorted(set("".join(texts))))  # boundaries are ids, not marker characters
    assert "€" in split_text(corpus.text())[1] and "€" in tokenizer.chars
    with pytest.raises(UserError, match="^--tokenizer bpe is neither gpt2, char nor a tokenizer folder; make one with"):
        build_tokenizer("bpe", corpus)


# ---------------------------------------------------------------- chunking and the token cache


def test_cutting_before_a_newline_after_visible_text_keeps_gpt2_tokens(gpt2):
    # Why cuts go before the newline: cutting after "\n\n" changes the tokens ("\n\n" is one piece at
    # the end of a text, two before a letter).
    assert gpt2.encode("x\n\n") + gpt2.encode("A") != gpt2.encode("x\n\nA")
    text = "It's  a\n\n\ntest\t \n x'll 12 34\n\n  ¡¿ done\r\n\r\nend\u3000\n\u2028z\n" * 3
    # From 2 on, every 4 * chunk_chars characters of the text hold a safe cut, so no cut is forced.
    for chunk_chars in range(2, 40):
        pieces = list(chunks(iter([text[i : i + 7] for i in range(0, len(text), 7)]), chunk_chars))
        assert "".join(pieces) == text and len(pieces) > 1
        assert [t for piece in gpt2.encode_batch(pieces) for t in piece] == gpt2.encode(text)


def test_text_without_a_safe_cut_is_still_cut_to_bound_memory():
    text = "abcdefghij" * 100
    pieces = list(chunks(iter([text[i : i + 30] for i in range(0, len(text), 30)]), 10))
    assert "".join(pieces) == text and max(len(piece) for piece in pieces) == 40


def test_chunked_tokens_of_the_default_corpus_equal_encoding_the_split_text(tmp_path, gpt2):
    corpus = default_corpus()
    train_text, val_text = split_text(default_corpus_text())
    cache = build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False, chunk_chars=5_000)
    assert cache.train_tokens.tolist() == gpt2.encode(train_text)
    assert cache.val_tokens.tolist() == gpt2.encode(val_text)
    assert cache.val_bytes == len(val_text.encode("utf-8"))
    assert cache.train_tokens.dtype == np.uint16


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_multi_document_tokens_equal_encoding_the_joined_text_split_by_characters(tmp_path, kind):
    texts = ["First file.\nIt has lines.\n" * 40, "Second\n\n\nfile  with  spaces\n" * 30, "Third €uro file\n" * 25]
    corpus = read_corpus([write(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)])
    tokenizer = build_tokenizer(kind, corpus)
    joined = EOT_TEXT.join(texts)
    assert corpus.text() == joined
    train_text, val_text = split_text(joined)
    cache = build_token_cache(corpus, tokenizer, tmp_path / "cache", progress=False, chunk_chars=50)
    assert cache.manifest["total_chars"] == len(joined)
    assert cache.train_tokens.tolist() == tokenizer.encode(train_text, allow_special=True)
    assert cache.val_tokens.tolist() == tokenizer.encode(val_text, allow_special=True)
    assert tokenizer.eot_id in cache.train_tokens.tolist()
    assert cache.manifest["split_char"] == len(train_text)
    assert cache.val_bytes == len(val_text.replace(EOT_TEXT, "").encode("utf-8"))


def test_a_split_inside_a_document_boundary_moves_the_whole_boundary_to_its_first_characters_side(tmp_path, gpt2):
    first, second = "a" * 89 + "\n", "tail\n"  # 90 + 13 + 5 = 108 characters; int(0.9 * 108) = 97 is in the marker
    corpus = read_corpus([write(tmp_path / "1.txt", first), write(tmp_path / "2.txt", second)])
    cache = build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False)
    assert cache.train_tokens.tolist() == gpt2.encode(first) + [gpt2.eot_id]
    assert cache.val_tokens.tolist() == gpt2.encode(second)
    assert cache.manifest["split_char"] == len(first) + len(EOT_TEXT)


def test_the_manifest_records_sources_tokenizer_split_and_counts(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "some text\n" * 50)
    cache = build_token_cache(read_corpus([path]), gpt2, tmp_path / "cache", progress=False)
    manifest = cache.manifest
    (source,) = manifest["inputs"]["sources"]
    assert source["path"] == os.path.abspath(path)
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (source["bytes"], source["mtime_ns"]) == (path.stat().st_size, path.stat().st_mtime_ns)
    assert manifest["inputs"]["tokenizer"] == {"type": "gpt2"} and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["tokens"] == len(cache.train_tokens) > 0
    assert manifest["splits"]["val"]["tokens"] == len(cache.val_tokens) > 0
    assert manifest["total_chars"] == 500 and manifest["split_char"] == 450
    assert sorted(os.listdir(tmp_path / "cache")) == [".lock", "tokens-train.bin", "tokens-val.bin", "tokens.json"]


def test_the_cache_is_reused_when_nothing_changed_and_rebuilt_when_anything_did(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "hello world\n" * 100)
    cache_dir = tmp_path / "cache"
    counting = CountingTokenizer(gpt2)
    first = build_token_cache(read_corpus([path]), counting, cache_dir, progress=False)
    calls, train_file = counting.calls, cache_dir / "tokens-train.bin"
    written_at = train_file.stat().st_mtime_ns
    assert first.built and calls > 0

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same content
    again = build_token_cache(read_corpus([path]), counting, cache_dir, progress=False)
    assert not again.built and counting.calls == calls and train_file.stat().st_mtime_ns == written_at
    assert again.train_tokens.tolist() == first.train_tokens.tolist()

    write(path, "goodbye world\n" * 100)
    changed = build_token_cache(read_corpus([path]), counting, cache_dir, progress=False)
    assert changed.built and counting.calls > calls
    assert changed.train_tokens.tolist() == gpt2.encode(split_text("goodbye world\n" * 100)[0])

    char_tokenizer = build_tokenizer("char", read_corpus([path]))
    by_char = build_token_cache(read_corpus([path]), char_tokenizer, cache_dir, progress=False)
    assert by_char.built and by_char.manifest["inputs"]["tokenizer"] == char_tokenizer.spec()
    assert by_char.train_tokens.tolist() == char_tokenizer.encode(split_text("goodbye world\n" * 100)[0])

    renamed = write(tmp_path / "renamed.txt", path.read_bytes())
    assert build_token_cache(read_corpus([renamed]), char_tokenizer, cache_dir, progress=False).built
    assert not build_token_cache(read_corpus([renamed]), char_tokenizer, cache_dir, progress=False).built


def test_a_failed_build_leaves_the_previous_cache_whole_and_no_temporary_files(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "old text\n" * 100)
    cache_dir = tmp_path / "cache"
    build_token_cache(read_corpus([path]), gpt2, cache_dir, progress=False)
    files_before = sorted(os.listdir(cache_dir))

    class Failing(CountingTokenizer):
        def encode_batch(self, texts):
            raise KeyboardInterrupt

    write(path, "new text\n" * 100)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(read_corpus([path]), Failing(gpt2), cache_dir, progress=False)
    assert sorted(os.listdir(cache_dir)) == files_before
    assert open_token_cache(cache_dir).train_tokens.tolist() == gpt2.encode(split_text("old text\n" * 100)[0])


def test_a_damaged_cache_is_rebuilt_and_a_missing_one_is_reported(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "text\n" * 100)
    cache_dir = tmp_path / "cache"
    expected = build_token_cache(read_corpus([path]), gpt2, cache_dir, progress=False).train_tokens.tolist()
    with open(cache_dir / "tokens-train.bin", "r+b") as file:
        file.truncate(2)
    with pytest.raises(DataError, match="wrong size"):
        open_token_cache(cache_dir)
    rebuilt = build_token_cache(read_corpus([path]), gpt2, cache_dir, progress=False)
    assert rebuilt.built and rebuilt.train_tokens.tolist() == expected
    with pytest.raises(DataError, match="no token cache in"):
        open_token_cache(tmp_path / "elsewhere")


def test_token_files_are_uint16_up_to_65536_ids_and_uint32_beyond(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF]
    corpus = read_corpus([write(tmp_path / "wide.txt", "".join(chars))])
    tokenizer = build_tokenizer("char", corpus)
    assert tokenizer.vocab_size > 65536
    cache = build_token_cache(corpus, tokenizer, tmp_path / "cache", progress=False)
    assert cache.train_tokens.dtype == np.uint32 and cache.manifest["dtype"] == "uint32"
    train_text, val_text = split_text(corpus.text())
    assert cache.train_tokens.tolist() == tokenizer.encode(train_text)
    assert cache.val_tokens.tolist() == tokenizer.encode(val_text)
    assert max(cache.val_tokens) > 65535


def test_val_target_bytes_are_the_bytes_of_the_scored_validation_targets(tmp_path, gpt2):
    texts = ["Ünïcode first file\n" * 30, "second 文字 file\n" * 3]  # the split falls in the first file
    corpus = read_corpus([write(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)])
    for kind in ["gpt2", "char"]:
        tokenizer = build_tokenizer(kind, corpus)
        cache = build_token_cache(corpus, tokenizer, tmp_path / kind, progress=False)
        assert tokenizer.eot_id in cache.val_tokens.tolist()
        scored = [t for _, y in validation_batches(cache.val_tokens, 16, 4) for t in y[y != IGNORE_INDEX].tolist()]
        scored_bytes = sum(0 if t == tokenizer.eot_id else len(tokenizer.decode_bytes([t])) for t in scored)
        assert cache.val_target_bytes == scored_bytes < cache.val_bytes
        val_text = split_text(EOT_TEXT.join(texts))[1]
        assert cache.val_bytes == len(val_text.replace(EOT_TEXT, "").encode("utf-8"))


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("n, context_length, stride", [(100, 8, 8), (100, 8, 3), (9, 8, 5), (57, 4, 1), (64, 7, 10)])
def test_windows_are_slices_of_the_tokens_every_stride(n, context_length, stride):
    tokens = (np.arange(n) * 7 % 50257).astype(np.uint16)
    windows = TokenWindows(tokens, context_length, stride)
    starts = [s for s in range(0, n, stride) if s + context_length + 1 <= n]
    assert len(windows) == len(starts)
    inputs, targets = windows.windows(np.arange(len(windows)))
    assert inputs.dtype == np.int64 and inputs.shape == (len(starts), context_length)
    for row, start in enumerate(starts):
        assert inputs[row].tolist() == tokens[start : start + context_length].tolist()
        assert targets[row].tolist() == tokens[start + 1 : start + context_length + 1].tolist()


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    windows = TokenWindows(np.arange(1000), 9, 9)
    order = windows.epoch_order(0, seed=1)[:]
    assert sorted(order.tolist()) == list(range(len(windows)))
    assert order.tolist() == windows.epoch_order(0, seed=1)[:].tolist()
    assert order.tolist() != windows.epoch_order(1, seed=1)[:].tolist()
    assert order.tolist() != windows.epoch_order(0, seed=2)[:].tolist()


def first_tokens(batch):
    return batch.inputs[:, 0].tolist()


def test_batches_follow_each_epochs_order_and_resume_exactly(tmp_path):
    windows = TokenWindows(np.arange(230), 10, 10)  # 22 windows: 5 batches of 4 per epoch, 2 left over
    assert windows.batches_per_epoch(4) == 5
    stream = windows.batches(4, seed=7)
    seen = [next(stream) for _ in range(13)]
    for epoch in range(2):
        order = windows.epoch_order(epoch, seed=7)
        in_epoch = [batch for batch in seen if batch.epoch == epoch]
        assert [first_tokens(b) for b in in_epoch] == [(order[i : i + 4] * 10).tolist() for i in range(0, 20, 4)]
    assert seen[4].resume_at == (1, 0) and seen[5].resume_at == (1, 4)
    for k in [1, 4, 5, 9]:
        resumed = windows.batches(4, seed=7, start_epoch=seen[k - 1].resume_at[0], start_index=seen[k - 1].resume_at[1])
        for expected in seen[k:]:
            batch = next(resumed)
            assert (batch.epoch, batch.index, batch.resume_at) == (expected.epoch, expected.index, expected.resume_at)
            assert np.array_equal(batch.inputs, expected.inputs) and np.array_equal(batch.targets, expected.targets)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_take_disjoint_slices_whose_union_is_the_global_batch(world_size):
    windows = TokenWindows(np.arange(500), 10, 7)
    whole = windows.batches(8, seed=3)
    ranks = [windows.batches(8, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(20):
        batch, parts = next(whole), [next(stream) for stream in ranks]
        assert all(part.inputs.shape == (8 // world_size, 10) for part in parts)
        assert np.array_equal(np.concatenate([part.inputs for part in parts]), batch.inputs)
        assert np.array_equal(np.concatenate([part.targets for part in parts]), batch.targets)
        assert len({start for part in parts for start in first_tokens(part)}) == 8
        assert {part.resume_at for part in parts} == {batch.resume_at}


def test_bad_batch_requests_are_clear_errors():
    windows = TokenWindows(np.arange(50), 10, 10)  # 4 windows
    with pytest.raises(DataError, match="more than the 4 windows"):
        next(windows.batches(5, seed=0))
    with pytest.raises(DataError, match="multiple of the world size 3"):
        next(windows.batches(4, seed=0, world_size=3))
    with pytest.raises(DataError, match="start index 9"):
        next(windows.batches(2, seed=0, start_index=9))
    with pytest.raises(DataError, match="stride must be >= 1"):
        TokenWindows(np.arange(50), 10, 0)


def test_too_short_data_says_how_many_tokens_it_has_and_needs():
    with pytest.raises(DataError, match="training split has 8 tokens but needs at least 9 .context length 8"):
        TokenWindows(np.arange(8), 8, 8)
    with pytest.raises(DataError, match="validation split has 3 tokens but needs at least 5"):
        next(validation_batches(np.arange(3), 4, 2))


@pytest.mark.parametrize("n", [9, 10, 17, 33, 100, 101])
@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (3, 1), (2, 2), (4, 3)])
def test_validation_scores_every_target_exactly_once(n, batch_size, world_size):
    context_length = 8
    tokens = np.arange(1000, 1000 + n)
    scored = []
    for rank in range(world_size):
        for inputs, targets in validation_batches(tokens, context_length, batch_size, rank, world_size):
            assert inputs.shape == targets.shape and inputs.shape[1] == context_length and len(inputs) <= batch_size
            counted = targets != IGNORE_INDEX
            assert np.array_equal(targets[counted], inputs[counted] + 1)  # next token of its own window
            scored += targets[counted].tolist()
    assert sorted(scored) == tokens[1:].tolist()
