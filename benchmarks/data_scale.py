"""Data pipeline at scale: build the GPT-2 token cache of a large synthetic corpus, then restart.

Writes a corpus of --size bytes in --files files (lines of words drawn from the embedded corpus,
pydoc_data.topics, with its word frequencies), then, each in a new process:
  build     read_corpus + build_token_cache from nothing: time, MB/s, peak RSS (ru_maxrss of that process)
  prepare   `gptlab prepare` of the same corpus into a cache of its own (GPT-2's whole BPE, as build): the
            same measures, and its speed against build's
  restart   read_corpus + build_token_cache again, as a restarted run (or another rank) does: the cache is
            reused from the files' sizes and modification times
  baseline  what every restart and every rank did before: decode and SHA-256-hash the whole corpus
            (the previous read_corpus), measured in the same run; the ratio is baseline / restart
and the memory of one epoch's order at stride 1 and context 1024: np.random.permutation's int64 array
(the previous order; 8 bytes per window, checked on 10M windows) against EpochOrder (tracemalloc peak of
building it and looking up a batch of 512). The files are read from the page cache after they are
written, so the times are of warm reads.

    .venv/bin/python benchmarks/data_scale.py [--size 2G] [--files 8] [--work-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import machine_info, timed, write_report

from gptlab.data import EpochOrder, TokenWindows, build_token_cache, default_corpus_text, read_corpus
from gptlab.data.formats import texts
from gptlab.tokenizer import load_tokenizer
from gptlab.training.pipeline import prepare

CONTEXT_LENGTH = 1024
BATCH_SIZE = 512
WRITE_BLOCK_LINES = 100_000  # about 8 MB of text per write


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def write_corpus(folder: Path, size: int, n_files: int, seed: int = 0) -> list[Path]:
    """n_files files of size // n_files bytes each: lines of 4 to 20 words sampled from the embedded corpus
    (so with its word frequencies), a blank line between paragraphs now and then."""
    rng = np.random.default_rng(seed)
    words = np.array(default_corpus_text().split(), dtype=object)
    # A pool of distinct lines, sampled again for each block: generating every word anew is 20x slower.
    lengths = rng.integers(4, 21, 200_000)
    starts = np.cumsum(lengths) - lengths
    drawn = words[rng.integers(0, len(words), lengths.sum())]
    pool = np.array(
        [" ".join(drawn[s : s + n]) + ("\n\n" if rng.random() < 0.1 else "\n") for s, n in zip(starts, lengths)],
        dtype=object,
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n_files):
        path, remaining = folder / f"part-{index:03d}.txt", size // n_files
        with open(path, "wb") as file:
            while remaining > 0:
                data = "".join(pool[rng.integers(0, len(pool), WRITE_BLOCK_LINES)]).encode("utf-8")
                if len(data) > remaining:
                    cut = remaining
                    while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the cut would split a character
                        cut -= 1
                    data = data[:cut]
                    remaining = len(data)  # this block is the file's last
                file.write(data)
                remaining -= len(data)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# What each child process runs (a new process each: peak RSS and restart times are its own)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_build(corpus_dir: Path, cache_dir: Path) -> dict:
    tokenizer = load_tokenizer("gpt2")
    before = peak_rss_bytes()
    cache, seconds = timed(lambda: build_token_cache(read_corpus([corpus_dir]), tokenizer, cache_dir, progress=False))
    return {
        "built": cache.built,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_build_bytes": before,
        "train_tokens": len(cache.train_tokens),
        "val_tokens": len(cache.val_tokens),
    }


def child_prepare(corpus_dir: Path, cache_dir: Path) -> dict:
    """`gptlab prepare` (training.pipeline.prepare, what the command runs) into a cache of its own."""
    before = peak_rss_bytes()
    cache, seconds = timed(
        lambda: prepare(
            [str(corpus_dir)], cache_dir / "prepared", progress=False, log=lambda line: None, tokenizer="gpt2"
        )
    )
    return {
        "built": cache.built,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_build_bytes": before,
        "tokens": len(cache.train_tokens) + len(cache.val_tokens),
    }


def child_restart(corpus_dir: Path, cache_dir: Path) -> dict:
    tokenizer = load_tokenizer("gpt2")
    corpus, read_seconds = timed(lambda: read_corpus([corpus_dir]))
    cache, seconds = timed(lambda: build_token_cache(corpus, tokenizer, cache_dir, progress=False))
    return {
        "built": cache.built,
        "read_corpus_seconds": read_seconds,
        "seconds": read_seconds + seconds,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def child_baseline(corpus_dir: Path, cache_dir: Path) -> dict:
    def decode_and_hash() -> int:
        chars = 0
        for path in sorted(corpus_dir.iterdir()):
            chars += sum(len(block) for block in texts(str(path), "strict", None, hashlib.sha256()))
        return chars

    chars, seconds = timed(decode_and_hash)
    return {"seconds": seconds, "chars": chars}


CHILDREN = {"build": child_build, "prepare": child_prepare, "restart": child_restart, "baseline": child_baseline}


def run_child(name: str, corpus_dir: Path, cache_dir: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, str(corpus_dir), str(cache_dir)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"the {name} process failed:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start  # with Python's and torch's imports
    return result


# ----------------------------------------------------------------------------------------------
# Epoch order memory


def epoch_order_memory(n_windows: int) -> dict:
    tracemalloc.start()
    np.random.default_rng([0, 0]).permutation(10**7)
    old_per_window = tracemalloc.get_traced_memory()[1] / 10**7
    tracemalloc.reset_peak()
    order = EpochOrder(n_windows, 0, 0)
    order[0:BATCH_SIZE]
    new_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _, lookup = timed(lambda: [order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for i in range(100)])
    return {
        "windows": n_windows,
        "old_bytes_per_window_measured": old_per_window,
        "old_bytes": 8 * n_windows,
        "new_peak_bytes": new_peak,
        "new_lookup_seconds_per_batch": lookup / 100,
        "batch_size": BATCH_SIZE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"), help="corpus bytes (e.g. 2G, 50M)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, help="where the corpus and cache go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_scale.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, corpus_dir, cache_dir = args.child
        print(json.dumps(CHILDREN[name](Path(corpus_dir), Path(cache_dir))))
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="data_scale-"))
    corpus_dir, cache_dir = work / "corpus", work / "cache"
    try:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        print(f"writing a {args.size / 1e6:,.0f} MB corpus in {args.files} files under {corpus_dir} ...", flush=True)
        paths, write_seconds = timed(lambda: write_corpus(corpus_dir, args.size, args.files))
        corpus_bytes = sum(path.stat().st_size for path in paths)
        print("building the GPT-2 token cache (a new process) ...", flush=True)
        build = run_child("build", corpus_dir, cache_dir)
        print("gptlab prepare of the same corpus (a new process) ...", flush=True)
        prepared = run_child("prepare", corpus_dir, cache_dir)
        print("restarting (a new process) and measuring the baseline (decode + SHA-256 of the corpus) ...", flush=True)
        restart = run_child("restart", corpus_dir, cache_dir)
        baseline = run_child("baseline", corpus_dir, cache_dir)
        windows = TokenWindows(np.broadcast_to(np.uint16(0), (build["train_tokens"],)), CONTEXT_LENGTH, stride=1)
        order = epoch_order_memory(len(windows))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    assert build["built"] and prepared["built"] and not restart["built"]
    mb = corpus_bytes / 1e6
    print(f"\ndata at scale: {mb:,.0f} MB in {args.files} files (written in {write_seconds:.0f} s)")
    tokens = build["train_tokens"] + build["val_tokens"]
    print(
        f"build:    {build['seconds']:.1f} s, {mb / build['seconds']:.1f} MB/s, {tokens:,} tokens; "
        f"peak RSS {build['peak_rss_bytes'] / 2**20:,.0f} MiB "
        f"({build['rss_before_build_bytes'] / 2**20:,.0f} MiB before building: Python, torch, the tokenizer)"
    )
    print(
        f"prepare:  {prepared['seconds']:.1f} s, {mb / prepared['seconds']:.1f} MB/s, "
        f"{prepared['tokens'] / prepared['seconds']:,.0f} tokens/s; peak RSS {prepared['peak_rss_bytes'] / 2**20:,.0f} MiB; "
        f"{build['seconds'] / prepared['seconds']:.2f}x the speed of the in-training build above (the same tokens: "
        f"{prepared['tokens'] == tokens})"
    )
    print(
        f"restart:  {restart['seconds'] * 1000:.1f} ms (read_corpus {restart['read_corpus_seconds'] * 1000:.1f} ms); "
        f"{restart['process_seconds']:.1f} s for the whole process with imports"
    )
    print(
        f"baseline: {baseline['seconds']:.1f} s to decode and hash the corpus at every start (the previous "
        f"read_corpus): {baseline['seconds'] / restart['seconds']:,.0f}x the restart"
    )
    print(
        f"epoch order at stride 1, context {CONTEXT_LENGTH}: {order['windows']:,} windows; np.random.permutation "
        f"{order['old_bytes'] / 2**30:,.2f} GiB ({order['old_bytes_per_window_measured']:.2f} bytes per window "
        f"measured) vs EpochOrder {order['new_peak_bytes'] / 1024:,.1f} KiB peak, "
        f"{order['new_lookup_seconds_per_batch'] * 1e6:,.0f} us per batch of {BATCH_SIZE}"
    )
    write_report(
        {
            "machine": machine_info(),
            "size_bytes": corpus_bytes,
            "files": args.files,
            "write_seconds": write_seconds,
            "build": build,
            "build_mb_per_s": mb / build["seconds"],
            "prepare": prepared,
            "prepare_over_build_speed": build["seconds"] / prepared["seconds"],
            "restart": restart,
            "baseline": baseline,
            "baseline_over_restart": baseline["seconds"] / restart["seconds"],
            "epoch_order": order,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
