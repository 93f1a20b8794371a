"""The token cache without re-reading: reuse from size and modification time, hashing only what looks
touched; change detection while building; concurrent builds; caches of a whole text for evaluation."""

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest
from data_helpers import CountingTokenizer, write

from gptlab.data import (
    IGNORE_INDEX,
    DataError,
    build_token_cache,
    build_tokenizer,
    default_cache_dir,
    read_corpus,
    split_text,
    validation_batches,
)
from gptlab.data.cache import MANIFEST_FILE, PARTIAL_FILE, RACY_WINDOW_NS
from gptlab.tokenizer import EOT_TEXT

HOUR_NS = 3600 * 10**9


def age(path, ns):
    """Set path's modification time to ns before now, as if it were written then."""
    when = time.time_ns() - ns
    os.utime(path, ns=(when, when))
    return when


def swap_content_keeping_size_and_time(path, text):
    """Change a file's bytes but not its size or modification time: only reading it could tell."""
    mtime = path.stat().st_mtime_ns
    assert len(text.encode("utf-8")) == path.stat().st_size
    write(path, text)
    os.utime(path, ns=(mtime, mtime))


def manifest(cache_dir):
    return json.loads((cache_dir / MANIFEST_FILE).read_text())


def test_an_unchanged_corpus_is_reused_without_reading_its_files(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "old words\n" * 100)
    age(path, HOUR_NS)
    counting = CountingTokenizer(gpt2)
    first = build_token_cache(read_corpus([path]), counting, tmp_path / "cache", progress=False)
    calls = counting.calls
    swap_content_keeping_size_and_time(path, "new words\n" * 100)
    again = build_token_cache(read_corpus([path]), counting, tmp_path / "cache", progress=False)
    # The old tokens come back: the file was trusted from its size and time, never read.
    assert not again.built and counting.calls == calls
    assert again.train_tokens.tolist() == first.train_tokens.tolist() == gpt2.encode(split_text("old words\n" * 100)[0])


def test_a_file_written_just_before_it_was_checked_is_hashed_again(tmp_path, gpt2):
    # Its time is within RACY_WINDOW_NS of the check: a change right after could have kept that time
    # on a file system with coarse timestamps, so the time is not trusted.
    path = write(tmp_path / "t.txt", "old words\n" * 100)
    first = build_token_cache(read_corpus([path]), gpt2, tmp_path / "cache", progress=False)
    assert first.manifest["checked_ns"] - RACY_WINDOW_NS < path.stat().st_mtime_ns
    swap_content_keeping_size_and_time(path, "new words\n" * 100)
    again = build_token_cache(read_corpus([path]), gpt2, tmp_path / "cache", progress=False)
    assert again.built and again.train_tokens.tolist() == gpt2.encode(split_text("new words\n" * 100)[0])


