"""`gptlab generate`: output, escapes, seeds, devices, bad arguments in one line, the interactive mode, and
Ctrl-C and closed pipes ending quietly (real signals and pipes, sent to a real process)."""

from __future__ import annotations

import io
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest
import torch
from generation_helpers import (
    MULTIBYTE,
    one_thread,
    save_random_checkpoint,
    scripted_model,
)

from gptlab.checkpoint import save_model
from gptlab.cli import generate as cli
from gptlab.cli import main
from gptlab.inference.generate import GenerationOptions, generate_ids
from gptlab.loading import load_model
from gptlab.tokenizer import load_tokenizer

TWO_PARAGRAPHS = " one\n\n two"  # " one", "\n\n", " two": three tokens

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """Continues "Hi" with MULTIBYTE, then end-of-text."""
    return scripted_model(tokenizer.encode("Hi") + tokenizer.encode(MULTIBYTE) + [tokenizer.eot_id])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, scripted, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "scripted"
    save_model(path, scripted, tokenizer)
    return path


@pytest.fixture(scope="module")
def paragraphs_checkpoint(tmp_path_factory, tokenizer):
    """Continues "Hi" with TWO_PARAGRAPHS, then end-of-text."""
    path = tmp_path_factory.mktemp("ckpt") / "paragraphs"
    save_model(
        path, scripted_model(tokenizer.encode("Hi") + tokenizer.encode(TWO_PARAGRAPHS) + [tokenizer.eot_id]), tokenizer
    )
    return path


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, tokenizer):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random", tokenizer)


def run_cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generates_from_a_checkpoint(capsys, checkpoint):
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", "Hi", "--temperature", "0")
    assert (code, out, err) == (0, "Hi" + MULTIBYTE + "\n", "")
    code, out, _ = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--prompt",
        "Hi",
        "--stop",
        "naïve",
        "--stop",
        "日",
        "--max-new-tokens",
        "40",
        "--seed",
        "3",
        "--dtype",
        "bfloat16",
    )
    assert (code, out) == (0, "Hi 🙂 \n")
    code, out, _ = run_cli(
        capsys, "--checkpoint", checkpoint, "--prompt", "Hi", "--max-new-tokens", "1", "--num-samples", "2"
    )
    assert (code, out) == (0, "--- sample 1 of 2 ---\nHi 🙂\n--- sample 2 of 2 ---\nHi 🙂\n")
    code, out, _ = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--prompt",
        "Hi",
        "--temperature",
        "0",
        "--dtype",
        "float16",
        "--device",
        "cpu",
        "--repetition-penalty",
        "1.2",
        "--min-p",
        "0.1",
    )
    assert (code, out) == (0, "Hi" + MULTIBYTE + "\n")  # the script's margin outlasts the penalty


def test_escapes_in_prompt_and_stop(capsys, paragraphs_checkpoint):
    assert cli.unescape(r"a\n\tb\\n c\q") == "a\n\tb\\n c\\q"
    code, out, _ = run_cli(capsys, "--checkpoint", paragraphs_checkpoint, "--prompt", "Hi", "--temperature", "0")
    assert out == "Hi" + TWO_PARAGRAPHS + "\n"
    code, out, _ = run_cli(
        capsys, "--checkpoint", paragraphs_checkpoint, "--prompt", "Hi", "--temperature", "0", "--stop", r"\n\n"
    )
    assert (code, out) == (0, "Hi one\n")
    code, out, _ = run_cli(
        capsys, "--checkpoint", paragraphs_checkpoint, "--prompt", r"Hi\t\\n", "--max-new-tokens", "0"
    )
    assert (code, out) == (0, "Hi\t\\n\n")


def test_fresh_seed_is_printed_and_repeats_the_run(capsys, random_checkpoint):
    args = ["--checkpoint", random_checkpoint, "--prompt", "Hello", "--max-new-tokens", "20"]
    code, out, err = run_cli(capsys, *args)
    seed = re.fullmatch(r"\(sampling with seed (\d+): pass --seed \1 to repeat\)\n", err)
    assert code == 0 and seed
    assert run_cli(capsys, *args, "--seed", seed[1])[1] == out
    assert run_cli(capsys, *args, "--seed", int(seed[1]) + 1)[1] != out
    assert run_cli(capsys, *args, "--temperature", "0")[2] == ""  # greedy: no seed to report


