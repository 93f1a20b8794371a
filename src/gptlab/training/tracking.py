"""Experiment tracking: what metrics.jsonl records, also to TensorBoard and to a CSV file (--logger
tensorboard csv). metrics.jsonl stays the run's own record (loss.png and --resume read it).

    tensorboard   runs/NAME/tensorboard/: a scalar per metric (train_loss, val_loss, lr, grad_norm,
                  tokens_per_s, ...) against the step, the run's settings (run.toml) and each
                  evaluation's sample as text. A resumed run writes a new event file in the same folder,
                  purging the steps it trains again, so TensorBoard shows one run.
    csv           runs/NAME/metrics.csv: one row per metric and step (step, tokens, metric, value); a
                  resume drops the rows of the steps it trains again, as it does in metrics.jsonl.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .runtime import TrainingError

CSV_FILE = "metrics.csv"
CSV_HEADER = ["step", "tokens", "metric", "value"]
TENSORBOARD_DIR = "tensorboard"


class Tracker:
    """The run's loggers, on the main process: record() each metrics record, text() a sample."""

    def __init__(self, out_dir: Path, names: list[str], settings: str, resumed_at: int | None):
        self.writer = self.csv_file = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError(
                    "--logger tensorboard needs the tensorboard package: pip install 'gptlab[track]' (or tensorboard)"
                ) from None

            # purge_step: TensorBoard hides what earlier event files hold from this step on
            self.writer = SummaryWriter(
                str(out_dir / TENSORBOARD_DIR), purge_step=None if resumed_at is None else resumed_at + 1
            )
            if resumed_at is None:
                self.writer.add_text("settings", "```toml\n" + settings + "\n```", 0)
        if "csv" in names:
            path = out_dir / CSV_FILE
            rows = []
            if resumed_at is not None and path.exists():
                with open(path, newline="") as file:
                    rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resumed_at]
            self.csv_file = open(path, "w", newline="")
            self.csv = csv.DictWriter(self.csv_file, CSV_HEADER)
            self.csv.writeheader()
            self.csv.writerows(rows)
            self.csv_file.flush()

    def record(self, record: dict) -> None:
        step, tokens = record["step"], record.get("tokens")
        metrics = {
            name: value
            for name, value in record.items()
            if name not in ("step", "tokens") and isinstance(value, (int, float))
        }
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.csv_file is not None:
            self.csv.writerows(
                {"step": step, "tokens": tokens, "metric": name, "value": value} for name, value in metrics.items()
            )
            self.csv_file.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.csv_file is not None:
            self.csv_file.close()
