"""A run's report card, runs/NAME/report.md, written when a run ends (as nanochat's report does): what
it trained on, with which tokenizer and model, how long and how fast, and its validation figures: the
last evaluation, the best one (lowest val_loss), and every evaluation's row from metrics.jsonl, with
whatever figures the run's evaluations record (bits per byte for pretraining, accuracy for a
classifier, ...). `gptlab eval --task` of a run's checkpoint adds its score under "## Benchmarks", which a
later report card of the same run (a resume's) keeps."""

from __future__ import annotations

from pathlib import Path

from ..config import GPTConfig
from ..report import parameter_report
from ..tokenizer import Tokenizer, tokenizer_name
from .state import read_log
from .trainer import TrainResult

REPORT_FILE = "report.md"
BENCHMARKS_HEADING = "## Benchmarks"


def write_report_card(result: TrainResult, data: str, tokenizer: Tokenizer, cfg: GPTConfig) -> Path:
    """Write report.md in the run's folder from its result, what it read (`data`, in words), its tokenizer
    and model, and its metrics.jsonl; its path."""
    out_dir, state, final = result.out_dir, result.state, result.final_eval
    steps, tokens, seconds = state.step, state.tokens_seen, state.elapsed
    records = read_log(out_dir / "metrics.jsonl")[0]
    evaluations = [record for record in records if "val_loss" in record]
    columns = list(dict.fromkeys(key for record in evaluations for key in record if key.startswith("val_")))
    size = parameter_report(cfg)
    lines = [
        f"# {out_dir.name}",
        "",
        "| | |",
        "|---|---|",
        f"| data | {data} |",
        f"| tokenizer | {tokenizer_name(tokenizer.spec())}, vocabulary {cfg.vocab_size:,} |",
        f"| model | {size.total:,} parameters: context {cfg.context_length}, {cfg.emb_dim} dims, "
        f"{cfg.n_heads} heads, {cfg.n_layers} layers |",
        f"| trained | {steps:,} steps, {tokens:,} tokens in {seconds:,.1f} s ({tokens / max(seconds, 1e-9):,.0f} "
        f"tokens/s); stopped by {result.stopped_by} |",
        f"| final validation | {final.format()} |",
    ]
    if evaluations:
        best = min(evaluations, key=lambda record: record["val_loss"])
        figures = ", ".join(f"{key.removeprefix('val_')} {best[key]:.4f}" for key in columns if key in best)
        lines.append(f"| best validation | {figures} at step {best['step']:,} (best/) |")
    lines += ["", "Settings: run.toml. Every record: metrics.jsonl.", "", "## Evaluations", ""]
    lines.append("| step | tokens | " + " | ".join(key.removeprefix("val_") for key in columns) + " |")
    lines.append("|---:|---:|" + "---:|" * len(columns))
    for record in evaluations:
        cells = [f"{record[key]:.4f}" if key in record else "" for key in columns]
        lines.append(f"| {record['step']:,} | {record['tokens']:,} | " + " | ".join(cells) + " |")
    path = out_dir / REPORT_FILE
    kept = benchmarks_section(path)
    path.write_text("\n".join(lines) + "\n" + (f"\n{kept}" if kept else ""))
    return path


def benchmarks_section(path: Path) -> str:
    """The "## Benchmarks" section of a report card (to its end), or "" if it has none."""
    text = path.read_text() if path.is_file() else ""
    return text[text.index(BENCHMARKS_HEADING) :] if BENCHMARKS_HEADING in text else ""


def add_benchmark(checkpoint: Path, task: str, data: str, scores: str) -> Path | None:
    """A row for a benchmark's scores of a run's checkpoint (runs/NAME/best or last) in the run's report
    card; the card's path, or None for a checkpoint that no gptlab run wrote."""
    run_dir = Path(checkpoint).parent
    path = run_dir / REPORT_FILE
    if not (path.is_file() and (run_dir / "run.toml").is_file()):
        return None
    text = path.read_text()
    if BENCHMARKS_HEADING not in text:
        text += f"\n{BENCHMARKS_HEADING}\n\n| task | data | checkpoint | scores |\n|---|---|---|---|\n"
    path.write_text(text + f"| {task} | {data} | {Path(checkpoint).name}/ | {scores} |\n")
    return path
