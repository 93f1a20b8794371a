"""A run's report card, runs/NAME/report.md, written when a run ends (as nanochat's report does): what
it trained on, with which tokenizer and model, how long and how fast, and its validation figures: the
last evaluation, the best one (lowest val_loss), and every evaluation's row from metrics.jsonl, with
whatever figures the run's evaluations record (bits per byte for pretraining, accuracy for a
classifier, ...)."""

from __future__ import annotations

from pathlib import Path

from ..config import GPTConfig
from ..report import parameter_report
from ..tokenizer import Tokenizer, tokenizer_name
from .state import read_log
from .trainer import TrainResult

REPORT_FILE = "report.md"


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
    path.write_text("\n".join(lines) + "\n")
    return path
