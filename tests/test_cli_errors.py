"""The command line tells the user's mistakes (one line, exit 2) from gptlab's own bugs (a traceback and
a request to report it, exit 1); GPTLAB_TRACEBACK=1 shows the traceback of either."""

import pytest

import gptlab.cli.models
from gptlab.cli import main
from gptlab.data import DataError
from gptlab.errors import DownloadError, UserError
from gptlab.finetune.lora import LoRAConfig
from gptlab.inference.sampling import GenerationOptions
from gptlab.loading import load_model
from gptlab.training.config import ConfigError
from gptlab.training.runtime import TrainingError


def run_info(capsys, monkeypatch, error: Exception) -> tuple[int, str]:
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(gptlab.cli.models, "parameter_report", fail)
    code = main(["info"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("boom"), KeyError("boom"), TypeError("boom")])
def test_a_bug_keeps_its_traceback_and_asks_for_a_report(error, capsys, monkeypatch):
    code, err = run_info(capsys, monkeypatch, error)
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert f"{type(error).__name__}: " in err and "boom" in err
    assert err.splitlines()[-1].startswith("gptlab info: internal error: this is a bug in gptlab ")
    assert "please report it with the traceback above" in err


@pytest.mark.parametrize(
    "error, code",
    [
        (UserError("--x is wrong; use --y"), 2),
        (DataError("data is wrong; fix it"), 2),
        (DownloadError("cannot download; fetch by hand"), 1),
    ],
)
def test_a_users_mistake_or_a_failed_download_is_one_line(error, code, capsys, monkeypatch):
    assert run_info(capsys, monkeypatch, error) == (code, f"gptlab info: error: {error}\n")


def test_gptlab_traceback_raises_a_users_mistake_and_keeps_a_bugs_traceback(capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_TRACEBACK", "1")
    with pytest.raises(UserError, match="--x"):
        run_info(capsys, monkeypatch, UserError("--x is wrong"))
    code, err = run_info(capsys, monkeypatch, ValueError("boom"))
    assert code == 1 and "Traceback" in err
    monkeypatch.setenv("GPTLAB_TRACEBACK", "0")  # 0 is off
    assert run_info(capsys, monkeypatch, UserError("--x is wrong"))[0] == 2


def test_each_layers_mistakes_are_user_errors(tmp_path):
    """Each layer raises the one type for what the user gave; it stays a ValueError for callers."""
    assert issubclass(UserError, ValueError)
    assert all(issubclass(kind, UserError) for kind in (DataError, ConfigError, TrainingError))
    with pytest.raises(UserError, match="top-p"):
        GenerationOptions(top_p=2)
    with pytest.raises(UserError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path / "missing")