def test_cli_prompt_file_interactive_empty_and_long_prompts(
    capsys, checkpoint, scripted, tokenizer, tmp_path, monkeypatch
):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hi\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "--checkpoint", checkpoint, "--prompt-file", prompt_file, "--temperature", "0")
    assert (code, out) == (0, "Hi" + MULTIBYTE + "\n")

    loads = []
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: loads.append(args) or load_model(*args, **kwargs))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nHi\n"))
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--interactive", "--temperature", "0", "--stop", "語")
    assert (code, out, err, len(loads)) == (0, "Hi 🙂 日本\n" * 2, "", 1)  # no banner, no "> " without a terminal

    code, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--prompt", "", "--max-new-tokens", "5", "--temperature", "0"
    )
    from_end_of_text = generate_ids(
        scripted, [[tokenizer.eot_id]], GenerationOptions(max_new_tokens=5, temperature=0), eot_id=tokenizer.eot_id
    )[0]
    assert (code, out, err) == (0, tokenizer.decode(from_end_of_text) + "\n", "")

    long_prompt = "x." * 40 + "Hi"  # 81 tokens, the last one "Hi"
    code, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--prompt", long_prompt, "--temperature", "0", "--max-new-tokens", "4"
    )
    assert (code, out) == (0, long_prompt + " 🙂 日\n")  # 日 is tokens 2 to 4
    assert err == "warning: the prompt has 81 tokens, more than the model's context_length 64; keeping its last 64\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_terminal_banner_prompt_marker_and_advancing_seeds(capsys, random_checkpoint, monkeypatch):
    monkeypatch.setattr("sys.stdin", Terminal("Hello\nHello\n"))
    args = ["--checkpoint", random_checkpoint, "--max-new-tokens", "15", "--num-samples", "2"]
    code, out, err = run_cli(capsys, *args, "--seed", "40", "--interactive")
    parameters = sum(p.numel() for p in load_model(random_checkpoint)[0].parameters())
    assert err == (
        f"{random_checkpoint}, {parameters:,} parameters. One prompt per line; Ctrl-C stops a reply, "
        "Ctrl-D or Ctrl-C twice quits.\n"
    )
    # reply n samples with seed + n * num_samples, so the same prompt twice gives new text
    first = run_cli(capsys, *args, "--seed", "40", "--prompt", "Hello")[1]
    second = run_cli(capsys, *args, "--seed", "42", "--prompt", "Hello")[1]
    assert first != second
    assert (code, out) == (0, "> " + first + "> " + second + "> \n")  # a marker before each line; EOF ends the line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--min-p", "2"], "--min-p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be between 0.01 and 100"),
        (["--seed", "-3"], "--seed must be between 0 and 2**63 - 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--stop", ""], "--stop must not be an empty string"),
        (["--device", "tpu"], "unknown --device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
        (["--prompt-file", "missing.txt"], "cannot read --prompt-file missing.txt: No such file or directory"),
        ([], "give exactly one of --prompt TEXT, --prompt-file FILE or --interactive"),
        (["--interactive"], "give exactly one of"),
        (["--n-layers", "2"], "--checkpoint takes the model's shape from the checkpoint; drop --n-layers"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(capsys, checkpoint, args, message):
    if "--prompt-file" not in args and args != []:
        args = ["--prompt", "Hi", *args]
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, *args)
    assert code == 2 and out == ""
    assert err.startswith("gptlab generate: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda"], "--device cuda was asked for but CUDA is not available; use --device cpu or auto"),
        (["--compile"], "--compile records the decode step as a CUDA graph and needs CUDA, not cpu; drop --compile"),
    ],
)
def test_cli_gpu_options_without_a_gpu_exit_2_with_one_line(capsys, checkpoint, args, message):
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", "Hi", *args)
    assert (code, out, err) == (2, "", f"gptlab generate: error: {message}\n")


def test_cli_missing_checkpoint_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "--checkpoint", tmp_path / "nowhere", "--prompt", "Hi")
    assert code == 2 and out == "" and err.count("\n") == 1 and "nowhere" in err


# --- a real process: Ctrl-C and closed pipes ----------------------------------------------------------


def start_generate(*args) -> subprocess.Popen:
    """`python -m gptlab generate ...` with Ctrl-C raising KeyboardInterrupt in it, as in a terminal
    (a parent that ignores SIGINT, such as a background shell job, would otherwise pass that on)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gptlab", "generate", *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_until(process: subprocess.Popen, done, timeout: float = 60.0) -> bytes:
    """Read stdout as it comes until done(everything read so far), or fail after timeout seconds."""
    data, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not done(data):
            assert time.monotonic() < deadline, f"timed out; read {data[-200:]!r}"
            if selector.select(timeout=1.0):
                chunk = os.read(process.stdout.fileno(), 65536)
                assert chunk, f"stdout closed early; read {data[-200:]!r}"
                data += chunk
    return data


def finish(process: subprocess.Popen) -> tuple[int, bytes]:
    """The exit code and stderr, once the process ends (killed if it takes more than 30 s)."""
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, err


ENDLESS = ["--max-new-tokens", "1000000", "--seed", "1"]


@pytest.mark.slow
def test_ctrl_c_ends_one_shot_generation_quietly_with_130(random_checkpoint):
    process = start_generate("--checkpoint", random_checkpoint, "--prompt", "Hello", *ENDLESS)
    read_until(process, lambda data: len(data) > 200)
    process.send_signal(signal.SIGINT)
    code, err = finish(process)
    assert (code, err) == (130, b"")


@pytest.mark.slow
def test_ctrl_c_in_interactive_mode_stops_the_reply_and_twice_at_the_prompt_quits(random_checkpoint):
    process = start_generate("--checkpoint", random_checkpoint, "--interactive", *ENDLESS)
    process.stdin.write(b"first prompt\n")
    process.stdin.flush()
    first = read_until(process, lambda data: len(data) > 200)
    process.send_signal(signal.SIGINT)  # the endless reply stops ...
    process.stdin.write(b"second prompt\n")  # ... and the next prompt is answered
    process.stdin.flush()
    data = read_until(process, lambda data: len(data.partition(b"\nsecond prompt")[2]) > 200)
    process.send_signal(signal.SIGINT)
    read_until(process, lambda seen: seen.endswith(b"\n"), timeout=30)  # that reply's line is ended
    time.sleep(1.0)  # back at the prompt, waiting for a line
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    code, err = finish(process)
    assert first.startswith(b"first prompt") and b"second prompt" in data
    assert (code, err) == (130, b"\n(Ctrl-C again or Ctrl-D to quit)\n")


@pytest.mark.slow
def test_a_closed_pipe_ends_generation_quietly_with_141(random_checkpoint):
    """`gptlab generate ... | head -c 100`: the reader goes away, and generation stops without a traceback."""
    process = start_generate("--checkpoint", random_checkpoint, "--prompt", "Hello", *ENDLESS)
    read_until(process, lambda data: len(data) >= 100)
    process.stdout.close()
    code, err = finish(process)
    assert (code, err) == (141, b"")
