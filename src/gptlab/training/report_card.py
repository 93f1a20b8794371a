"""A run's report card, runs/NAME/report.md, written when a run ends (as nanochat's report does): what
it trained on, with which tokenizer and model, how long and how fast, and its validation figures: the
last evaluation, the best one, and every evaluation's row from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from ..config import GPTConfig
from ..report import parameter_report
from .evaluation import EvalResult
from .state import read_log

REPORT_FILE = "report.md"


def write_report_card(
    out_dir: Path,
    *,
    name: str,
    data: str,
    tokenizer: str,
    cfg: GPTConfig,
    steps: int,
    tokens: int,
    seconds: float,
    stopped_by: str,
    final: EvalResult,
) -> Path:
    """Write report.md in out_dir from the run's figures and its metrics.jsonl; its path."""
    records = read_log(out_dir / "metrics.jsonl")[0]
    evaluations = [record for record in records if "val_loss" in record]
    best = min(evaluations, key=lambda record: record["val_loss"]) if evaluations else None
    size = parameter_report(cfg)
    lines = [
        f"# {name}",
        "",
        "| | |",
        "|---|---|",
        f"| data | {data} |",
        f"| tokenizer | {tokenizer}, vocabulary {cfg.vocab_size:,} |",
        f"| model | {size.total:,} parameters: context {cfg.context_length}, {cfg.emb_dim} dims, "
        f"{cfg.n_heads} heads, {cfg.n_layers} layers |",
        f"| trained | {steps:,} steps, {tokens:,} tokens in {seconds:,.1f} s ({tokens / max(seconds, 1e-9):,.0f} "
        f"tokens/s); stopped by {stopped_by} |",
        f"| final validation | loss {final.loss:.4f}, perplexity {final.perplexity:.2f}, bits/byte "
        f"{final.bits_per_byte:.4f} ({final.tokens:,} tokens) |",
    ]
    if best is not None:
        lines.append(
            f"| best validation | loss {best['val_loss']:.4f}, bits/byte {best['val_bits_per_byte']:.4f} at "
            f"step {best['step']:,} (best/) |"
        )
    lines += [
        "",
        "Settings: run.toml. Every record: metrics.jsonl.",
        "",
        "## Evaluations",
        "",
        "| step | tokens | loss | perplexity | bits/byte |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {record['step']:,} | {record['tokens']:,} | {record['val_loss']:.4f} | "
        f"{record['val_perplexity']:.2f} | {record['val_bits_per_byte']:.4f} |"
        for record in evaluations
    ]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
