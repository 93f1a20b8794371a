"""The `gptlab` command line: a thin shell over the package's functions.

A mistake in what the user gave (a UserError, gptlab/errors.py) ends in one line on stderr and exit code
2; a failed download in one line and exit code 1. Anything else is a bug in gptlab: its traceback is
printed with a line asking for a report, exit code 1. GPTLAB_TRACEBACK=1 in the environment shows the
traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from importlib.metadata import version

from ..errors import DownloadError, UserError
from . import finetune, generate, models, serve, train


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
    except (UserError, DownloadError) as error:
        if show_traceback:
            raise
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UserError) else 1  # a download failed: not the user's mistake
    except Exception:
        traceback.print_exc()
        print(f"gptlab {args.command}: internal error: this is a bug in gptlab {version('gptlab')}, not in what you "
              f"gave it; please report it with the traceback above", file=sys.stderr)
        return 1
    return 0
