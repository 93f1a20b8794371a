"""Experiment tracking: what metrics.jsonl records, also to TensorBoard, Weights & Biases or a CSV file
(--logger tensorboard wandb mlflow csv, any of them). metrics.jsonl stays the run's own record (loss.png and
--resume read it).

    tensorboard   runs/NAME/tensorboard/: a scalar per metric (train_loss, val_loss, lr, grad_norm,
                  tokens_per_s, ...) against the step, the run's settings (run.toml) and each
                  evaluation's sample as text. A resumed run writes a new event file in the same folder,
                  purging the steps it trains again, so TensorBoard shows one run.
    wandb         a W&B run in runs/NAME/wandb/ (project $WANDB_PROJECT, default gptlab; the run's folder
                  name as its name): the metrics against the step, the settings as its config, samples as
                  HTML. Online when W&B has an API key ($WANDB_API_KEY or ~/.netrc) and $WANDB_MODE does
                  not say otherwise, else offline, saying how to upload it later (`wandb sync`). A resumed
                  run continues the same W&B run (its id is read back from runs/NAME/wandb/), from the step
                  it resumes at.
    mlflow        an MLflow run at $MLFLOW_TRACKING_URI (a tracking server, or any store MLflow reads), else
                  in a file store in runs/NAME/mlruns (MLflow 3 keeps that kind of store in maintenance
                  mode: gptlab opts in for that store only, and says so); experiment
                  $MLFLOW_EXPERIMENT_NAME, default gptlab; the run named after its folder and tagged with
                  it (gptlab.run_dir), the settings as params, the metrics against the step, samples as
                  text artifacts. A resumed run finds its MLflow run by that tag and continues it; MLflow
                  cannot drop logged points, so steps trained again after a crash appear twice there.
    csv           runs/NAME/metrics.csv: one row per metric and step (step, tokens, metric, value); a
                  resume drops the rows of the steps it trains again, as it does in metrics.jsonl.
"""

from __future__ import annotations

import csv
import netrc
import os
import re
import time
import tomllib
from html import escape
from pathlib import Path

from .runtime import TrainingError

CSV_FILE = "metrics.csv"
CSV_HEADER = ["step", "tokens", "metric", "value"]
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B makes runs/NAME/wandb/ itself, under the dir it is given
MLFLOW_DIR = "mlruns"


def missing(logger: str, package: str) -> TrainingError:
    return TrainingError(f"--logger {logger} needs the {package} package: pip install 'gptlab[track]' (or {package})")


class TensorBoardLogger:
    def __init__(self, out_dir: Path, settings: str, resumed_at: int | None, log) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing("tensorboard", "tensorboard") from None
        # purge_step: TensorBoard hides what earlier event files hold from this step on
        self.writer = SummaryWriter(
            str(out_dir / TENSORBOARD_DIR), purge_step=None if resumed_at is None else resumed_at + 1
        )
        if resumed_at is None:
            self.writer.add_text("settings", "```toml\n" + settings + "\n```", 0)

    def record(self, step: int, tokens: int | None, metrics: dict) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class CsvLogger:
    def __init__(self, out_dir: Path, settings: str, resumed_at: int | None, log) -> None:
        path = out_dir / CSV_FILE
        rows = []
        if resumed_at is not None and path.exists():
            with open(path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resumed_at]
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, CSV_HEADER)
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.file.flush()

    def record(self, step: int, tokens: int | None, metrics: dict) -> None:
        self.csv.writerows(
            {"step": step, "tokens": tokens, "metric": name, "value": value} for name, value in metrics.items()
        )
        self.file.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        pass  # a CSV of numbers holds no text

    def close(self) -> None:
        self.file.close()


