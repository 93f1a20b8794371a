"""The settings table (training/config.SETTINGS), made from the dataclasses' fields: every setting reaches
the same value typed on the command line as written in TOML, a value of the wrong type is refused in TOML
and in Python, what --resume may change is the list below, and run.toml's schema."""

from __future__ import annotations

import pytest

from gptlab.cli import build_parser
from gptlab.cli.train import PLUGIN_CHOICES
from gptlab.training.config import (
    RESUMABLE,
    SCHEMA,
    SETTINGS,
    ConfigError,
    RunConfig,
    check_types,
    read_toml,
    resolve,
    toml_value,
)
from gptlab.training.pipeline import gather_settings
from gptlab.training.state import read_run_config


def typed(row):
    """A value of the setting's type (one of its choices where it has them), and how the command line says it."""
    choices = row.choices or PLUGIN_CHOICES.get(row.name)
    flag = row.cli.get("flag", "--" + row.name.replace("_", "-"))
    if row.name == "invalid_utf8":
        return "replace", [flag]
    if row.name == "progress":
        return False, [flag]
    if row.kind is bool:
        return True, [flag]
    if row.kind is list:
        value = list(choices[-2:]) if choices else ["a b", "c"]
        if row.cli.get("action") == "append":  # --include A --include B
            return value, [token for item in value for token in (flag, item)]
        return value, [flag, *value]
    value = {int: 3, float: 0.25, str: choices[-1] if choices else "some text"}[row.kind]
    return value, [flag, str(value)]


def wrong(row):
    return {int: 1.5, float: "fast", str: 7, bool: 1, list: "one"}[row.kind]


@pytest.mark.parametrize("row", SETTINGS, ids=lambda row: row.name)
def test_a_setting_typed_or_written_in_toml_is_the_same_value(row, tmp_path):
    value, argv = typed(row)
    args = build_parser("train").parse_args(["train", *argv])
    assert vars(args)[row.name] == value and type(vars(args)[row.name]) is type(value)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"[{row.section}]\n{row.name} = {toml_value(value)}\n")
    assert read_toml(recipe) == {row.name: value}
    if row.kind is bool and "action" not in row.cli:  # --qkv-bias, --no-qkv-bias
        assert vars(build_parser("train").parse_args(["train", "--no-" + argv[0][2:]]))[row.name] is False


@pytest.mark.parametrize("row", SETTINGS, ids=lambda row: row.name)
def test_a_value_of_the_wrong_type_is_refused_in_toml_and_in_python(row, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"{row.name} = {toml_value(wrong(row))}\n")
    with pytest.raises(ConfigError, match=rf"^{row.name} = .* in --config .*recipe.toml should be "):
        read_toml(recipe)
    with pytest.raises(ConfigError, match=rf"^{row.name} = .* in the options should be "):
        gather_settings(None, {"out": str(tmp_path / "run"), row.name: wrong(row)}, resume=False, overwrite=False)


def test_the_table_is_the_dataclasses_and_names_what_a_resume_may_change():
    assert [row.name for row in SETTINGS] == list(RunConfig().flat())
    assert all(row.help for row in SETTINGS)
    assert RESUMABLE == {
        "max_steps",
        "max_tokens",
        "epochs",
        "time_budget",
        "eval_interval",
        "log_interval",
        "sample_tokens",
        "device",
        "micro_batch_size",
        "progress",
        "cache_dir",
        "compile",
        "loggers",
    }
    check_types({"epochs": 2, "lr": 1, "data": None, "merges": None}, "the options")  # an int for a float; unset
    with pytest.raises(ConfigError, match="out = None in the options should be str"):
        check_types({"out": None}, "the options")  # a setting that cannot be unset


def test_a_run_file_of_schema_2_reads_back_as_written_and_an_older_one_through_the_defaults(tmp_path):
    """A fine-tune's unset stride (None; the default is 1) and unset merges survive the round trip, because
    schema 2 means "what is left out is unset"; the same file without its schema line is a recipe, whose
    missing keys take the defaults of the run it describes (resolve), as runs before the schema were read."""
    tuned = resolve({"init": "models/gpt2", "max_steps": 5})
    assert tuned.train.stride is None and tuned.data.merges is None
    path = tmp_path / "run.toml"
    path.write_text(tuned.to_toml())
    assert path.read_text().splitlines()[1] == f"schema = {SCHEMA}"
    assert RunConfig.from_flat(read_toml(path)) == tuned  # nothing defaulted
    assert read_run_config(tmp_path) == tuned
    path.write_text(tuned.to_toml().replace(f"schema = {SCHEMA}\n", "").replace("ema_decay = 0.0\n", ""))
    assert RunConfig.from_flat(read_toml(path)).train.stride == 1  # a recipe: left out means the default
    assert read_run_config(tmp_path) == tuned  # schema 1: resolve gives a fine-tune its own defaults back
    new = resolve({"max_steps": 5})
    path.write_text(new.to_toml().replace(f"schema = {SCHEMA}\n", "").replace("ema_decay = 0.99\n", ""))
    assert read_run_config(tmp_path).train.ema_decay == 0.99  # a new model's, as it ran
    for schema in (SCHEMA + 1, 0, "2", True):
        path.write_text(f"schema = {toml_value(schema)}\n")
        with pytest.raises(ConfigError, match=r"reads run files of schema 1 to 2; a newer gptlab wrote it"):
            read_toml(path)
