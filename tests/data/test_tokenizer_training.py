"""`gptlab tokenizer train`: a byte-level BPE learned from one's own corpus, checked against Hugging Face's
tokenizers and transformers' AutoTokenizer, carried by checkpoints and exports, and served by /tokenize."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptlab.cli import main
from gptlab.data import read_corpus, split_index
from gptlab.data.tokenizer_training import train_bpe
from gptlab.errors import UserError
from gptlab.tokenizer import (
    EOT_TEXT,
    TOKENIZER_FILE,
    GPT2Tokenizer,
    bpe_ranks,
    load_tokenizer,
    read_tokenizer_folder,
    tokenizer_from_spec,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from run_helpers import TINY_RUN  # noqa: E402

WORDS = (
    "the quick brown fox jumps over lazy dogs while naïve café owners sell crème brûlée "
    "Größe Straße über schön Ελληνικά γλώσσα русский язык программа 東京 タワー 日本語 の 文章 "
    "1,234 56.78 x = f(y) + 1; # note -- 'quoted' \"double\" 🙂 🚀"
).split()
# Held-out text with what training never saw: Korean, another emoji, tabs and runs of spaces.
UNSEEN = "한국어 문장 🦊\tTabs\t and    spaces; naïve Straße 東京 — x=1_000 <|endoftext|> ok\n\n end"


SYLLABLES = "ka re ßo nä ti λο γι ру ска 東 タ の mi xu 🙂".split()


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of WORDS and of made-up words of SYLLABLES, so there are enough pairs to merge."""
    rng = random.Random(seed)
    words = [*WORDS, *("".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(300))]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + rng.choice([". ", ".\n"]) for _ in range(count)
    ]