def wandb_api_key() -> bool:
    """Whether W&B has an API key, where its login keeps one."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_run_id(folder: Path) -> str | None:
    """The id of the newest W&B run W&B keeps in folder (its run folders end in -ID), if any."""
    runs = sorted(folder.glob("*run-*-*"), key=lambda path: path.stat().st_mtime) if folder.is_dir() else []
    found = [re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(\w+)", path.name) for path in runs]
    ids = [match[1] for match in found if match]
    return ids[-1] if ids else None


class WandbLogger:
    def __init__(self, out_dir: Path, settings: str, resumed_at: int | None, log) -> None:
        try:
            import wandb
        except ImportError:
            raise missing("wandb", "wandb") from None
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key() else "offline")
        run_id = wandb_run_id(out_dir / WANDB_DIR) if resumed_at is not None else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "gptlab"),
            name=out_dir.resolve().name,
            dir=str(out_dir),
            id=run_id,
            resume="allow" if run_id else None,
            mode=mode,
            config=tomllib.loads(settings),
            settings=wandb.Settings(silent=True),
        )
        how = (
            f"upload it with: wandb sync {out_dir / WANDB_DIR}/offline-run-*-{self.run.id}"
            if mode == "offline"
            else self.run.url
        )
        again = f", continuing W&B run {run_id}" if run_id else ""
        log(f"wandb: {mode} run {self.run.id} in {out_dir / WANDB_DIR}{again}; {how}")

    def record(self, step: int, tokens: int | None, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{escape(text)}</pre>", inject=False)}, step=step)

    def close(self) -> None:
        self.run.finish()


def flat_settings(settings: dict, prefix: str = "") -> dict[str, str]:
    """run.toml's tables as MLflow params: "train.lr" → "0.003"."""
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = str(value)
    return flat


class MlflowLogger:
    def __init__(self, out_dir: Path, settings: str, resumed_at: int | None, log) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing("mlflow", "mlflow-skinny") from None
        self.Metric = Metric
        uri, store = os.environ.get("MLFLOW_TRACKING_URI"), ""
        if uri is None:  # the run's own file store, which MLflow 3 opens only when told to
            uri = (out_dir.resolve() / MLFLOW_DIR).as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            store = " (a file store: MLFLOW_ALLOW_FILE_STORE=true for this process; MLFLOW_TRACKING_URI names another)"
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gptlab")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        run_dir = str(out_dir.resolve())
        earlier = (
            self.client.search_runs([experiment], f"tags.`gptlab.run_dir` = '{run_dir}'", max_results=1)
            if resumed_at is not None
            else []
        )
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.log_text(self.run_id, settings, f"settings/resumed-at-{resumed_at}.toml")
        else:
            run = self.client.create_run(experiment, run_name=out_dir.resolve().name, tags={"gptlab.run_dir": run_dir})
            self.run_id = run.info.run_id
            params = flat_settings(tomllib.loads(settings))
            self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in params.items()])
            self.client.log_text(self.run_id, settings, "settings/run.toml")
        again = ", continuing it" if earlier else ""
        log(f"mlflow: run {self.run_id} in experiment {name!r} at {uri}{store}{again}")

    def record(self, step: int, tokens: int | None, metrics: dict) -> None:
        now = int(time.time() * 1000)
        points = [self.Metric(name, float(value), now, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=points)

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}s/step-{step}.txt")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


LOGGER_CLASSES = {
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
    "mlflow": MlflowLogger,
    "csv": CsvLogger,
}  # config.LOGGERS


class Tracker:
    """The run's loggers, on the main process: record() each metrics record, text() a sample."""

    def __init__(self, out_dir: Path, names: list[str], settings: str, resumed_at: int | None, log=print):
        self.loggers = [LOGGER_CLASSES[name](out_dir, settings, resumed_at, log) for name in names]

    def record(self, record: dict) -> None:
        metrics = {
            name: value
            for name, value in record.items()
            if name not in ("step", "tokens") and isinstance(value, (int, float))
        }
        for logger in self.loggers:
            logger.record(record["step"], record.get("tokens"), metrics)

    def text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.text(tag, text, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
