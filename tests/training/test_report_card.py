"""runs/NAME/report.md: the run's figures, each the same as metrics.jsonl and the run's last lines say."""

import json
import re

from run_helpers import TINY_RUN, lines_of_text

from gptlab.cli import main


def test_the_report_card_says_what_the_run_recorded(tmp_path, capsys):
    text, run = lines_of_text(tmp_path / "text.txt"), tmp_path / "notes"
    assert (
        main(["train", "--data", str(text), "--out", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_RUN]) == 0
    )
    out = capsys.readouterr().out
    assert f"report: {run / 'report.md'}" in out
    final = re.search(r"validation: (loss .*)\n", out).group(1)
    card = (run / "report.md").read_text()
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    best = min(evaluations, key=lambda record: record["val_loss"])
    assert card.startswith("# notes\n")
    assert f"| data | read 1 document ({text.stat().st_size:,} bytes: {text}) |" in card
    assert "| tokenizer | GPT-2's BPE with 128 merges, vocabulary 385 |" in card
    assert "| trained | 4 steps, 256 tokens in " in card and "stopped by max_steps |" in card
    assert f"| final validation | {final} |" in card
    assert (
        f"| best validation | loss {best['val_loss']:.4f}, perplexity {best['val_perplexity']:.4f}, bits_per_byte "
        f"{best['val_bits_per_byte']:.4f} at step {best['step']} (best/) |"
    ) in card
    assert "| step | tokens | loss | perplexity | bits_per_byte |" in card
    rows = [line.split("|")[1:-1] for line in card.splitlines() if re.match(r"\| \d", line)]
    assert [(int(row[0]), row[2].strip()) for row in rows] == [
        (record["step"], f"{record['val_loss']:.4f}") for record in evaluations
    ]
    assert [int(row[0]) for row in rows] == [2, 4]


def test_a_benchmark_of_a_runs_checkpoint_joins_its_report_card_and_a_resume_keeps_it(tmp_path, capsys):
    run = tmp_path / "run"
    text = lines_of_text(tmp_path / "text.txt")
    argv = ["train", "--data", str(text), "--out", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_RUN]
    assert main(argv) == 0
    items = tmp_path / "lambada_test.jsonl"
    items.write_text(
        "".join(
            json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog."}) + "\n" for i in range(3)
        )
    )
    capsys.readouterr()
    assert (
        main(["eval", "--checkpoint", str(run / "best"), "--task", "lambada", "--data", str(items), "--device", "cpu"])
        == 0
    )
    out = capsys.readouterr().out
    scores = out.splitlines()[0].split(": ", 1)[1]
    assert out.splitlines()[1] == f"added to {run / 'report.md'}"
    row = f"| lambada | {items} | best/ | {scores} |"
    card = (run / "report.md").read_text()
    assert "\n## Benchmarks\n\n| task | data | checkpoint | scores |\n|---|---|---|---|\n" + row + "\n" in card
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    again = (run / "report.md").read_text()
    assert "6 steps" in again and again.endswith(row + "\n")  # the new card, the benchmark row kept
    assert main(["eval", "--checkpoint", str(items.parent / "nowhere"), "--task", "lambada", "--data", str(items)]) == 2