def test_a_touched_file_is_hashed_once_and_its_new_time_recorded(tmp_path, gpt2):
    paths = [write(tmp_path / f"{i}.txt", f"file {i} text\n" * 50) for i in range(2)]
    for path in paths:
        age(path, HOUR_NS)
    cache_dir = tmp_path / "cache"
    counting = CountingTokenizer(gpt2)
    first = build_token_cache(read_corpus(paths), counting, cache_dir, progress=False)
    calls, before = counting.calls, manifest(cache_dir)

    touched_at = age(paths[1], HOUR_NS // 2)  # same content, new time
    again = build_token_cache(read_corpus(paths), counting, cache_dir, progress=False)
    assert not again.built and counting.calls == calls
    after = manifest(cache_dir)
    untouched = before["inputs"]["sources"][0]["mtime_ns"]
    assert [source["mtime_ns"] for source in after["inputs"]["sources"]] == [untouched, touched_at]
    assert after["checked_ns"] > before["checked_ns"]
    assert {k: v for k, v in after.items() if k not in ("inputs", "checked_ns")} == {
        k: v for k, v in before.items() if k not in ("inputs", "checked_ns")
    }
    # With the new time recorded, the file is trusted again without being read.
    swap_content_keeping_size_and_time(paths[1], "file 1 TEXT\n" * 50)
    third = build_token_cache(read_corpus(paths), counting, cache_dir, progress=False)
    assert not third.built and third.val_tokens.tolist() == first.val_tokens.tolist()


class ChangingTokenizer(CountingTokenizer):
    """Rewrites a file when asked to encode for the first time: a file that changes during a build."""

    def __init__(self, tokenizer, path, text):
        super().__init__(tokenizer)
        self.path, self.text = path, text

    def encode_batch(self, texts):
        if not self.calls:
            write(self.path, self.text)
        return super().encode_batch(texts)


@pytest.mark.parametrize("new_text", ["second file, edited\n" * 20, "second file, longer now\n" * 40])
def test_a_file_that_changes_while_the_cache_is_built_is_reported(tmp_path, gpt2, new_text):
    first = write(tmp_path / "1.txt", "first file\n" * 200)
    second = write(tmp_path / "2.txt", "second file, as read\n" * 20)
    corpus = read_corpus([first, second])
    changing = ChangingTokenizer(gpt2, second, new_text)
    with pytest.raises(DataError, match=r"2.txt changed while it was being tokenized; run the command again"):
        build_token_cache(corpus, changing, tmp_path / "cache", progress=False, chunk_chars=100)
    assert os.listdir(tmp_path / "cache") == [".lock"]  # no manifest, no token or temporary files


class MeetingTokenizer(CountingTokenizer):
    """Waits at a barrier before encoding anything: the builds that use it all run at once."""

    def __init__(self, tokenizer, barrier):
        super().__init__(tokenizer)
        self.barrier = barrier

    def encode_batch(self, texts):
        if not self.calls:
            self.barrier.wait(timeout=60)  # every builder is past the cache check, none has renamed yet
        return super().encode_batch(texts)


def build_together(corpus, tokenizer, cache_dir, barrier, results):
    cache = build_token_cache(corpus, MeetingTokenizer(tokenizer, barrier), cache_dir, progress=False, chunk_chars=200)
    results.put((cache.built, cache.train_tokens.tolist(), cache.val_tokens.tolist()))


def test_builders_of_one_cache_at_once_each_leave_a_whole_cache(tmp_path, gpt2, monkeypatch):
    # As ranks on several nodes sharing one cache folder would where its lock does not hold across machines
    # (the lock is taken away here): each writes its own temporary files and renames them into place, so
    # whichever rename comes last, the folder holds one whole cache. Threads stand in for the processes:
    # forking after tiktoken's thread pool has run can deadlock the child.
    monkeypatch.setattr("gptlab.data.cache.build_lock", lambda directory: contextlib.nullcontext())
    text = "Shared storage, several nodes, one cache folder.\n" * 400
    corpus, cache_dir, count = read_corpus([write(tmp_path / "text.txt", text)]), tmp_path / "cache", 3
    barrier, results = threading.Barrier(count), queue.Queue()
    builders = [
        threading.Thread(target=build_together, args=(corpus, gpt2, cache_dir, barrier, results)) for _ in range(count)
    ]
    for builder in builders:
        builder.start()
    built = [results.get(timeout=60) for _ in builders]
    for builder in builders:
        builder.join(timeout=60)
    train_text, val_text = split_text(text)
    expected = (True, gpt2.encode(train_text), gpt2.encode(val_text))
    assert built == [expected] * count  # all three built, at the same time
    assert sorted(os.listdir(cache_dir)) == ["tokens-train.bin", "tokens-val.bin", "tokens.json"]
    cache = build_token_cache(corpus, gpt2, cache_dir, progress=False)
    assert not cache.built and (True, cache.train_tokens.tolist(), cache.val_tokens.tolist()) == expected


def test_a_builder_returns_its_own_cache_when_another_starts_replacing_it(tmp_path, gpt2, monkeypatch):
    # The interleaving that the threads above hit only now and then: just after this build writes its
    # manifest, another builder removes it and renames different files into place (here: another text's).
    import gptlab.data.cache as cache_module

    text, other = "this build's text\n" * 100, "another build's text, longer\n" * 300
    corpus, cache_dir = read_corpus([write(tmp_path / "text.txt", text)]), tmp_path / "cache"
    other_cache = build_token_cache(
        read_corpus([write(tmp_path / "other.txt", other)]), gpt2, tmp_path / "other", progress=False
    )
    write_manifest = cache_module.write_manifest

    def write_then_lose(directory, manifest):
        write_manifest(directory, manifest)
        if directory == cache_dir:
            (directory / MANIFEST_FILE).unlink()
            for name in ("tokens-train.bin", "tokens-val.bin"):
                os.replace(other_cache.directory / name, directory / name)

    monkeypatch.setattr(cache_module, "write_manifest", write_then_lose)
    cache = build_token_cache(corpus, gpt2, cache_dir, progress=False)
    train_text, val_text = split_text(text)
    assert cache.built and cache.train_tokens.tolist() == gpt2.encode(train_text)
    assert cache.val_tokens.tolist() == gpt2.encode(val_text)


# ---------------------------------------------------------------- a whole text for evaluation


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_an_evaluation_cache_puts_every_token_on_the_validation_side(tmp_path, kind):
    texts = ["Ünïcode first file\n" * 30, "second 文字 file\n" * 3]
    corpus = read_corpus([write(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)])
    tokenizer = build_tokenizer(kind, corpus)
    cache = build_token_cache(corpus, tokenizer, tmp_path / "cache", progress=False, train_fraction=0.0)
    joined = EOT_TEXT.join(texts)
    assert len(cache.train_tokens) == 0 and cache.manifest["split_char"] == 0
    assert cache.val_tokens.tolist() == tokenizer.encode(joined, allow_special=True)
    # The denominator is the bytes of what validation_batches scores: every token after the first.
    scored = [t for _, y in validation_batches(cache.val_tokens, 16, 4) for t in y[y != IGNORE_INDEX].tolist()]
    assert sorted(scored) == sorted(cache.val_tokens[1:].tolist())
    scored_bytes = sum(0 if t == tokenizer.eot_id else len(tokenizer.decode_bytes([t])) for t in scored)
    first_bytes = len(tokenizer.decode_bytes(cache.val_tokens[:1].tolist()))
    assert cache.val_target_bytes == scored_bytes == len(joined.replace(EOT_TEXT, "").encode("utf-8")) - first_bytes


def test_evaluation_and_training_caches_never_take_each_other(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "some text to score\n" * 50)
    age(path, HOUR_NS)
    corpus, cache_dir = read_corpus([path]), tmp_path / "cache"
    assert build_token_cache(corpus, gpt2, cache_dir, progress=False).built
    whole = build_token_cache(corpus, gpt2, cache_dir, progress=False, train_fraction=0.0)
    assert whole.built and whole.manifest["inputs"]["train_fraction"] == 0.0 and len(whole.train_tokens) == 0
    assert not build_token_cache(corpus, gpt2, cache_dir, progress=False, train_fraction=0.0).built
    assert build_token_cache(corpus, gpt2, cache_dir, progress=False).built
    with pytest.raises(DataError, match="train_fraction must be between 0 and 1, got 1.5"):
        build_token_cache(corpus, gpt2, cache_dir, progress=False, train_fraction=1.5)


def test_default_cache_folders_differ_by_sources_tokenizer_and_split(tmp_path, gpt2, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    paths = [write(tmp_path / f"{i}.txt", f"text {i}\n") for i in range(2)]
    corpus = read_corpus([paths[0]])
    folder = default_cache_dir(corpus, gpt2)
    assert folder.parent == tmp_path / "xdg" / "gptlab" / "tokens"
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir(read_corpus(["0.txt"]), gpt2) == folder  # the same file named another way
    others = [
        default_cache_dir(corpus, gpt2, train_fraction=0.0),
        default_cache_dir(read_corpus(paths), gpt2),
        default_cache_dir(corpus, build_tokenizer("char", corpus)),
    ]
    assert len({folder, *others}) == 4


def test_a_file_gone_before_the_build_is_a_clear_error(tmp_path, gpt2):
    path = write(tmp_path / "t.txt", "text\n" * 10)
    corpus = read_corpus([path])
    path.unlink()
    with pytest.raises(DataError, match=r"cannot read .*t.txt: No such file or directory; check the data paths"):
        build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False)


BUILD_AT_ONCE = """
import sys
from gptlab.data import build_token_cache, read_corpus
from gptlab.tokenizer import load_tokenizer
cache = build_token_cache(read_corpus([sys.argv[1]]), load_tokenizer("gpt2"), sys.argv[2], progress=False)
print(int(cache.built), len(cache.train_tokens))
"""


def test_processes_building_one_cache_at_once_take_turns(tmp_path):
    """Three processes start on the same cache together: one builds it while the others wait on its lock
    (not in a collective), then they find it whole and reuse it."""
    text = write(tmp_path / "text.txt", "Some text to tokenize, again and again.\n" * 20_000)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_AT_ONCE, str(text), str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [process.communicate(timeout=120)[0].split() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert sorted(built for built, _ in results) == ["0", "0", "1"]
    assert len({tokens for _, tokens in results}) == 1


class InterruptedTokenizer(CountingTokenizer):
    """Ctrl-C in the middle of a build: encode_batch raises KeyboardInterrupt at its `at`-th call."""

    def __init__(self, tokenizer, at: int):
        super().__init__(tokenizer)
        self.at, self.encoded_chars = at, 0

    def encode_batch(self, texts):
        if self.calls + 1 == self.at:
            raise KeyboardInterrupt
        self.encoded_chars += sum(map(len, texts))
        return super().encode_batch(texts)


def shards(tmp_path, count: int = 6) -> list:
    return [
        write(tmp_path / f"shard-{i}.txt", f"Shard {i}: some words, and numbers {i * 7}.\n" * 30) for i in range(count)
    ]


def test_an_interrupted_build_goes_on_at_the_next_document_and_gives_a_fresh_builds_cache(tmp_path, gpt2):
    paths = shards(tmp_path)
    corpus = read_corpus([str(path) for path in paths])
    fresh = build_token_cache(corpus, gpt2, tmp_path / "fresh", progress=False, chunk_chars=1000)
    cache_dir = tmp_path / "cache"
    # a checkpoint after every document (checkpoint_chars=1); the interruption comes in the fourth
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(
            corpus, InterruptedTokenizer(gpt2, at=4), cache_dir, progress=False, chunk_chars=1000, checkpoint_chars=1
        )
    record = json.loads((cache_dir / PARTIAL_FILE).read_text())
    assert record["documents"] == 3 and not (cache_dir / MANIFEST_FILE).exists()
    kept = sum(len(path.read_text()) for path in paths[:3]) + 2 * len(EOT_TEXT)
    assert record["position"] == kept
    again = InterruptedTokenizer(gpt2, at=0)
    cache = build_token_cache(corpus, again, cache_dir, progress=False, chunk_chars=1000, checkpoint_chars=1)
    assert cache.built and cache.resumed_chars == kept
    assert again.encoded_chars == fresh.manifest["total_chars"] - kept - 3 * len(EOT_TEXT)  # the rest, once
    assert cache.train_tokens.tolist() == fresh.train_tokens.tolist()
    assert cache.val_tokens.tolist() == fresh.val_tokens.tolist()
    assert {**cache.manifest, "checked_ns": 0} == {**fresh.manifest, "checked_ns": 0}
    assert sorted(os.listdir(cache_dir)) == [".lock", "tokens-train.bin", "tokens-val.bin", "tokens.json"]


@pytest.mark.parametrize("change", ["source", "tokenizer"])
def test_an_interrupted_build_over_other_inputs_starts_over(tmp_path, gpt2, change):
    paths = shards(tmp_path)
    corpus, cache_dir = read_corpus([str(path) for path in paths]), tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(
            corpus, InterruptedTokenizer(gpt2, at=4), cache_dir, progress=False, chunk_chars=1000, checkpoint_chars=1
        )
    tokenizer = gpt2
    if change == "source":
        write(paths[1], "Shard 1, edited since.\n" * 30)
        corpus = read_corpus([str(path) for path in paths])
    else:
        tokenizer = build_tokenizer("gpt2", corpus, merges=100)
    cache = build_token_cache(corpus, tokenizer, cache_dir, progress=False, chunk_chars=1000, checkpoint_chars=1)
    fresh = build_token_cache(corpus, tokenizer, tmp_path / "fresh", progress=False, chunk_chars=1000)
    assert cache.resumed_chars == 0 and cache.train_tokens.tolist() == fresh.train_tokens.tolist()
    assert sorted(os.listdir(cache_dir)) == [".lock", "tokens-train.bin", "tokens-val.bin", "tokens.json"]


def test_gptlab_prepare_says_it_went_on_with_an_interrupted_build(tmp_path, capsys):
    from gptlab.cli import main
    from gptlab.tokenizer import load_tokenizer

    paths = shards(tmp_path)
    corpus, out = read_corpus([str(path) for path in paths]), tmp_path / "prepared"
    tokenizer = load_tokenizer("gpt2", merges=128)  # what prepare gives a new model
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(
            corpus, InterruptedTokenizer(tokenizer, at=3), out, progress=False, chunk_chars=1000, checkpoint_chars=1
        )
    kept = sum(len(path.read_text()) for path in paths[:2]) + len(EOT_TEXT)
    assert main(["prepare", "--data", *map(str, paths), "--out", str(out), "--no-progress"]) == 0
    total = json.loads((out / MANIFEST_FILE).read_text())["total_chars"]
    assert f"; went on with an interrupted build, whose first {kept:,} characters ({kept / total:.0%}) it kept" in (
        capsys.readouterr().out
    )
