"""Training: exact resume, atomic checkpoints, the stopping rules, the learning-rate schedule, AdamW's
parameter groups and clipping, divergence and Ctrl-C, the evaluation figures and the run folder.

Every run is a tiny model (2 layers, 32 features, 16 tokens of context) on 6,000 characters of
CPython's docs with a character-level tokenizer, so a run takes well under a second.
"""

import json
import math
import os
import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gptlab.checkpoint as checkpoint_module
import gptlab.training.state as state_module
import gptlab.training.trainer as train_module
from gptlab.checkpoint import load_gptlab_checkpoint
from gptlab.config import GPTConfig
from gptlab.data import (
    DataError,
    default_corpus_text,
    split_text,
)
from gptlab.model import GPTModel
from gptlab.training.config import ConfigError, TrainConfig
from gptlab.training.evaluation import evaluate
from gptlab.training.optimizers import make_optimizer
from gptlab.training.runtime import TrainingError
from gptlab.training.schedule import Plan, learning_rate
from gptlab.training.sources import TrainingData
from gptlab.training.state import OPTIMIZER_FILE, STATE_FILE, load_trainer_state
from gptlab.training.trainer import train

TEXT = default_corpus_text()[:6000]  # 5,400 training and 600 validation characters, a few of them multi-byte
BATCH, CONTEXT = 8, 16
TOKENS_PER_STEP = BATCH * CONTEXT


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (the machine is shared), and a fixed thread count keeps
    float sums in the same order from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(tokenizer) -> GPTConfig:
    return GPTConfig(
        vocab_size=tokenizer.vocab_size, context_length=CONTEXT, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1
    )


def train_config(out_dir: Path, **changes) -> TrainConfig:
    settings = dict(
        out=str(out_dir),
        batch_size=BATCH,
        micro_batch_size=4,
        stride=None,
        pos_init="gpt2",
        lr=1e-2,
        optimizer="adamw",
        dropout_from_epoch=0.0,
        warmup_steps=2,
        max_steps=6,
        eval_interval=1000,
        log_interval=1,
        sample_tokens=0,
        dtype="float32",
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**settings, **changes})


def run(corpus_data, out_dir: Path, resume: bool = False, data: TrainingData | None = None, **changes):
    tokenizer, corpus = corpus_data
    return train(model_config(tokenizer), train_config(out_dir, **changes), tokenizer, data or corpus, resume=resume)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(out_dir) if "train_loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    return {r["step"]: r["train_loss"] for r in records}


def validation_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(out_dir) if "val_loss" in r]


def press_ctrl_c_after(monkeypatch, step: int, times: int = 1) -> None:
    """Send this process a real SIGINT (what Ctrl-C sends) as soon as `step` is logged (log_interval 1)."""
    record_metrics = train_module.record_metrics

    def record_then_interrupt(out_dir, record):
        record_metrics(out_dir, record)
        if "train_loss" in record and record["step"] == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module, "record_metrics", record_then_interrupt)


def poison_loss_from_step(monkeypatch, step: int) -> None:
    """Training losses become NaN from `step` on (one forward pass per step: micro batch = batch)."""
    loss_fn, calls = train_module.loss_fn, []

    def loss_or_nan(model, x, y, reduction="mean"):
        loss = loss_fn(model, x, y, reduction)
        if model.training:
            calls.append(1)
            if len(calls) >= step:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_module, "loss_fn", loss_or_nan)


def safetensors_equal(first: Path, second: Path) -> bool:
    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("dtype, optimizer", [("float32", "adamw"), ("bfloat16", "adamw"), ("float32", "muon")])
def test_an_interrupted_then_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    corpus_data, tmp_path, monkeypatch, capsys, dtype, optimizer
):
    # dropout 0.1 (the RNG must be restored), 2 micro batches per step, and a stride that makes 3 batches
    # an epoch, so 8 steps cross two epochs and the run is cut mid-epoch.
    settings = dict(dtype=dtype, optimizer=optimizer, max_steps=8, stride=200, eval_interval=3)
    whole = run(corpus_data, tmp_path / "whole", **settings)
    assert whole.stopped_by == "max_steps" and whole.state.epoch == 2

    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 4)
        first = run(corpus_data, tmp_path / "split", **settings)
    assert (first.stopped_by, first.state.step) == ("interrupt", 4)
    assert f"continue with: gptlab train --out {tmp_path / 'split'} --resume" in capsys.readouterr().out
    shutil.copytree(tmp_path / "split", tmp_path / "no-rng")
    second = run(corpus_data, tmp_path / "split", resume=True, **settings)
    assert (second.stopped_by, second.state.step, second.state.tokens_seen) == ("max_steps", 8, 8 * TOKENS_PER_STEP)

    expected = train_losses(tmp_path / "whole")
    assert list(expected) == list(range(1, 9))
    assert train_losses(tmp_path / "split") == expected  # float equality: bit for bit
    for name in ("model.safetensors", OPTIMIZER_FILE):
        assert safetensors_equal(tmp_path / "whole" / "last" / name, tmp_path / "split" / "last" / name)
    assert second.final_eval == whole.final_eval

    # The comparison can fail: resuming with the generator left as initialisation leaves it gives other
    # dropout masks, hence other losses after the cut.
    with monkeypatch.context() as patch:
        patch.setattr(torch, "set_rng_state", lambda state: None)
        run(corpus_data, tmp_path / "no-rng", resume=True, **settings)
    without_rng = train_losses(tmp_path / "no-rng")
    assert [without_rng[s] for s in range(1, 5)] == [expected[s] for s in range(1, 5)]
    assert all(without_rng[s] != expected[s] for s in range(5, 9))


