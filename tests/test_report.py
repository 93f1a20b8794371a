"""Parameter report: GPT-2 124M's published figures, a cross-check against a real model, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.config import GPTConfig, get_config
from gptlab.model import GPTModel
from gptlab.report import parameter_report

SMALL = GPTConfig(vocab_size=101, context_length=24, emb_dim=48, n_heads=4, n_layers=3)


def test_gpt2_figures():
    report = parameter_report(get_config("gpt2"))
    assert report.total == 163_009_536
    assert report.tied_total == 124_412_160  # the "124M" in GPT-2 124M
    assert report.per_block["attention"] == 2_360_064
    assert report.per_block["feed-forward"] == 4_722_432
    assert f"{report.memory_mib(4):.2f}" == "621.83"
    assert sum(report.components.values()) == report.total


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_report_counts_match_a_real_model(tie, qkv_bias):
    cfg = SMALL.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    model = GPTModel(cfg)
    report = parameter_report(cfg)
    assert report.total == sum(p.numel() for p in model.parameters())
    untied_total = sum(p.numel() for p in GPTModel(cfg.replace(tie_embeddings=False)).parameters())
    assert report.tied_total == untied_total - cfg.vocab_size * cfg.emb_dim
    block = model.trf_blocks[0]
    assert report.per_block["attention"] == sum(p.numel() for p in block.att.parameters())
    assert report.per_block["feed-forward"] == sum(p.numel() for p in block.ff.parameters())
    assert report.per_block["total"] == sum(p.numel() for p in block.parameters())


def test_cli_info_prints_the_gpt2_figures(capsys):
    assert main(["info", "--model", "gpt2"]) == 0
    out = capsys.readouterr().out
    for figure in ("163,009,536", "124,412,160", "621.83", "2,360,064", "4,722,432"):
        assert figure in out


def assert_one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "786" in lines[0] and "768" in lines[0]


def test_cli_bad_shape_is_one_line_and_exit_2(capsys):
    assert main(["info", "--emb-dim", "786"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err)


def test_cli_unknown_preset_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--model", "gpt5"])
    assert exit_info.value.code == 2
    assert "gpt5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "gptlab"],
        [str(Path(sys.executable).with_name("gptlab"))],  # the installed console script
    ],
    ids=["python -m gptlab.cli", "gptlab"],
)
def test_cli_process_exits_2_without_traceback(command):
    result = subprocess.run([*command, "info", "--emb-dim", "786"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_line_error(result.stderr)
