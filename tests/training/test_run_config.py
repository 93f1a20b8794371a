"""A run's settings: layers (defaults, fine-tuning defaults, a recipe, the command line), TOML in and out,
the shipped recipes, the default limits, and what a resume may change."""

import re
import tomllib
from pathlib import Path

import pytest

from gptlab.training.config import (
    EMBEDDED_TIME_BUDGET,
    FINETUNE_DEFAULTS,
    NEW_MODEL_DEFAULTS,
    ConfigError,
    RunConfig,
    read_toml,
    resolve,
    resume_settings,
    with_default_limit,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_the_layers_apply_in_order_defaults_then_fine_tuning_then_what_was_given():
    plain = resolve({})
    assert plain == RunConfig.from_flat(NEW_MODEL_DEFAULTS) and (
        plain.train.lr,
        plain.train.stride,
        plain.train.optimizer,
    ) == (8e-3, 1, "muon")
    assert (plain.data.tokenizer, plain.data.merges, plain.train.dropout_double_for_epochs) == ("gpt2", 128, 18.0)
    assert plain.train.ema_decay == 0.99
    tuned = resolve({"init": "models/gpt2"})
    assert (tuned.train.lr, tuned.train.stride, tuned.train.warmup_steps, tuned.train.optimizer) == (
        6e-5,
        None,
        20,
        "adamw",
    )
    assert tuned.train.dropout_double_for_epochs is None and tuned.data.merges is None  # the checkpoint's tokenizer
    assert tuned.train.ema_decay == 0.0
    assert resolve({"init": "models/gpt2", "lr": 1e-4}).train.lr == 1e-4  # what was given wins


@pytest.mark.parametrize(
    "given, tokenizer, merges",
    [
        ({}, "gpt2", 128),
        ({"tokenizer": "gpt2"}, "gpt2", None),  # GPT-2 named alone means all of its BPE
        ({"merges": 512}, "gpt2", 512),
        ({"tokenizer": "char"}, "char", None),
    ],
)
def test_a_new_model_gets_the_128_merge_tokenizer_unless_one_is_named(given, tokenizer, merges):
    data = resolve(given).data
    assert (data.tokenizer, data.merges) == (tokenizer, merges)


def test_a_run_toml_written_before_the_new_model_defaults_resumes_as_it_ran(tmp_path):
    old = RunConfig.from_flat({"tokenizer": "char"})  # what run.toml held: no merges, no doubling, no average
    text = old.to_toml()
    (tmp_path / "run.toml").write_text(
        "".join(line for line in text.splitlines(keepends=True) if not line.startswith("ema_decay"))
    )  # a key it did not have
    saved = RunConfig.from_flat(read_toml(tmp_path / "run.toml"))
    assert saved == old and saved.train.dropout_double_for_epochs is None and saved.train.ema_decay == 0.0
    assert resume_settings(saved, {"max_steps": 9}).data.tokenizer == "char"


def test_an_fsdp_run_trains_with_adamw_and_no_average_unless_told_otherwise_which_is_refused():
    assert (resolve({"fsdp": True}).train.optimizer, resolve({"fsdp": True}).train.ema_decay) == ("adamw", 0.0)
    with pytest.raises(ConfigError, match="--optimizer muon needs whole matrices, which --fsdp shards"):
        resolve({"fsdp": True, "optimizer": "muon"})
    with pytest.raises(ConfigError, match="--ema-decay keeps whole weights, which --fsdp shards"):
        resolve({"fsdp": True, "ema_decay": 0.99})


def test_toml_round_trips_every_setting(tmp_path):
    run = resolve(
        {
            "data": ["a.txt", "b/"],
            "include": ["*.md"],
            "tokenizer": "gpt2",
            "merges": 512,
            "emb_dim": 64,
            "qkv_bias": True,
            "lr": 1e-3,
            "time_budget": 12.5,
            "compile": True,
            "out": 'runs/"quoted"',
        }
    )
    (tmp_path / "run.toml").write_text(run.to_toml())
    assert set(tomllib.loads(run.to_toml())) == {"schema", "data", "model", "train"}
    assert resolve(read_toml(tmp_path / "run.toml")) == run


def test_a_fine_tune_keeps_its_stride_unset_through_a_round_trip(tmp_path):
    run = resolve({"init": "models/gpt2", "data": ["x.txt"]})
    (tmp_path / "run.toml").write_text(run.to_toml())
    assert resolve(read_toml(tmp_path / "run.toml")).train.stride is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr = 1e-3\nbatch_sise = 8\n", r"unknown key 'batch_sise' in --config .*; did you mean 'batch_size'\?"),
        ("lr = 'fast'\n", r"lr = 'fast' in --config .* should be float"),
        ("max_steps = 1.5\n", r"max_steps = 1.5 in --config .* should be int"),
        ("[train]\nlr = \n", r"--config .* is not valid TOML"),
        (
            "tokenizer = 'char'\nmerges = 100\n",
            r"--merges 100 truncates GPT-2's BPE, but --tokenizer is char; drop one of them",
        ),
        ("grad_clip = -1.0\n", r"--grad-clip must be >= 0 \(0 turns clipping off\)"),
        ("time_budget = 0\n", r"--time-budget must be positive, got 0"),
    ],
)
def test_a_bad_recipe_is_refused_in_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        resolve(read_toml(path))
    assert "\n" not in str(error.value)