def test_dropout_starts_after_the_given_epochs_and_a_resumed_run_switches_where_the_whole_one_did(
    corpus_data, tmp_path, monkeypatch, capsys
):
    # An epoch is 5,400 tokens (the training split) and a step 128: 0.13 epochs are 702 tokens, so steps
    # 1-6 (0-640 tokens seen before them) run without dropout and steps 7-10 with it.
    settings = dict(max_steps=10, eval_interval=3, dropout_from_epoch=0.13)
    run(corpus_data, tmp_path / "whole", **settings)
    assert (
        "dropout: off for the first 0.13 epochs (6 steps), then on unless the run is 70% done"
        in capsys.readouterr().out
    )
    run(corpus_data, tmp_path / "never", **{**settings, "dropout_from_epoch": 100.0})
    run(corpus_data, tmp_path / "always", **{**settings, "dropout_from_epoch": 0.0})
    whole, never, always = (train_losses(tmp_path / name) for name in ("whole", "never", "always"))
    assert [whole[s] for s in range(1, 7)] == [never[s] for s in range(1, 7)]  # bit for bit: no dropout at all
    assert all(whole[s] != never[s] for s in range(7, 11))
    assert all(always[s] != never[s] for s in range(1, 11))  # the model's dropout 0.1 does change every step

    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 4)
        run(corpus_data, tmp_path / "split", **settings)
    run(corpus_data, tmp_path / "split", resume=True, **settings)
    assert train_losses(tmp_path / "split") == whole
    assert safetensors_equal(
        tmp_path / "whole" / "last" / "model.safetensors", tmp_path / "split" / "last" / "model.safetensors"
    )


def test_a_run_that_will_see_enough_epochs_doubles_its_dropout_and_a_resumed_run_keeps_the_decision(
    corpus_data, tmp_path, monkeypatch, capsys
):
    # 14 steps of 128 tokens are 0.33 epochs of 5,400: doubled for runs of 0.3 epochs, not for runs of 0.4.
    settings = dict(max_steps=14, eval_interval=5, dropout_from_epoch=0.13)
    run(corpus_data, tmp_path / "single", **settings)
    assert "step 6: dropout on at 0.1 (the model's)\n" in capsys.readouterr().out
    run(corpus_data, tmp_path / "double", **settings, dropout_double_for_epochs=0.3)
    out = capsys.readouterr().out
    assert (
        "then on unless the run is 70% done; at twice the model's rates if the run will see 0.3 epochs or more" in out
    )
    assert "step 6: dropout on at 0.2 (twice the model's, for a run of about 0.3 epochs)\n" in out
    run(corpus_data, tmp_path / "short", **settings, dropout_double_for_epochs=0.4)
    single, double = train_losses(tmp_path / "single"), train_losses(tmp_path / "double")
    assert [double[s] for s in range(1, 7)] == [single[s] for s in range(1, 7)]  # bit for bit until dropout starts
    assert all(double[s] != single[s] for s in range(7, 15))
    assert train_losses(tmp_path / "short") == single

    # The choice made at step 7 is in the checkpoint, and a run resumed after step 10 goes on with it.
    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 10)
        run(corpus_data, tmp_path / "split", **settings, dropout_double_for_epochs=0.3)
    state = json.loads((tmp_path / "split" / "last" / "trainer_state.json").read_text())["trainer"]
    assert state["dropout_scale"] == 2.0
    capsys.readouterr()
    run(corpus_data, tmp_path / "split", resume=True, **settings, dropout_double_for_epochs=0.3)
    assert "dropout on" not in capsys.readouterr().out  # said once, when it switched on
    assert train_losses(tmp_path / "split") == double


def test_dropout_due_in_the_last_30_percent_of_a_run_stays_off(corpus_data, tmp_path):
    # Due at step 7 of 8 (6/8 = 75% through), dropout never starts: the run is the one without dropout.
    settings = dict(max_steps=8, eval_interval=5)
    run(corpus_data, tmp_path / "late", **settings, dropout_from_epoch=0.13)
    run(corpus_data, tmp_path / "never", **settings, dropout_from_epoch=100.0)
    assert train_losses(tmp_path / "late") == train_losses(tmp_path / "never")


