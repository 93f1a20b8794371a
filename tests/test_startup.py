"""Start-up costs only what is used: `gptlab --version` and `--help` load no model code (not even torch),
`gptlab X --help` none of torch's FSDP and distributed checkpointing, FastAPI, uvicorn or transformers,
and `import gptlab` only what its public names need. Each check runs in a fresh interpreter and reads
its sys.modules."""

import json
import os
import subprocess
import sys

import pytest

import gptlab
from gptlab.cli.common import COMMANDS

NEVER_FOR_HELP = ["torch.distributed.fsdp", "torch.distributed.checkpoint", "fastapi", "uvicorn", "transformers"]


def loaded_after(code: str, watched: list[str]) -> list[str]:
    """Which of `watched` a fresh interpreter has in sys.modules after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([name for name in {watched!r} if name in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def help_of(*argvs: list[str]) -> str:
    """Code that runs gptlab's main on each argv, as `gptlab ... --help` would, quietly."""
    return (
        "import contextlib, io\nfrom gptlab.cli import main\n"
        f"for argv in {list(argvs)!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)"
    )


def test_version_and_help_load_no_model_code():
    assert loaded_after(help_of(["--version"], ["--help"]), ["torch", "numpy", "gptlab.model"]) == []


def test_each_commands_help_loads_none_of_what_it_does_not_need():
    argvs = [[name, "--help"] for name in COMMANDS] + [
        ["finetune", task, "--help"] for task in ("instruct", "classify")
    ]
    assert loaded_after(help_of(*argvs), NEVER_FOR_HELP) == []
    assert loaded_after(help_of(["serve", "--help"]), ["torch"]) == []  # serve's options need no model code


def test_a_commands_help_is_its_own():
    """Only the command given gets its options; the others are listed by their line of help."""
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--micro-batch-size" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )  # one line per command
    lines = result.stdout.splitlines()
    assert all(any(line.split() == [name, *help.split()] for line in lines) for name, (_, help) in COMMANDS.items())


def test_import_gptlab_loads_what_its_names_need():
    assert loaded_after("import gptlab", ["torch", "gptlab.model"]) == []
    assert loaded_after("import gptlab; gptlab.GPTModel", NEVER_FOR_HELP + ["gptlab.training"]) == []
    assert loaded_after("import gptlab; gptlab.generate", NEVER_FOR_HELP + ["gptlab.training.trainer"]) == []
    assert loaded_after("import gptlab.serve.engine", ["fastapi", "uvicorn"]) == []
    assert loaded_after("import gptlab; gptlab.train", ["torch.distributed.fsdp"]) == []  # until a run shards


def test_the_public_names_resolve():
    for name in gptlab.__all__:
        assert getattr(gptlab, name) is not None and name in dir(gptlab)
    assert gptlab.train.__module__ == "gptlab.finetune.pipeline"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gptlab.nothing
