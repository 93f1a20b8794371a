"""--dtype auto: bfloat16 where the device has bfloat16 arithmetic, else float32, chosen on the machine that
trains. On a CPU without it (x86 without AVX-512, such as AVX2-only AMD Zen 3) PyTorch emulates bfloat16 and
a training step is many times slower (docs/benchmarks.md#training-dtype), so a default of bfloat16 would make
every run there slow without saying so."""

import tomllib
from pathlib import Path

import pytest
import torch
from run_helpers import TINY_MODEL

import gptlab.training.runtime as runtime
from gptlab.cli import main
from gptlab.training.config import TrainConfig
from gptlab.training.runtime import computes_bfloat16, training_dtype

CPU = torch.device("cpu")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them, or None where it does not (not Linux, not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else None


def test_the_rule_on_this_cpu_follows_its_avx512_flags():
    # oneDNN's bfloat16 kernels need AVX-512 (BW, VL, DQ) on x86; AVX2 alone gets PyTorch's emulation.
    flags = cpu_flags()
    if flags is None or "avx2" not in flags:
        pytest.skip("not an x86 CPU that Linux describes")
    assert computes_bfloat16(CPU) == ({"avx512bw", "avx512vl", "avx512dq"} <= flags)


def test_the_default_is_auto():
    assert TrainConfig().dtype == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_auto_and_each_explicit_dtype_on_a_cpu_with_and_without_bfloat16(monkeypatch, native):
    monkeypatch.setattr(runtime, "onednn_bf16_supported", lambda: native)
    dtype, line = training_dtype("auto", CPU)
    assert dtype == ("bfloat16" if native else "float32")
    assert line == (
        "dtype: bfloat16 (--dtype auto: this CPU has bfloat16 arithmetic)"
        if native
        else "dtype: float32 (--dtype auto: this CPU has no bfloat16 arithmetic (PyTorch would emulate it))"
    )
    assert training_dtype("float32", CPU) == ("float32", None)
    dtype, line = training_dtype("bfloat16", CPU)  # asked for: kept, with a warning where it is emulated
    assert dtype == "bfloat16"
    assert (line is None) == native
    if not native:
        assert line.startswith("warning: --dtype bfloat16 on a CPU without bfloat16 arithmetic")


@pytest.mark.parametrize("native", [True, False])
def test_a_run_records_what_auto_chose_and_resumes_with_it(monkeypatch, capsys, tmp_path, native):
    monkeypatch.setattr(runtime, "onednn_bf16_supported", lambda: native)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = ["train", "--data", str(text), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    argv += [*TINY_MODEL, "--batch-size", "4", "--eval-interval", "2", "--sample-tokens", "0"]
    argv += ["--device", "cpu", "--no-progress"]
    assert main([*argv, "--max-steps", "2"]) == 0
    chosen = "bfloat16" if native else "float32"
    assert f"dtype: {chosen} (--dtype auto" in capsys.readouterr().out
    recorded = tomllib.loads((tmp_path / "run" / "run.toml").read_text())
    assert recorded["train"]["dtype"] == chosen
    # resumed on a machine of the other kind, the run keeps its dtype (and says when it is emulated)
    monkeypatch.setattr(runtime, "onednn_bf16_supported", lambda: not native)
    assert main([*argv, "--max-steps", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "--dtype auto" not in out
    assert ("warning: --dtype bfloat16 on a CPU without" in out) == native
    assert tomllib.loads((tmp_path / "run" / "run.toml").read_text())["train"]["dtype"] == chosen