def test_dropout_that_doubling_would_take_to_one_is_refused_before_the_run_folder_is_made(corpus_data, tmp_path):
    tokenizer, corpus = corpus_data
    cfg = model_config(tokenizer).replace(drop_rate=0.5)
    with pytest.raises(ConfigError, match=r"doubles the model's dropout rates, and 0.5 doubled drops every value"):
        train(cfg, train_config(tmp_path / "run", max_steps=2, dropout_double_for_epochs=3.0), tokenizer, corpus)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "epochs_seen, run_epochs, progress, current, scale",
    [
        (0.0, 30.0, 0.0, None, 0.0),  # before the first epochs: off
        (3.9, 30.0, 0.13, 0.0, 0.0),
        (4.0, 30.0, 0.13, 0.0, 2.0),  # switching on in a run of 30 epochs: doubled
        (4.0, 12.0, 0.33, 0.0, 1.0),  # in a run of 12: the model's rates
        (4.0, 5.0, 0.8, 0.0, 0.0),  # 80% through: stays off
        (20.0, 5.0, 0.9, 2.0, 2.0),  # once chosen, kept
        (20.0, 30.0, 0.9, 1.0, 1.0),
        (20.0, 25.0, 0.8, None, 2.0),  # a checkpoint that did not record it: judged again, whatever the progress
    ],
)
def test_the_dropout_scale_is_off_then_chosen_once_by_the_runs_length(
    epochs_seen, run_epochs, progress, current, scale
):
    from gptlab.training.dropout import dropout_scale

    cfg = TrainConfig(dropout_from_epoch=4.0, dropout_double_for_epochs=18.0)
    assert dropout_scale(cfg, epochs_seen, run_epochs, progress, current) == scale
    never = TrainConfig(dropout_from_epoch=4.0)
    assert dropout_scale(never, epochs_seen, run_epochs, progress, current if current != 2.0 else 1.0) == min(
        scale, 1.0
    )


def test_a_run_judges_its_epochs_from_its_plan_before_the_first_step_and_from_its_progress_after():
    from gptlab.training.state import TrainerState

    planned = Plan(tokens_per_step=100, epoch_tokens=1_000, steps=250, warmup_steps=0)
    assert planned.epochs_at_end(TrainerState(), 0.0) == 25.0
    timed = Plan(tokens_per_step=100, epoch_tokens=1_000, steps=None, warmup_steps=0)
    assert timed.epochs_at_end(TrainerState(), 0.0) == 0.0
    assert timed.epochs_at_end(TrainerState(tokens_seen=4_000), 0.2) == pytest.approx(
        20.0
    )  # 4 epochs in a fifth of the time


