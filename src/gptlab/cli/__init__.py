"""The `gptlab` command line: a thin shell over the package's functions. User mistakes end in one line on
stderr and exit code 2; with GPTLAB_TRACEBACK=1 in the environment they raise, with their traceback."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version

from ..interop.hf import DownloadError
from ..training.runtime import TrainingError
from . import finetune, generate, models, serve, train
from .common import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description="A GPT-2-style language model built from scratch.")
    parser.add_argument("--version", action="version", version=f"gptlab {version('gptlab')}")
    commands = parser.add_subparsers(dest="command", required=True)
    models.add_parsers(commands)
    generate.add_parsers(commands)
    train.add_parsers(commands)
    finetune.add_parsers(commands)
    serve.add_parsers(commands)
    return parser


TRACEBACK_VARIABLE = "GPTLAB_TRACEBACK"  # set (to anything but 0) to see the traceback of any error


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_traceback = os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")
    try:
        args.run(args)
    except (UserError, TrainingError, ValueError) as error:
        if show_traceback:
            raise
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except DownloadError as error:  # not the user's mistake: the network or an optional package is missing
        if show_traceback:
            raise
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
