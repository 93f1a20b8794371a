"""--logger tensorboard csv wandb: the same figures as metrics.jsonl, read back with TensorBoard's own event
reader, Python's csv module and W&B's own record format (its offline .wandb files), the settings and samples as text, and a resumed run continuing the same logs."""

import ast
import csv
import json
import struct
from html import escape

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
        main(["train", "--out", str(tmp_path / "r"), "--logger", "neptune", "--max-steps", "1"])
    assert exit_info.value.code == 2 and "invalid choice: 'neptune'" in capsys.readouterr().err
    with pytest.raises(
        ConfigError, match="--logger neptune is not one gptlab writes; choose from tensorboard, wandb, mlflow, csv"
    ):
        gptlab.train(out=str(tmp_path / "r"), loggers=["neptune"], max_steps=1)


def run_and_resume(tmp_path, capsys, logger: str) -> tuple:
    """A tiny run of 4 steps with samples, logging to `logger`, resumed to 6: (its folder, each part's output)."""
    text, run = lines_of_text(tmp_path / "text.txt"), tmp_path / "run"
    argv = ["train", "--data", str(text), "--out", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_RUN]
    assert main([*argv, "--sample-tokens", "12", "--logger", logger]) == 0
    first = capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    return run, first, capsys.readouterr().out


def wandb_records(path) -> list:
    """The records of a W&B run file (run-ID.wandb): a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB's log format (32 KiB blocks; each chunk a CRC, a length, a type: full, first, middle or last)
    holding W&B's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00"
    position, pieces, records = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            break
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pieces))
    return records


def test_wandb_runs_offline_without_a_key_and_a_resume_continues_the_same_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no W&B login
    run, first, second = run_and_resume(tmp_path, capsys, "wandb")
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({folder.name.rsplit("-", 1)[1] for folder in folders}) == 1  # one W&B run
    run_id = folders[0].name.rsplit("-", 1)[1]
    assert f"wandb: offline run {run_id} in {run / 'wandb'}; upload it with: wandb sync " in first
    assert f"wandb: offline run {run_id} in {run / 'wandb'}, continuing W&B run {run_id}" in second
    history, config, samples = {}, {}, []
    for folder in folders:
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if key == "sample/path":  # the sample's HTML file, in the run's files/
                        samples.append((step, (folder / "files" / json.loads(item.value_json)).read_text()))
                    elif not key.startswith("_"):
                        history.setdefault(key, []).append((step, json.loads(item.value_json)))
            elif kind in ("run", "config"):
                update = record.run.config.update if kind == "run" else record.config.update
                config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update})
    records = metrics(run)
    for name in ("train_loss", "lr", "grad_norm", "val_loss", "val_bits_per_byte"):
        expected = [(record["step"], record[name]) for record in records if name in record]
        assert history[name] == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
    assert [step for step, _ in history["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in samples] == [2, 4, 6]
    said = [
        ast.literal_eval(line[len("sample: ") :])
        for line in (first + second).splitlines()
        if line.startswith("sample: ")
    ]
    assert [html for _, html in samples] == [f"<pre>{escape(text)}</pre>" for text in said] and len(said) == 3
    assert config["train"]["max_steps"] == 6 and config["model"]["n_layers"] == 2  # the resumed settings


def test_mlflow_holds_what_metrics_jsonl_holds_and_a_resume_continues_the_same_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client; the run says it sets it
    run, first, second = run_and_resume(tmp_path, capsys, "mlflow")
    client = MlflowClient((run / "mlruns").as_uri())
    (logged,) = client.search_runs([client.get_experiment_by_name("gptlab").experiment_id])  # one MLflow run
    run_id = logged.info.run_id
    assert f"mlflow: run {run_id} in experiment 'gptlab' at {(run / 'mlruns').as_uri()} (a file store" in first
    assert second.count(f"mlflow: run {run_id} ") == 1 and ", continuing it" in second
    assert logged.info.run_name == "run" and logged.data.tags["gptlab.run_dir"] == str(run.resolve())
    assert logged.data.params["train.max_steps"] == "4" and logged.data.params["model.n_layers"] == "2"
    records = metrics(run)
    for name in ("train_loss", "lr", "grad_norm", "val_loss", "val_bits_per_byte"):
        expected = [(record["step"], record[name]) for record in records if name in record]
        history = sorted((point.step, point.value) for point in client.get_metric_history(run_id, name))
        assert history == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
    assert [point.step for point in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    said = [
        ast.literal_eval(line[len("sample: ") :])
        for line in (first + second).splitlines()
        if line.startswith("sample: ")
    ]
    artifacts = sorted(item.path for item in client.list_artifacts(run_id, "samples"))
    assert artifacts == ["samples/step-2.txt", "samples/step-4.txt", "samples/step-6.txt"]
    folder = client.download_artifacts(run_id, "samples", str(tmp_path / "down"))
    assert [open(f"{folder}/step-{step}.txt").read() for step in (2, 4, 6)] == said
    assert client.get_run(run_id).info.status == "FINISHED"
