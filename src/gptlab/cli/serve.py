"""`gptlab serve`: the OpenAI-compatible server (see gptlab/serve/)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import add_command

API_KEY_VARIABLE = "GPTLAB_API_KEY"

DESCRIPTION = f"""Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models),
Prometheus metrics at /metrics and a playground page at /. Concurrent requests share the model: each joins
the running batch at the next step. The model's id is --model-name, else the run's name (runs/NAME/best is
served as NAME), and requests may name any model: the one served answers.

Binds to 127.0.0.1 unless --host says otherwise, and answers only to the Host names it is reached by there
(--allowed-hosts adds others). With ${API_KEY_VARIABLE} (or --api-key) every API call needs the header
'Authorization: Bearer KEY'; prefer the variable, since other users of the machine can read a command
line (ps). Listening beyond this machine without a key prints a warning. SIGTERM or Ctrl-C stops taking
requests, lets the ones in flight finish, and exits."""


def cmd_serve(args: argparse.Namespace) -> None:
    from ..serve.server import (  # FastAPI and uvicorn load only for this command
        ServeSettings,
        serve,
    )

    serve(
        ServeSettings(
            checkpoint=args.checkpoint,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            model_name=args.model_name,
            api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            allowed_hosts=tuple(args.allowed_hosts or ()),
            allowed_origins=tuple(args.allowed_origins or ()),
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            wedged_after=args.wedged_after,
        )
    )


def add_parsers(commands) -> None:
    parser = add_command(
        commands, "serve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="a gptlab checkpoint or Hugging Face GPT-2 folder"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--model-name",
        help="the model's id in the API (default: the run's name for runs/NAME/best "
        "or last, else the checkpoint folder's name)",
    )
    parser.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE} if set); "
        f"visible to other users in `ps`, so prefer {API_KEY_VARIABLE}",
    )
    parser.add_argument(
        "--allowed-hosts",
        nargs="+",
        metavar="HOST",
        help="Host names to answer to besides the bound address (and localhost on a loopback one); * for any",
    )
    parser.add_argument(
        "--allowed-origins",
        nargs="+",
        metavar="ORIGIN",
        help="browser origins whose pages may call the API (CORS), e.g. https://app.example.com; default: none",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights while generating"
    )
    parser.add_argument(
        "--quantize", choices=["int8", "int4"], help="CPU only: int8 or int4 weights for the linear layers"
    )
    parser.add_argument(
        "--max-batch", type=int, default=16, help="rows decoded together; a request with n samples takes n (default 16)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="prompts that may wait for rows; more get 429 (default 64; also the most prompts one request may carry)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a request's headers may take to arrive before the connection is closed (default 10)",
    )
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a request's body may take (default 30)"
    )
    parser.add_argument(
        "--idle-timeout", type=int, default=5, help="seconds an idle keep-alive connection stays open (default 5)"
    )
    parser.add_argument(
        "--max-connections", type=int, default=256, help="open connections at once; more get 503 (default 256)"
    )
    parser.add_argument(
        "--wedged-after",
        type=float,
        default=60.0,
        help="seconds without progress, with work to do, before /health answers 503 'wedged' (default 60)",
    )
    parser.set_defaults(run=cmd_serve)
