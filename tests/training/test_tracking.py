"""--logger tensorboard csv: the same figures as metrics.jsonl, read back with TensorBoard's own event reader
and Python's csv module, the settings and samples as text, and a resumed run continuing the same logs."""

import csv
import json

import pytest
from run_helpers import TINY_RUN, lines_of_text
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gptlab
from gptlab.cli import main
from gptlab.training.config import ConfigError


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def texts(run) -> dict[str, list[tuple[int, str]]]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(event.step, event.tensor_proto.string_val[0].decode()) for event in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }


def test_tensorboard_and_csv_hold_what_metrics_jsonl_holds_across_a_resume(tmp_path, capsys):
    text, run = lines_of_text(tmp_path / "text.txt"), tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(text),
        "--out",
        str(run),
        "--cache-dir",
        str(tmp_path / "cache"),
        *TINY_RUN,
        "--sample-tokens",
        "12",
        "--logger",
        "tensorboard",
        "csv",
    ]
    assert main(argv) == 0
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    records = metrics(run)
    logged = scalars(run)
    for name in ("train_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bits_per_byte"):
        expected = [(record["step"], record[name]) for record in records if name in record]
        assert [step for step, _ in logged[name]] == [step for step, _ in expected]
        assert [value for _, value in logged[name]] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert [step for step, _ in logged["train_loss"]] == [1, 2, 3, 4, 5, 6]  # the resume continues the same run
    logged_texts = texts(run)
    (settings,) = logged_texts["settings/text_summary"]
    assert "[train]" in settings[1] and "max_steps = 4" in settings[1]
    assert [step for step, _ in logged_texts["sample/text_summary"]] == [2, 4, 6]
    with open(run / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    expected_rows = [
        (record["step"], name, value)
        for record in records
        for name, value in record.items()
        if name not in ("step", "tokens")
    ]
    assert [(int(row["step"]), row["metric"], float(row["value"])) for row in rows] == expected_rows


def test_an_unknown_logger_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "r"), "--logger", "mlflow", "--max-steps", "1"])
    assert exit_info.value.code == 2 and "invalid choice: 'mlflow'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--logger mlflow is not one gptlab writes; choose from tensorboard, csv"):
        gptlab.train(out=str(tmp_path / "r"), loggers=["mlflow"], max_steps=1)
