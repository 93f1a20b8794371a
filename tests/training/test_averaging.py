"""--ema-decay: the average follows its formula, leaves training itself alone, is what a run evaluates and
saves, and resumes bit for bit."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    one_thread,
    press_ctrl_c_after,
    run,
    safetensors_equal,
    train_losses,
    validation_losses,
)
from test_train_cli import assert_refused, gptlab, train_argv

from gptlab.checkpoint import load_gptlab_checkpoint
from gptlab.training.averaging import TRAINING_WEIGHTS_FILE, WeightAverage
from gptlab.training.config import ConfigError, TrainConfig
from gptlab.training.evaluation import evaluate
from gptlab.training.runtime import TrainingError

SETTINGS = dict(ema_decay=0.8, max_steps=8, stride=200, eval_interval=3)


def test_the_average_follows_its_formula_step_by_step():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    average = WeightAverage(model, decay=0.9)
    assert [name for name, _ in average.named] == ["weight", "bias"]  # trainable parameters only
    expected = model.weight.detach().double().clone()
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 101):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3, generator=generator))
        average.update(step)
        decay = min(0.9, (1 + step) / (10 + step))  # 2/11 at the first step, 0.9 from step 80 on
        expected = decay * expected + (1 - decay) * model.weight.detach().double()
        torch.testing.assert_close(average.average[0].double(), expected, rtol=1e-6, atol=1e-6)

    weights = model.weight.detach().clone()
    with average.in_model():
        assert not torch.equal(model.weight, weights)
        torch.testing.assert_close(model.weight.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(average.training_weights()["weight"], weights)
    assert torch.equal(model.weight, weights)
    assert torch.equal(average.training_weights()["weight"], weights)


def test_a_run_with_an_average_trains_the_same_weights_and_saves_and_reports_their_average(corpus_data, tmp_path):
    tokenizer, data = corpus_data
    plain = run(corpus_data, tmp_path / "plain", **{**SETTINGS, "ema_decay": 0.0})
    averaged = run(corpus_data, tmp_path / "ema", **SETTINGS)
    assert train_losses(tmp_path / "ema") == train_losses(tmp_path / "plain")  # the average never feeds back
    last = tmp_path / "ema" / "last"
    assert safetensors_equal(last / TRAINING_WEIGHTS_FILE, tmp_path / "plain" / "last" / "model.safetensors")
    assert not (tmp_path / "plain" / "last" / TRAINING_WEIGHTS_FILE).exists()

    model, _ = load_gptlab_checkpoint(last)
    saved = load_file(str(last / "model.safetensors"))
    trained = load_file(str(last / TRAINING_WEIGHTS_FILE))
    assert not torch.equal(saved["tok_emb.weight"], trained["tok_emb.weight"])
    result = evaluate(model, data.val_tokens, data.val_bytes, 4)
    assert averaged.final_eval.loss == pytest.approx(result.loss, rel=1e-6)  # the file is what was evaluated
    assert validation_losses(tmp_path / "ema")[-1] == (8, averaged.final_eval.loss)
    assert averaged.final_eval.loss != plain.final_eval.loss


def test_an_interrupted_run_with_an_average_resumes_bit_for_bit(corpus_data, tmp_path, monkeypatch):
    whole = run(corpus_data, tmp_path / "whole", **SETTINGS)
    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 4)
        run(corpus_data, tmp_path / "split", **SETTINGS)
    second = run(corpus_data, tmp_path / "split", resume=True, **SETTINGS)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    for name in ("model.safetensors", TRAINING_WEIGHTS_FILE):
        assert safetensors_equal(tmp_path / "whole" / "last" / name, tmp_path / "split" / "last" / name)
    assert second.final_eval == whole.final_eval


def test_a_checkpoint_without_its_training_weights_is_refused_on_resume(corpus_data, tmp_path):
    run(corpus_data, tmp_path / "run", **{**SETTINGS, "max_steps": 3})
    (tmp_path / "run" / "last" / TRAINING_WEIGHTS_FILE).unlink()
    with pytest.raises(TrainingError, match=f"has no {TRAINING_WEIGHTS_FILE}.*resume from a complete one"):
        run(corpus_data, tmp_path / "run", resume=True, **SETTINGS)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(ema_decay=1.0), r"--ema-decay must be in \[0, 1\)"),
        (dict(ema_decay=-0.5), r"--ema-decay must be in \[0, 1\)"),
        (dict(ema_decay=0.99, fsdp=True, optimizer="adamw"), "--ema-decay keeps whole weights, which --fsdp shards"),
    ],
)
def test_a_decay_outside_0_to_1_or_with_fsdp_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_the_command_line_refuses_a_bad_decay_in_one_line_and_makes_no_run_folder(corpus, tmp_path, capsys):
    code, _, err = gptlab(capsys, train_argv(corpus, tmp_path / "run", tmp_path / "cache", "--ema-decay", "1.5"))
    assert_refused(code, err, r"--ema-decay must be in \[0, 1\) .*got 1\.5")
    assert not (tmp_path / "run").exists()


def test_the_command_line_says_that_the_run_reports_the_average(corpus, tmp_path, capsys):
    code, out, _ = gptlab(capsys, train_argv(corpus, tmp_path / "run", tmp_path / "cache", "--ema-decay", "0.9"))
    assert code == 0
    assert "weights: evaluated and saved as their moving average (--ema-decay 0.9)" in out
    assert (tmp_path / "run" / "best" / TRAINING_WEIGHTS_FILE).is_file()