def test_a_missing_recipe_is_refused():
    with pytest.raises(ConfigError, match=r"--config nowhere.toml: no such file; give the path of a .toml recipe"):
        read_toml("nowhere.toml")


def test_the_shipped_recipes_parse_and_the_embedded_recipe_is_the_default():
    recipes = {path.stem: resolve(read_toml(path)) for path in RECIPES.glob("*.toml")}
    assert set(recipes) == {"embedded", "gpt2-124m", "gpt2-finetune"}
    assert recipes["embedded"] == with_default_limit(resolve({}))[0]
    gpt2 = recipes["gpt2-124m"]
    assert (gpt2.train.lr, gpt2.train.beta2, gpt2.train.weight_decay, gpt2.train.min_lr_ratio) == (6e-4, 0.95, 0.1, 0.1)
    assert gpt2.train.ema_decay == 0.0
    assert gpt2.train.batch_size * 1024 == 524_288 and gpt2.data.tokenizer == "gpt2" and gpt2.train.stride == 1024
    tune = recipes["gpt2-finetune"]
    assert tune.model.init and tune.train.stride is None and 3e-5 <= tune.train.lr <= 1e-4


def test_no_limit_means_the_embedded_default_or_one_epoch_of_ones_own_text():
    embedded, note = with_default_limit(resolve({}))
    assert embedded.train.time_budget == EMBEDDED_TIME_BUDGET and "default on the embedded corpus" in note
    own, note = with_default_limit(resolve({"data": ["notes.txt"]}))
    assert (own.train.epochs, own.train.time_budget) == (1.0, None) and "default on your own text" in note
    steps, note = with_default_limit(resolve({"max_steps": 100000}))
    assert (steps.train.max_steps, steps.train.time_budget, note) == (100000, None, "as given")  # no hidden 300 s


def test_a_resume_may_change_limits_and_reporting_but_nothing_else():
    saved = resolve({"data": ["notes.txt"], "lr": 1e-3, "max_steps": 20})
    resumed = resume_settings(
        saved,
        {"max_steps": 30, "eval_interval": 5, "device": "cpu", "micro_batch_size": 4, "lr": 1e-3, "out": "runs/x"},
    )
    assert (resumed.train.max_steps, resumed.train.eval_interval, resumed.train.micro_batch_size) == (30, 5, 4)
    assert resumed.data.data == ["notes.txt"] and resumed.train.lr == 1e-3
    for name, value, shown in [
        ("lr", 3e-3, "0.003 here and 0.001 in the run"),
        ("data", ["other.txt"], "['other.txt'] here and ['notes.txt'] in the run"),
        ("batch_size", 64, "64 here and 16 in the run"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"--{name.replace('_', '-')} is {shown}; drop it")):
            resume_settings(saved, {name: value})


def test_a_resume_compares_model_settings_with_what_the_run_built():
    saved = resolve({"init": "models/gpt2"})
    assert resume_settings(saved, {"emb_dim": 768}, {"emb_dim": 768, "n_layers": 12}).model.emb_dim is None
    with pytest.raises(ConfigError, match=r"--emb-dim is 64 here and 768 in the run"):
        resume_settings(saved, {"emb_dim": 64}, {"emb_dim": 768})


def test_finetune_defaults_are_a_fine_tuning_rate():
    assert 3e-5 <= FINETUNE_DEFAULTS["lr"] <= 1e-4 and FINETUNE_DEFAULTS["stride"] is None
