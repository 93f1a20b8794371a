"""`gptlab prepare` tokenizes once; `gptlab train --prepared` trains from that cache without reading the
sources: the same tokens and the same losses as a run that reads them itself, with the settings the
cache fixes refused by name."""

import json

from run_helpers import TINY_RUN

from gptlab.cli import main


def posts(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": f"Post {i}: the quick brown fox jumps over the lazy dog. " * 4}) + "\n"
            for i in range(200)
        )
    )
    return path


def losses(run) -> list[float]:
    return [
        record["train_loss"]
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "train_loss" in record
    ]


def test_a_prepared_cache_trains_like_the_sources_it_was_made_from(tmp_path, capsys):
    source = posts(tmp_path)
    assert (
        main(
            [
                "train",
                "--data",
                str(source),
                "--cache-dir",
                str(tmp_path / "own"),
                "--out",
                str(tmp_path / "a"),
                *TINY_RUN,
            ]
        )
        == 0
    )
    assert main(["prepare", "--data", str(source), "--out", str(tmp_path / "prepared"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"train with: gptlab train --prepared {tmp_path / 'prepared'}" in out
    source.unlink()  # the run from the cache never reads it
    assert main(["train", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "b"), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert f"data: the token cache {tmp_path / 'prepared'}, prepared from 1 file (" in out
    assert "no source is read" in out
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 4
    assert (tmp_path / "prepared" / "tokens-train.bin").read_bytes() == (
        tmp_path / "own" / "tokens-train.bin"
    ).read_bytes()
    assert main(["eval", "--checkpoint", str(tmp_path / "b" / "last"), "--device", "cpu"]) == 0
    assert f"on the held-out 10% of the token cache {tmp_path / 'prepared'}" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert len(losses(tmp_path / "b")) == 6


def test_the_cache_fixes_the_tokenizer_and_its_run_records_it(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                "--data",
                str(posts(tmp_path)),
                "--out",
                str(tmp_path / "chars"),
                "--tokenizer",
                "char",
                "--val-fraction",
                "0.2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "(a character vocabulary of " in capsys.readouterr().out
    assert main(["train", "--prepared", str(tmp_path / "chars"), "--out", str(tmp_path / "run"), *TINY_RUN]) == 0
    toml = (tmp_path / "run" / "run.toml").read_text()
    assert 'tokenizer = "char"' in toml and "val_fraction = 0.2" in toml


def test_what_a_prepared_cache_fixes_is_refused_by_name(tmp_path, capsys):
    assert main(["prepare", "--data", str(posts(tmp_path)), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    capsys.readouterr()
    for option, value in (("--data", str(tmp_path)), ("--tokenizer", "char"), ("--val-fraction", "0.3")):
        assert main(["train", "--prepared", str(tmp_path / "c"), "--out", str(tmp_path / "r"), option, value]) == 2
        assert capsys.readouterr().err == (
            f"gptlab train: error: {option}: the prepared cache {tmp_path / 'c'} already "
            "fixes its data, tokenizer and split; drop it, or prepare the data again "
            "with it\n"
        )
    assert main(["train", "--prepared", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "holds no token cache; make one with gptlab prepare --data ... --out" in capsys.readouterr().err


def test_settings_that_say_what_the_cache_holds_are_accepted(tmp_path, capsys):
    # as the 124M recipe's tokenizer = "gpt2" over a cache prepared with GPT-2's whole BPE
    argv = ["prepare", "--data", str(posts(tmp_path)), "--out", str(tmp_path / "c"), "--tokenizer", "gpt2"]
    assert main([*argv, "--no-progress"]) == 0
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[data]\ntokenizer = "gpt2"\nval_fraction = 0.1\n')
    run = ["train", "--config", str(recipe), "--prepared", str(tmp_path / "c"), "--out", str(tmp_path / "r")]
    assert main([*run, *TINY_RUN]) == 0
    assert main([*run[:-1], str(tmp_path / "r2"), "--merges", "128", *TINY_RUN]) == 2  # the cache has all 50,000
    assert "error: --tokenizer: the prepared cache" in capsys.readouterr().err  # gpt2 with 128 merges is not it