def reference_bpe(text: str, vocab_size: int) -> Tokenizer:
    """Hugging Face's tokenizers trained with GPT-2's byte-level pre-tokenization, as its docs show."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    learner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    learner.train_from_iterator([text], trainer)
    return learner


@pytest.fixture(scope="module")
def corpus_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text("".join(sentences(600)), "utf-8")
    return path


@pytest.fixture(scope="module")
def folder(corpus_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus_text), "--vocab-size", "600", "--out", str(out)]) == 0
    return out


def test_merges_are_what_tokenizers_learns_from_the_training_side_only(corpus_text, folder):
    text = corpus_text.read_text("utf-8")
    learner = reference_bpe(text[: split_index(len(text))], 600)  # the held-out 10% must not shape the merges
    merges = [" ".join(merge) for merge in json.loads(learner.to_str())["model"]["merges"]]
    spec = read_tokenizer_folder(folder).spec()
    assert spec == {"type": "bpe", "merges": merges}
    assert len(merges) == 600 - 256 - 1


@pytest.mark.parametrize("text", [UNSEEN, "".join(sentences(50, seed=7)), " leading space and trailing   "])
def test_gptlab_tokenizers_and_autotokenizer_give_the_same_ids(folder, text):
    transformers = pytest.importorskip("transformers")
    ours = read_tokenizer_folder(folder)
    rust = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    plain = text.replace(EOT_TEXT, "")  # transformers reads the marker as the special token; see allow_special
    assert ours.encode(plain) == rust.encode(plain).ids
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert auto(text)["input_ids"] == ours.encode(text, allow_special=True)
    assert ours.decode(ours.encode(text)) == text
    assert ours.vocab_size == 600 and ours.eot_id == 599 == auto.convert_tokens_to_ids(EOT_TEXT)


def test_compression_is_bytes_per_token_on_the_held_out_text_against_gpt2(corpus_text, folder, capsys):
    text = corpus_text.read_text("utf-8")
    held_out = text[split_index(len(text)) :]
    ours, gpt2 = read_tokenizer_folder(folder), load_tokenizer("gpt2")
    record = json.loads((folder / TOKENIZER_FILE).read_text("utf-8"))
    size = len(held_out.encode("utf-8"))
    assert record["compression"] == {
        "held_out_bytes": size,
        "tokens": len(ours.encode(held_out)),
        "gpt2_tokens": len(gpt2.encode(held_out)),
    }
    assert record["trained_on"]["train_chars"] == split_index(len(text))
    trained = train_bpe(read_corpus([str(corpus_text)]), 600)
    assert trained.summary() == (
        f"vocabulary: 600 ids, learned from {split_index(len(text)):,} characters; held-out compression: "
        f"{size / len(ours.encode(held_out)):.3f} bytes per token (GPT-2's BPE: "
        f"{size / len(gpt2.encode(held_out)):.3f}) on {size:,} bytes"
    )


def test_every_corpus_format_gives_the_same_tokenizer_as_its_text(tmp_path):
    records = sentences(300, seed=3)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records), "utf-8")
    pq.write_table(pa.table({"text": records}), tmp_path / "a.parquet", row_group_size=64)
    # a .txt of the same documents, one per file, joins the same way (corpus.py)
    texts = tmp_path / "texts"
    texts.mkdir()
    for index, record in enumerate(records):
        (texts / f"{index:04}.txt").write_text(record, "utf-8")
    specs = [
        train_bpe(read_corpus([str(path)]), 400).tokenizer.spec()
        for path in (tmp_path / "a.jsonl", tmp_path / "a.parquet", texts)
    ]
    assert specs[0] == specs[1] == specs[2]


def test_a_vocabulary_larger_than_the_text_has_pairs_for_says_how_many_it_made(corpus_text, tmp_path, capsys):
    out = tmp_path / "big"
    assert main(["tokenizer", "train", "--data", str(corpus_text), "--vocab-size", "50000", "--out", str(out)]) == 0
    made = read_tokenizer_folder(out).vocab_size
    assert made < 50000
    assert f"vocabulary: {made:,} ids (of 50,000 asked for: the text has no more pairs)" in capsys.readouterr().out


def test_a_model_trained_with_it_carries_it_through_checkpoints_and_exports(folder, corpus_text, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptlab.checkpoint import read_config
    from gptlab.loading import load_model

    run = tmp_path / "run"
    assert main(["train", "--tokenizer", str(folder), "--data", str(corpus_text), "--out", str(run), *TINY_RUN]) == 0
    model_cfg, tokenizer, _ = read_config(run / "best")
    assert tokenizer.spec() == read_tokenizer_folder(folder).spec() and model_cfg.vocab_size == 600
    assert main(["convert", str(run / "best"), str(tmp_path / "hf"), "--to-hf"]) == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(UNSEEN)["input_ids"] == tokenizer.encode(UNSEEN, allow_special=True)
    loaded, hf_tokenizer = load_model(tmp_path / "hf")
    assert hf_tokenizer.spec() == tokenizer.spec()  # read back as the trained BPE, not as GPT-2's


def test_a_prepared_cache_and_the_server_use_it(folder, corpus_text, tmp_path):
    from gptlab.data import open_token_cache
    from gptlab.serve.background import BackgroundServer

    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(corpus_text), "--tokenizer", str(folder), "--out", str(cache)]) == 0
    assert open_token_cache(cache).manifest["inputs"]["tokenizer"] == read_tokenizer_folder(folder).spec()
    run = tmp_path / "run"
    assert main(["train", "--prepared", str(cache), "--out", str(run), *TINY_RUN]) == 0
    tokenizer = read_tokenizer_folder(folder)
    with BackgroundServer(run / "best") as server:
        request = json.dumps({"content": UNSEEN}).encode()
        import urllib.request

        reply = urllib.request.urlopen(
            urllib.request.Request(server.url + "/tokenize", request, {"Content-Type": "application/json"}), timeout=30
        )
        assert json.loads(reply.read())["tokens"] == tokenizer.encode(UNSEEN, allow_special=True)


def test_bad_input_gets_one_line_and_nothing_is_lost(folder, corpus_text, tmp_path, capsys):
    before = (folder / TOKENIZER_FILE).read_bytes()
    cases = [
        (["--vocab-size", "100", "--out", str(tmp_path / "x")], "--vocab-size must be at least 258"),
        (["--vocab-size", "500", "--out", str(folder)], f"{folder} already holds a tokenizer; choose another --out"),
        (["--vocab-size", "500", "--out", str(corpus_text)], f"--out {corpus_text} is a file"),
    ]
    for options, message in cases:
        assert main(["tokenizer", "train", "--data", str(corpus_text), *options]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gptlab tokenizer: error: {message}") and err.count("\n") == 1
    assert (folder / TOKENIZER_FILE).read_bytes() == before and not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / TOKENIZER_FILE).write_text("{not json")
    for where, message in [
        (tmp_path / "missing", "is neither gpt2, char nor a tokenizer folder"),
        (empty, f"holds no {TOKENIZER_FILE}, so it is not a tokenizer folder"),
        (tmp_path / "broken", "is not valid JSON"),
    ]:
        assert (
            main(
                [
                    "train",
                    "--tokenizer",
                    str(where),
                    "--data",
                    str(corpus_text),
                    "--out",
                    str(tmp_path / "r"),
                    *TINY_RUN,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert message in err and "gptlab tokenizer train" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_gpt2s_own_merges_make_gpt2s_ranks_and_bad_merges_are_named():
    gpt2 = load_tokenizer("gpt2")
    from gptlab.hf_format import bpe_vocabulary

    vocab, lines = bpe_vocabulary(gpt2)
    assert bpe_ranks(lines[1:]) == gpt2.ranks
    trained = GPT2Tokenizer.from_merges(lines[1:101])
    assert trained.ranks == load_tokenizer("gpt2", merges=100).ranks  # the same BPE, under its own spec
    assert tokenizer_from_spec(trained.spec()).encode(UNSEEN) == load_tokenizer("gpt2", merges=100).encode(UNSEEN)
    with pytest.raises(UserError, match=r"merge 2 \('a b c'\) is not two tokens"):
        bpe_ranks(["Ġ t", "a b c"])
    with pytest.raises(UserError, match=r"merge 2 \('Ġ t'\) makes a token an earlier merge"):
        bpe_ranks(["Ġ t", "Ġ t"])