def test_the_dropout_switch_scales_every_rate_and_back_to_its_own():
    from gptlab.training.dropout import DropoutSwitch

    cfg = GPTConfig(
        vocab_size=11, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1, attn_drop_rate=0.2
    )
    model = torch.nn.Sequential(GPTModel(cfg), torch.nn.Dropout(0.3))  # e.g. an adapter's own dropout
    switch = DropoutSwitch(model)

    def rates():
        return sorted(
            {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
            | {m.att.drop_rate for m in model[0].trf_blocks}
        )

    assert switch.any and rates() == [0.1, 0.2, 0.3]
    switch.set(0.0)
    assert rates() == [0.0]
    switch.set(2.0)
    assert rates() == pytest.approx([0.2, 0.4, 0.6])
    switch.set(1.0)
    assert rates() == [0.1, 0.2, 0.3]
    assert not DropoutSwitch(
        GPTModel(GPTConfig(vocab_size=11, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    ).any


def test_a_second_ctrl_c_aborts_at_once_and_the_previous_handler_comes_back(corpus_data, tmp_path, monkeypatch):
    handler_before = signal.getsignal(signal.SIGINT)
    press_ctrl_c_after(monkeypatch, 2, times=2)
    with pytest.raises(KeyboardInterrupt):
        run(corpus_data, tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert max(train_losses(tmp_path / "run")) == 2


def test_resuming_after_an_abort_logs_the_steps_after_the_checkpoint_once(corpus_data, tmp_path, monkeypatch):
    # Two Ctrl-Cs after step 3 abort with the last checkpoint at step 2: step 3 is in metrics.jsonl but
    # not in the checkpoint, and the resumed run trains it again.
    settings = dict(max_steps=5, eval_interval=2)
    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 3, times=2)
        with pytest.raises(KeyboardInterrupt):
            run(corpus_data, tmp_path / "aborted", **settings)
    run(corpus_data, tmp_path / "aborted", resume=True, **settings)
    run(corpus_data, tmp_path / "whole", **settings)
    assert train_losses(tmp_path / "aborted") == train_losses(tmp_path / "whole")
    assert validation_losses(tmp_path / "aborted") == validation_losses(tmp_path / "whole")


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "module, failing_file", [(checkpoint_module, "model.safetensors"), (state_module, OPTIMIZER_FILE)]
)
def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(
    corpus_data, tmp_path, monkeypatch, module, failing_file
):
    out = tmp_path / "run"
    save_file, writes, before_crash = module.save_file, [], {}

    def crash_on_second_checkpoint(tensors, filename, *args, **kwargs):
        if Path(filename).name == failing_file:
            writes.append(filename)
            if len(writes) == 2:
                before_crash.update({p.name: p.read_bytes() for p in (out / "last").iterdir()})
                Path(filename).write_bytes(b"half a file")
                raise OSError(28, "No space left on device")
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(module, "save_file", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        run(corpus_data, out, max_steps=4, eval_interval=2)  # checkpoints at steps 2 and 4

    assert {p.name: p.read_bytes() for p in (out / "last").iterdir()} == before_crash
    tokenizer, _ = corpus_data
    model, loaded_tokenizer = load_gptlab_checkpoint(out / "last")
    assert model.cfg == model_config(tokenizer) and loaded_tokenizer.spec() == tokenizer.spec()
    assert json.loads((out / "last" / "config.json").read_text())["step"] == 2
    fresh = GPTModel(model.cfg)
    state = load_trainer_state(out / "last", fresh, make_optimizer(fresh, train_config(out)))
    assert (state.step, state.tokens_seen) == (2, 2 * TOKENS_PER_STEP)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_the_run_folder_holds_safetensors_and_json_and_loads_without_unpickling(corpus_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = train_config(out, max_steps=4, eval_interval=2)
    tokenizer, data = corpus_data
    train(model_config(tokenizer), cfg, tokenizer, data)

    assert {p.name for p in out.iterdir()} == {"last", "best", "metrics.jsonl", "loss.png", "gptlab-run.json"}
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    checkpoint_files = {"config.json", "model.safetensors", OPTIMIZER_FILE, "rng.safetensors", STATE_FILE}
    assert {p.name for p in (out / "last").iterdir()} == checkpoint_files
    assert {p.name for p in (out / "best").iterdir()} == checkpoint_files
    assert not [p for p in out.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, no_unpickling)
    model, _ = load_gptlab_checkpoint(out / "last")
    fresh = GPTModel(model.cfg)
    optimizer = make_optimizer(fresh, cfg)
    state = load_trainer_state(out / "last", fresh, optimizer)
    assert (state.step, state.tokens_seen) == (4, 4 * TOKENS_PER_STEP)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    optimizer_state = load_file(str(out / "last" / OPTIMIZER_FILE))
    names = [name for name, _ in fresh.named_parameters()]
    assert set(optimizer_state) == {f"{name}.{key}" for name in names for key in ("step", "exp_avg", "exp_avg_sq")}
    assert all(float(optimizer.state[p]["step"]) == 4 for p in fresh.parameters())

    document = json.loads((out / "last" / STATE_FILE).read_text())
    assert document["trainer"]["step"] == 4
    records = read_metrics(out)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert list(val) == [2, 4]
    best_step = min(val, key=val.get)
    assert json.loads((out / "best" / STATE_FILE).read_text())["trainer"]["step"] == best_step
    assert document["trainer"]["best_val_loss"] == val[best_step]


# ---------------------------------------------------------------- when training stops


@pytest.mark.parametrize(
    "limits, stopped_by, steps",
    [
        (dict(max_steps=3), "max_steps", 3),
        (dict(max_steps=None, max_tokens=2 * TOKENS_PER_STEP), "max_tokens", 2),
        (dict(max_steps=None, max_tokens=2 * TOKENS_PER_STEP + 1), "max_tokens", 3),  # a started step is finished
        (dict(max_steps=5, max_tokens=3 * TOKENS_PER_STEP, time_budget=600.0), "max_tokens", 3),
        (dict(max_steps=2, max_tokens=3 * TOKENS_PER_STEP, time_budget=600.0), "max_steps", 2),
    ],
)
def test_training_stops_at_whichever_limit_comes_first(corpus_data, tmp_path, limits, stopped_by, steps):
    result = run(corpus_data, tmp_path / "run", micro_batch_size=None, **limits)
    state = result.state
    assert (result.stopped_by, state.step, state.tokens_seen) == (stopped_by, steps, steps * TOKENS_PER_STEP)
    assert list(train_losses(tmp_path / "run")) == list(range(1, steps + 1))


def test_a_time_budget_stops_training_once_it_is_spent(corpus_data, tmp_path):
    result = run(corpus_data, tmp_path / "run", max_steps=None, time_budget=0.3, micro_batch_size=None)
    assert result.stopped_by == "time_budget" and result.state.step >= 1
    assert result.state.elapsed >= 0.3
    saved = json.loads((tmp_path / "run" / "last" / STATE_FILE).read_text())["trainer"]
    assert saved["elapsed"] == result.state.elapsed and saved["step"] == result.state.step


class FakeClock:
    """Stands in for the time module in gptlab.train: time passes only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_a_time_budget_spent_between_steps_counts_as_spent_on_resume(corpus_data, tmp_path, monkeypatch):
    # Each step's forward pass takes 1 s and each log line 0.5 s: step 2 ends at 2.5 s and its log line at
    # 3.0 s, past the 2.7 s budget, so training stops after 2 steps having spent 3.0 s...
    clock = FakeClock()
    loss_fn, record_metrics = train_module.loss_fn, train_module.record_metrics

    def slow_loss(model, x, y, reduction="mean"):
        clock.now += 1.0 if model.training else 0.0
        return loss_fn(model, x, y, reduction)

    def slow_record(out_dir, record):
        clock.now += 0.5
        record_metrics(out_dir, record)

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "loss_fn", slow_loss)
    monkeypatch.setattr(train_module, "record_metrics", slow_record)
    settings = dict(max_steps=None, time_budget=2.7, micro_batch_size=None)
    result = run(corpus_data, tmp_path / "run", **settings)
    assert (result.stopped_by, result.state.step, result.state.elapsed) == ("time_budget", 2, 3.0)
    # ...and resuming with the same budget trains nothing more.
    again = run(corpus_data, tmp_path / "run", resume=True, **settings)
    assert (again.stopped_by, again.state.step) == ("time_budget", 2)


# ---------------------------------------------------------------- learning rate


def expected_lr(step: int, max_steps: int, lr: float, warmup: int, floor_ratio: float) -> float:
    """The schedule, written out: step (0-based) s < warmup → lr·(s + 1)/warmup; after that
    floor + (lr − floor)·(1 + cos(π·s/max_steps))/2 with floor = lr·floor_ratio, staying at the floor
    past the end."""
    if step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * floor_ratio
    return floor + (lr - floor) * (1 + math.cos(math.pi * min(step / max_steps, 1.0))) / 2


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(lr=6e-4, min_lr_ratio=0.1, warmup_steps=10, max_steps=100)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(6e-5, rel=1e-12)
    assert learning_rate(cfg, 4, 0.04) == pytest.approx(3e-4, rel=1e-12)
    assert learning_rate(cfg, 9, 0.09) == pytest.approx(6e-4, rel=1e-12)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-12)  # halfway: the midpoint
    assert learning_rate(cfg, 25, 0.25) == pytest.approx(6e-5 + 5.4e-4 * (2 + math.sqrt(2)) / 4, rel=1e-12)
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(6e-5, rel=1e-12)
    assert learning_rate(cfg, 150, 1.5) == pytest.approx(6e-5, rel=1e-12)  # training past the plan stays at the floor
    for step in range(0, 120, 7):
        assert learning_rate(cfg, step, step / 100) == pytest.approx(expected_lr(step, 100, 6e-4, 10, 0.1), rel=1e-12)
    no_warmup = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=10)
    assert learning_rate(no_warmup, 0, 0.0) == 1e-3


def test_warmup_stable_decay_holds_the_rate_then_draws_a_line_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", cooldown_fraction=0.25)
    assert learning_rate(cfg, 4, 0.04) == pytest.approx(5e-4, rel=1e-12)  # the same warmup
    for progress in (0.1, 0.5, 0.75):
        assert learning_rate(cfg, 50, progress) == 1e-3
    assert learning_rate(cfg, 80, 0.8) == pytest.approx(1e-3 - 9e-4 * 0.2, rel=1e-12)  # a fifth of the cooldown
    assert learning_rate(cfg, 90, 0.875) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(1e-4, rel=1e-12)
    assert learning_rate(cfg, 150, 1.5) == pytest.approx(1e-4, rel=1e-12)
    with pytest.raises(ValueError, match=r"--cooldown-fraction must be in \(0, 1\], got 0"):
        TrainConfig(schedule="wsd", cooldown_fraction=0)
    with pytest.raises(ValueError, match="--schedule must be cosine or wsd, got 'linear'"):
        TrainConfig(schedule="linear")


def spy_on_optimizer_steps(monkeypatch) -> list[dict]:
    """Record, at every optimizer.step() of a training run, each group's lr and all gradients as one vector."""
    make = train_module.make_optimizer
    steps = []

    def make_and_spy(model, cfg):
        optimizer = make(model, cfg)

        def record(optimizer, args, kwargs):
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            steps.append({"lrs": [group["lr"] for group in optimizer.param_groups], "grads": grads.clone()})

        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", make_and_spy)
    return steps


def test_the_optimizer_steps_with_the_scheduled_learning_rate(corpus_data, tmp_path, monkeypatch):
    steps = spy_on_optimizer_steps(monkeypatch)
    run(corpus_data, tmp_path / "run", max_steps=6, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1)
    expected = [expected_lr(s, 6, 1e-2, 2, 0.1) for s in range(6)]
    assert [step["lrs"] for step in steps] == [[pytest.approx(lr, rel=1e-12)] * 2 for lr in expected]
    assert [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- optimizer


def test_weight_decay_applies_to_matrices_only(corpus_data):
    tokenizer, _ = corpus_data
    model = GPTModel(model_config(tokenizer))
    with torch.no_grad():
        for param in model.parameters():  # no zeros or ones, so that decay shows on every tensor
            param.normal_()
    lr, decay = 0.5, 0.1
    optimizer = make_optimizer(model, train_config("unused", lr=lr, weight_decay=decay))
    names = {param: name for name, param in model.named_parameters()}
    decayed = [names[p] for group in optimizer.param_groups if group["weight_decay"] == decay for p in group["params"]]
    undecayed = [names[p] for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]]
    matrices = {"tok_emb.weight", "pos_emb.weight", "out_head.weight"} | {
        f"trf_blocks.{i}.{layer}.weight" for i in range(2) for layer in ("att.qkv", "att.out_proj", "ff.fc", "ff.proj")
    }
    assert sorted(decayed) == sorted(matrices)
    assert sorted(undecayed) == sorted(set(names.values()) - matrices)  # biases and LayerNorm scales and shifts

    # With zero gradients, AdamW's step is the decay alone: p ← p·(1 − lr·decay) for matrices, nothing for the rest.
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        expected = before[name] * (1 - lr * decay) if name in matrices else before[name]
        assert torch.equal(param.detach(), expected), name


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest_at_one_learning_rate(corpus_data):
    tokenizer, _ = corpus_data
    model = GPTModel(model_config(tokenizer))
    lr, decay = 0.01, 0.1
    optimizer = make_optimizer(model, train_config("unused", optimizer="muon", lr=lr, weight_decay=decay))
    muon, adamw = optimizer.parts
    names = {param: name for name, param in model.named_parameters()}
    hidden = {
        f"trf_blocks.{i}.{layer}.weight" for i in range(2) for layer in ("att.qkv", "att.out_proj", "ff.fc", "ff.proj")
    }
    assert {names[p] for group in muon.param_groups for p in group["params"]} == hidden
    assert {names[p] for group in adamw.param_groups for p in group["params"]} == set(names.values()) - hidden
    assert len(optimizer.param_groups) == len(muon.param_groups) + len(adamw.param_groups)
    for group in optimizer.param_groups:  # the loop sets every group's rate; both optimizers take it
        group["lr"] = lr / 2
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == lr / 2

    generator = torch.Generator().manual_seed(0)
    before = {name: param.detach().double().clone() for name, param in model.named_parameters()}
    grads = {
        name: torch.randn(param.shape, generator=generator, dtype=torch.float64)
        for name, param in model.named_parameters()
    }
    for name, param in model.named_parameters():
        param.grad = grads[name].float()
    optimizer.step()
    for name, param in model.named_parameters():
        decayed = before[name] * (1 - lr / 2 * decay) if param.dim() == 2 else before[name]
        update = (param.detach().double() - decayed) / (lr / 2)
        if name in hidden:
            # Muon: the gradient's singular vectors with every singular value near one (Newton-Schulz in
            # bf16 spreads them over about 0.5-1.5), times 0.2 sqrt(max(rows, columns)) to match AdamW's RMS.
            u, _, vh = torch.linalg.svd(grads[name], full_matrices=False)
            spectrum = -(u.T @ update @ vh.T) / (0.2 * math.sqrt(max(param.shape)))
            diagonal = spectrum.diagonal()
            assert diagonal.min() > 0.4 and diagonal.max() < 1.6, name
            assert (spectrum - torch.diag(diagonal)).abs().max() < 0.1 * diagonal.mean(), name
        else:
            # AdamW's first step: m / sqrt(v) = sign of the gradient (up to eps).
            assert torch.allclose(update, -grads[name].sign(), atol=1e-4), name


def test_batched_muon_steps_as_torch_muon_does():
    from gptlab.training.optimizers import BatchedMuon

    shapes = [(24, 8), (8, 8), (8, 32), (32, 8), (24, 8), (8, 8), (8, 32), (32, 8), (5, 3)]  # tall, square, wide
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    batched = BatchedMuon(ours, lr=0.02, weight_decay=0.1, momentum=0.95)
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for mine, its in zip(ours, theirs):
            mine.grad = torch.randn(mine.shape, generator=generator)
            its.grad = mine.grad.clone()
        batched.step()
        reference.step()
    for mine, its, before in zip(ours, theirs, start):
        assert (mine - before).abs().max() > 0.01
        # the same bfloat16 products, batched: equal up to the order oneDNN sums in (1e-4 of a 0.02 step)
        torch.testing.assert_close(mine, its, rtol=0, atol=2e-6)
        torch.testing.assert_close(batched.state[mine]["momentum_buffer"], reference.state[its]["momentum_buffer"])
    assert batched.state_dict()["state"].keys() == reference.state_dict()["state"].keys()


def test_muon_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="--optimizer muon needs whole matrices, which --fsdp shards"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(ValueError, match="--optimizer must be adamw or muon, got 'sgd'"):
        TrainConfig(optimizer="sgd")


def test_gradients_are_clipped_to_the_norm_limit(corpus_data, tmp_path, monkeypatch):
    steps = spy_on_optimizer_steps(monkeypatch)
    run(corpus_data, tmp_path / "free", max_steps=1, grad_clip=1e9)
    free = steps[0]["grads"]
    limit = float(free.norm()) / 4
    run(corpus_data, tmp_path / "clipped", max_steps=1, grad_clip=limit)
    clipped = steps[1]["grads"]
    assert float(clipped.norm()) == pytest.approx(limit, rel=1e-5)
    torch.testing.assert_close(clipped, free * (limit / free.norm()), rtol=1e-5, atol=1e-9)  # same direction


def test_a_grad_clip_of_zero_means_no_clipping_and_the_norm_is_logged(corpus_data, tmp_path, monkeypatch):
    steps = spy_on_optimizer_steps(monkeypatch)
    run(corpus_data, tmp_path / "free", max_steps=1, grad_clip=1e9)
    run(corpus_data, tmp_path / "off", max_steps=1, grad_clip=0)
    free, off = steps[0]["grads"], steps[1]["grads"]
    assert float(off.norm()) > 0 and torch.equal(off, free)  # clip_grad_norm_(max_norm=0) would zero them all
    (record,) = [r for r in read_metrics(tmp_path / "off") if "train_loss" in r]
    assert record["grad_norm"] == pytest.approx(float(free.norm()), rel=1e-5)


def test_a_non_finite_gradient_norm_stops_training_before_the_weights_change(corpus_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def inf_from_step_3(parameters, max_norm, *args, **kwargs):
        calls.append(1)
        return clip(parameters, max_norm, *args, **kwargs) * (float("inf") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_from_step_3)
    with pytest.raises(TrainingError, match=r"gradient norm became inf at step 3; the last good checkpoint is .*last"):
        run(corpus_data, out, micro_batch_size=None, eval_interval=2)
    assert json.loads((out / "last" / "config.json").read_text())["step"] == 2
    assert list(train_losses(out)) == [1, 2]


def test_resumed_optimizer_state_sits_where_a_fresh_optimizer_puts_it(corpus_data, tmp_path):
    run(corpus_data, tmp_path / "run", max_steps=2, eval_interval=2)
    tokenizer, _ = corpus_data
    model = GPTModel(model_config(tokenizer))
    fresh, resumed = make_optimizer(model, train_config(tmp_path)), make_optimizer(model, train_config(tmp_path))
    model(torch.zeros(1, CONTEXT, dtype=torch.long)).sum().backward()
    fresh.step()  # creates the state as the fused optimizer lays it out
    load_trainer_state(tmp_path / "run" / "last", model, resumed)
    for param in model.parameters():
        for key, value in fresh.state[param].items():
            restored = resumed.state[param][key]
            assert (restored.device, restored.dtype, restored.shape) == (value.device, value.dtype, value.shape), key
        assert float(resumed.state[param]["step"]) == 2


# ---------------------------------------------------------------- divergence and bad data


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_loss_from_step(monkeypatch, 3)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; the last good checkpoint is .*last"):
        run(corpus_data, out, micro_batch_size=None, eval_interval=2)
    model, _ = load_gptlab_checkpoint(out / "last")
    assert json.loads((out / "last" / "config.json").read_text())["step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())
    assert list(train_losses(out)) == [1, 2]


def test_weights_broken_by_a_huge_learning_rate_never_reach_a_checkpoint(corpus_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"validation loss became (nan|inf) at step 1; no checkpoint was saved"):
        run(corpus_data, out, lr=1e30, warmup_steps=0, eval_interval=1)
    assert not (out / "last").exists() and not (out / "best").exists()


@pytest.mark.parametrize(
    "pos_init, init_weights, restarted",
    [("sinusoidal", False, True), ("gpt2", False, False), ("sinusoidal", True, False)],
)
def test_only_a_new_model_gets_the_sinusoidal_position_table(
    corpus_data, tmp_path, monkeypatch, pos_init, init_weights, restarted
):
    tables = []  # the position table of every model trained, as the first step sees it
    forward = GPTModel.forward

    def recording_forward(self, *args, **kwargs):
        tables.append(self.pos_emb.weight.detach().clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPTModel, "forward", recording_forward)
    tokenizer, data = corpus_data
    sinusoidal = GPTModel(model_config(tokenizer))
    sinusoidal.init_sinusoidal_positions()
    pretrained = GPTModel(model_config(tokenizer)).state_dict()
    train(
        model_config(tokenizer),
        train_config(tmp_path / "run", pos_init=pos_init, max_steps=1),
        tokenizer,
        data,
        init_state=pretrained if init_weights else None,
    )
    first = tables[0]
    assert torch.equal(first, sinusoidal.pos_emb.weight) == restarted
    if init_weights:  # fine-tuning keeps the loaded table
        assert torch.equal(first, pretrained["pos_emb.weight"])


def test_an_unknown_position_init_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--pos-init must be gpt2 or sinusoidal, got 'rope'"):
        train_config(tmp_path, pos_init="rope")


def test_a_too_short_validation_split_is_refused_before_any_training(corpus_data, tmp_path):
    tokenizer, data = corpus_data
    short = TrainingData(data.train_tokens, data.val_tokens[:10], 10)
    with pytest.raises(DataError, match=r"validation split has 10 tokens but needs at least 17"):
        run(corpus_data, tmp_path / "run", data=short)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- evaluation


def explicit_validation_nll(model: GPTModel, tokens, context: int) -> tuple[float, int]:
    """Summed nats of every next-token prediction, one at a time: windows start every `context` tokens;
    a last window that would run past the end is moved back to end at the last token and only its
    targets not yet predicted count."""
    n = len(tokens)
    starts = list(range(0, n - context, context)) + [n - 1 - context]
    nats = {}  # target index -> -log p(token | the window's tokens before it)
    for start in starts:
        window = torch.from_numpy(tokens[start : start + context + 1].astype(np.int64))  # a copy of the memory map
        log_probs = F.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
        for i in range(context):
            nats.setdefault(start + i + 1, -float(log_probs[i, window[i + 1]]))
    assert sorted(nats) == list(range(1, n))
    return sum(nats.values()), len(nats)


def test_evaluate_equals_the_explicit_sum_over_every_prediction(corpus_data):
    tokenizer, data = corpus_data
    assert (len(data.val_tokens) - 1) % CONTEXT != 0  # so the moved-back last window is exercised
    torch.manual_seed(0)
    model = GPTModel(model_config(tokenizer))  # in training mode: evaluate must switch dropout off
    result = evaluate(model, data.val_tokens, data.val_bytes, batch_size=5)
    assert model.training
    with torch.no_grad():
        nats, count = explicit_validation_nll(model.eval(), data.val_tokens, CONTEXT)
    assert result.tokens == count == len(data.val_tokens) - 1
    assert result.loss == pytest.approx(nats / count, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nats / count), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / data.val_bytes, rel=1e-6)
    # The denominator: the UTF-8 bytes of the validation text less its first character, which is only context.
    val_text = split_text(TEXT)[1]
    assert data.val_bytes == len(val_text[1:].encode("utf-8")) > len(val_text) - 1


def test_checkpoint_files_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """Every file of a new checkpoint folder, the folder, and then its parent (the renames) are fsync'd."""
    from gptlab.checkpoint import save_model
    from gptlab.tokenizer import CharTokenizer

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    save_model(
        tmp_path / "model",
        GPTModel(GPTConfig(vocab_size=8, context_length=8, emb_dim=8, n_heads=2, n_layers=1)),
        CharTokenizer("abcdefg"),
    )
    names = [Path(path).name for path in synced]
    assert names[:2] in (["model.safetensors", "config.json"], ["config.json", "model.safetensors"])
    assert names[2].startswith(".model.tmp-") and synced[3] == str(tmp_path)


def test_an_interrupted_swap_is_restored_once_when_ranks_race(tmp_path, monkeypatch):
    """All ranks restore `.last.old` before the process group exists; the ones that lose the race find it done."""
    from gptlab.checkpoint import restore_interrupted_swap

    (tmp_path / ".last.old").mkdir()
    (tmp_path / ".last.old" / "config.json").write_text("{}")
    real_replace = os.replace

    def another_rank_first(source, target):
        real_replace(source, target)  # the winner's rename, then this rank's own, which finds nothing
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", another_rank_first)
    restore_interrupted_swap(tmp_path / "last")
    assert (tmp_path / "last" / "config.json").read_text() == "{}" and not (tmp_path / ".last.old").exists()
