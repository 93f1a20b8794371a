"""Corpus files of records (JSON Lines plain, gzip and zstd; JSON arrays; Parquet) and compressed text, on
real files of each format: each record is a document, giving exactly the token cache that the same
documents as plain text files give; bad records and misnamed files are refused in one line."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from data_helpers import write

from gptlab.cli import main
from gptlab.data import DataError, build_token_cache, read_corpus
from gptlab.tokenizer import EOT_TEXT

RECORDS = [
    "The first record.\nIt has two lines.",
    "second: é€ and 漢字",
    "",
    "third, after an empty one " * 40,
    "a literal <|endoftext|> inside a record stays text",
]
DOCUMENTS = [text for text in RECORDS if text]  # an empty record gives nothing


def jsonl(records, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: text}) + "\n" for i, text in enumerate(records)).encode()


WRITERS = {
    "corpus.jsonl": lambda path: write(path, jsonl(RECORDS)),
    "corpus.jsonl.gz": lambda path: write(path, gzip.compress(jsonl(RECORDS[:2])) + gzip.compress(jsonl(RECORDS[2:]))),
    "corpus.jsonl.zst": lambda path: write(path, zstandard.ZstdCompressor().compress(jsonl(RECORDS))),
    "corpus.json": lambda path: write(path, json.dumps([{"text": text} for text in RECORDS])),
    "corpus.parquet": lambda path: pq.write_table(
        pa.table({"id": list(range(len(RECORDS))), "text": RECORDS}), path, row_group_size=2
    ),
}


@pytest.mark.parametrize("name", WRITERS)
def test_each_record_is_a_document_as_if_it_were_a_text_file(tmp_path, gpt2, name):
    WRITERS[name](tmp_path / name)
    corpus = read_corpus([tmp_path / name])
    assert corpus.documents[0].read_text() == EOT_TEXT.join(DOCUMENTS)
    reference = read_corpus([write(tmp_path / "text" / f"{i}.txt", text) for i, text in enumerate(DOCUMENTS)])
    # a small chunk size, so that chunks end inside records and records end inside chunks
    got = build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False, chunk_chars=16)
    expected = build_token_cache(reference, gpt2, tmp_path / "reference", progress=False, chunk_chars=16)
    assert got.train_tokens.tolist() == expected.train_tokens.tolist()
    assert got.val_tokens.tolist() == expected.val_tokens.tolist()
    assert got.manifest["split_char"] == expected.manifest["split_char"]
    assert got.train_tokens.tolist().count(gpt2.eot_id) + got.val_tokens.tolist().count(gpt2.eot_id) == 3


def test_compressed_text_and_a_folder_of_every_format(tmp_path, gpt2):
    write(tmp_path / "notes.txt.gz", gzip.compress("plain text, gzipped\n".encode()))
    write(tmp_path / "more.zst", zstandard.ZstdCompressor().compress("plain text, zstd\n".encode()))
    for name, writer in WRITERS.items():
        writer(tmp_path / name)
    corpus = read_corpus([tmp_path])
    assert corpus.skipped == ()
    assert corpus.summary() == (
        "read 7 documents (" + f"{corpus.n_bytes:,}" + " bytes: 1 .json, 1 .jsonl, 1 .jsonl.gz, "
        "1 .jsonl.zst, 1 .parquet, 1 .zst, 1 .txt.gz)"
    )
    texts = {doc.path.rsplit("/", 1)[1]: doc.read_text() for doc in corpus.documents}
    assert texts["notes.txt.gz"] == "plain text, gzipped\n" and texts["more.zst"] == "plain text, zstd\n"
    assert build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False).built


def test_the_text_field_is_chosen_and_changing_it_rebuilds_the_cache(tmp_path, gpt2):
    path = write(
        tmp_path / "posts.jsonl",
        "".join(json.dumps({"text": "short", "body": "the body " + str(i)}) + "\n" for i in range(50)),
    )
    by_text = build_token_cache(read_corpus([path]), gpt2, tmp_path / "cache", progress=False)
    by_body = build_token_cache(read_corpus([path], text_field="body"), gpt2, tmp_path / "cache", progress=False)
    assert by_body.built and gpt2.decode(by_body.train_tokens.tolist()).startswith("the body 0<|endoftext|>the body 1")
    assert by_text.train_tokens.tolist() != by_body.train_tokens.tolist()
    assert by_body.manifest["inputs"]["sources"][0]["text_field"] == "body"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "fine"}\n{"text": "broken\n', r"corpus.jsonl: line 2 is not valid JSON \(Unterminated string"),
        (
            '{"text": "fine"}\n\n{"body": "x"}\n',
            r"corpus.jsonl: line 3 has no 'text' field \(it has: body\); name the "
            r"text field with --text-field",
        ),
        ('{"text": 3}\n', r"line 1 has a int in 'text', not a string"),
        ('["text"]\n', r"line 1 is a JSON list, not an object with a 'text' field"),
    ],
)
def test_a_bad_record_is_named_by_file_and_line(tmp_path, gpt2, content, message):
    corpus = read_corpus([write(tmp_path / "corpus.jsonl", content)])
    with pytest.raises(DataError, match=message) as error:
        build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False)
    assert "\n" not in str(error.value)


def test_parquet_columns_are_checked(tmp_path, gpt2):
    pq.write_table(pa.table({"content": ["a", "b"], "n": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(
        DataError,
        match=r"a.parquet has no 'text' column \(it has: content, n\); name the text column "
        "with --text-field",
    ):
        build_token_cache(read_corpus([tmp_path / "a.parquet"]), gpt2, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match=r"column 'n' holds int64, not strings"):
        build_token_cache(read_corpus([tmp_path / "a.parquet"], text_field="n"), gpt2, tmp_path / "c2", progress=False)
    cache = build_token_cache(
        read_corpus([tmp_path / "a.parquet"], text_field="content"),
        gpt2,
        tmp_path / "c3",
        progress=False,
        train_fraction=1.0,
    )
    assert cache.train_tokens.tolist() == [*gpt2.encode("a"), gpt2.eot_id, *gpt2.encode("b")]


def test_a_file_that_is_not_what_its_name_says(tmp_path):
    write(tmp_path / "folder" / "notes.txt.gz", "not gzip at all\n")
    write(tmp_path / "folder" / "table.parquet", "not parquet\n")
    write(tmp_path / "folder" / "gzipped.txt", gzip.compress(b"text\n"))
    write(tmp_path / "folder" / "ok.txt", "text\n")
    corpus = read_corpus([tmp_path / "folder"])
    assert dict(corpus.skipped) == {
        str(tmp_path / "folder" / "gzipped.txt"): "compressed: gzip (name it gzipped.txt.gz to read it)",
        str(tmp_path / "folder" / "notes.txt.gz"): "not what its name says: named notes.txt.gz, but its first bytes "
        "are not gzip's; rename or re-create it",
        str(tmp_path / "folder" / "table.parquet"): "not what its name says: named table.parquet, but its first bytes "
        "are not parquet's; rename or re-create it",
    }
    with pytest.raises(DataError, match=r"notes.txt.gz: not what its name says: named notes.txt.gz, but its first"):
        read_corpus([tmp_path / "folder" / "notes.txt.gz"])


def test_a_damaged_compressed_file_is_named(tmp_path, gpt2):
    data = gzip.compress(jsonl(RECORDS * 20))
    corpus = read_corpus([write(tmp_path / "corpus.jsonl.gz", data[: len(data) // 2])])
    with pytest.raises(DataError, match=r"corpus.jsonl.gz is damaged: its gzip data ends early"):
        build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False)
    corpus = read_corpus([write(tmp_path / "other.jsonl.gz", data[:20] + b"\xff" * 64 + data[84:])])
    with pytest.raises(DataError, match=r"other.jsonl.gz is damaged: its gzip data cannot be read"):
        build_token_cache(corpus, gpt2, tmp_path / "other", progress=False)


PARQUET_READ = """
import sys
import pyarrow as pa
from gptlab.data.corpus import Document
document = Document(sys.argv[1], 0, 0, text_field="text")
characters = sum(len(block) for block in document.blocks() if block)
print(characters, pa.default_memory_pool().max_memory())
"""


@pytest.mark.slow
def test_a_parquet_file_is_streamed_a_row_group_at_a_time(tmp_path):
    """A 48 MB Parquet file (random letters, so it does not compress) is read in a fresh process whose
    Arrow memory never holds more than a few of its 1 MB row groups."""
    rows, row_chars, group_rows = 48 * 1024, 1024, 1024
    letters = np.random.default_rng(0).integers(97, 123, size=(rows, row_chars), dtype=np.uint8)
    table = pa.table({"text": [row.tobytes().decode() for row in letters]})
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=group_rows, compression="none")
    assert path.stat().st_size > 48 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", PARQUET_READ, str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    characters, peak = map(int, result.stdout.split())
    assert characters == rows * row_chars
    assert peak < 8 * 2**20, f"Arrow held {peak / 2**20:.1f} MB at once"


def test_gptlab_train_reads_records_from_the_field_it_is_given(tmp_path, capsys):
    posts = write(
        tmp_path / "posts.jsonl",
        "".join(json.dumps({"id": i, "body": f"post number {i}. " * 20}) + "\n" for i in range(40)),
    )
    argv = [
        "train",
        "--data",
        str(posts),
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--context-length",
        "16",
        "--emb-dim",
        "32",
        "--n-heads",
        "2",
        "--n-layers",
        "2",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--sample-tokens",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([*argv, "--text-field", "body"]) == 0
    out = capsys.readouterr().out
    assert f"data: read 1 document ({posts.stat().st_size:,} bytes: {posts})" in out
    assert main([*argv, "--overwrite"]) == 2  # the default field, text, is not there
    err = capsys.readouterr().err
    assert err == (
        f"gptlab train: error: {posts}: line 1 has no 'text' field (it has: body, id); name the text field "
        "with --text-field\n"
    )


def test_a_hugging_face_dataset_saved_to_disk_is_read_from_its_arrow_files(tmp_path, gpt2):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"id": list(range(len(RECORDS))), "text": RECORDS}).save_to_disk(str(folder))
    corpus = read_corpus([f"hf-disk:{folder}"])
    assert [doc.path for doc in corpus.documents] == [str(folder / "data-00000-of-00001.arrow")]
    assert corpus.documents[0].read_text() == EOT_TEXT.join(DOCUMENTS)
    reference = read_corpus([write(tmp_path / "text" / f"{i}.txt", text) for i, text in enumerate(DOCUMENTS)])
    got = build_token_cache(corpus, gpt2, tmp_path / "cache", progress=False, chunk_chars=16)
    expected = build_token_cache(reference, gpt2, tmp_path / "reference", progress=False, chunk_chars=16)
    assert got.train_tokens.tolist() == expected.train_tokens.tolist()
    assert got.val_tokens.tolist() == expected.val_tokens.tolist()
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a"]}),
            "validation": datasets.Dataset.from_dict({"text": ["b"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(
        DataError, match=rf"holds the splits train, validation; name one: --data hf-disk:{tmp_path}/splits/train"
    ):
        read_corpus([f"hf-disk:{tmp_path / 'splits'}"])
    assert read_corpus([f"hf-disk:{tmp_path / 'splits' / 'train'}"]).documents[0].read_text() == "a"
    datasets.load_from_disk(str(folder)).shuffle(seed=0).save_to_disk(str(tmp_path / "shuffled"))
    shuffled = [text for text in datasets.load_from_disk(str(tmp_path / "shuffled"))["text"] if text]
    assert shuffled != DOCUMENTS  # the rows in the order datasets gives them
    assert read_corpus([f"hf-disk:{tmp_path / 'shuffled'}"]).documents[0].read_text() == EOT_TEXT.join(shuffled)
    with pytest.raises(DataError, match=r"not a dataset saved with save_to_disk"):
        read_corpus([f"hf-disk:{tmp_path / 'text'}"])


def test_a_hub_dataset_says_what_to_fetch_and_where(tmp_path):
    with pytest.raises(DataError) as error:
        read_corpus(["hf:HuggingFaceFW/fineweb-edu:sample-10BT"])
    assert str(error.value) == (
        "gptlab does not download datasets; on a machine with the network, save it with "
        "datasets.load_dataset('HuggingFaceFW/fineweb-edu').save_to_disk(FOLDER) (a split: "
        "load_dataset(..., split='train')) and pass --data hf-disk:FOLDER"
    )
