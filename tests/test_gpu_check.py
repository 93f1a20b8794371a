"""benchmarks/gpu_check.py on the CPU with --quick: the resume and generation checks pass, the report holds
its fields, MFU follows the train_throughput formula, and bad options get one error line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def run_check(*options: str) -> subprocess.CompletedProcess:
    # One thread: the machine is shared, and a tiny model gains nothing from more.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *options], check=False, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    result = run_check("--device", "cpu", "--quick", "--no-compile", "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resume on cpu" in result.stdout and "greedy generation" in result.stdout  # the table
    return json.loads(out.read_text())


def test_the_resumed_run_repeats_the_uninterrupted_one_exactly_on_the_cpu(report):
    resume = report["resume"]
    assert (resume["passed"], resume["exact"], resume["steps"], resume["interrupted_at"], resume["stopped_by"]) == (
        True,
        True,
        4,
        2,
        "interrupt",
    )
    assert resume["losses_resumed"] == resume["losses_whole"]
    assert len(resume["losses_whole"]) == 4 and len(set(resume["losses_whole"])) == 4  # every step differs
    assert resume["losses_whole"][-1] < resume["losses_whole"][0]  # the synthetic sequence is learnable


def test_greedy_generation_on_the_device_matches_the_cpu(report):
    generation = report["generation"]
    assert generation == {"rows": 2, "new_tokens": 80, "context_length": 64, "equal": True, "passed": True}
    assert report["passed"] is True


def test_throughput_and_mfu_follow_the_train_throughput_formula(report):
    cfg = report["model_config"]
    vocab, context, emb, layers = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    # Per block: qkv 3·C², out_proj C², fc 4·C², proj 4·C²; then the output head V·C.
    weights = layers * 12 * emb**2 + vocab * emb
    assert report["matmul_weights"] == weights
    assert report["flops_per_token"] == 6 * weights + 12 * layers * emb * context
    run = report["throughput"]
    assert run["tokens_per_s"] > 0 and run["micro_batch"] == 4
    flops_per_s = run["tokens_per_s"] * report["flops_per_token"]
    assert run["mfu_measured"] == pytest.approx(flops_per_s / report["measured_peak_flops"])
    assert run["mfu_datasheet"] is None and report["datasheet_peak_flops"] is None  # no datasheet figure for a CPU
    assert report["environment"]["torch"] and report["device"] == "cpu"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--micro-batch", "-2"], "--micro-batch must be a positive integer, got -2"),
        (["--vocab-size", "0"], "--vocab-size must be a positive integer, got 0"),
    ],
)
def test_bad_options_get_one_error_line_and_exit_2(options, message, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when the script runs: its folder is on the path
    from gpu_check import parse_arguments

    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--device", "cpu", *options])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_cuda_without_it_says_so(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from gpu_check import parse_arguments

    with pytest.raises(SystemExit) as exit_info:
        parse_arguments([])  # --device cuda is the default
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("error: --device cuda: CUDA is not available here; run on a CUDA machine or pass --device cpu")
    )


def test_a_micro_batch_that_does_not_fit_is_halved_until_one_does(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    tried = []

    def measure(cfg, device, micro_batch, **kwargs):
        tried.append(micro_batch)
        if micro_batch > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"micro_batch": micro_batch}

    monkeypatch.setattr(gpu_check, "measure_throughput", measure)
    assert gpu_check.throughput_that_fits(gpu_check.QUICK_MODEL, torch.device("cpu"), 64) == {"micro_batch": 8}
    assert tried == [64, 32, 16, 8]
