"""`gptlab serve`: the OpenAI-compatible server (see gptlab/serve/)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

API_KEY_VARIABLE = "GPTLAB_API_KEY"

DESCRIPTION = f"""Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models),
and a playground page at /. Concurrent requests share the model: each joins the running batch at the
next step. Binds to 127.0.0.1 unless --host says otherwise. With --api-key (or ${API_KEY_VARIABLE})
every API call needs the header 'Authorization: Bearer KEY'. SIGTERM or Ctrl-C stops taking requests,
lets the ones in flight finish, and exits."""


def cmd_serve(args: argparse.Namespace) -> None:
    from ..serve.server import (  # FastAPI and uvicorn load only for this command
        ServeSettings,
        serve,
    )

    serve(ServeSettings(checkpoint=args.checkpoint, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                        quantize=args.quantize, model_name=args.model_name,
                        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
                        max_batch=args.max_batch, max_queue=args.max_queue))


def add_parsers(commands) -> None:
    parser = commands.add_parser("serve", help="serve a model with OpenAI's API and a playground page",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a gptlab checkpoint or Hugging Face GPT-2 folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    parser.add_argument("--model-name", help="the model's id in the API (default: the checkpoint folder's name)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE} if set)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights while generating")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="CPU only: int8 or int4 weights for the linear layers")
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together; a request with n samples "
                        "takes n (default 16)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for rows; more get 429 "
                        "(default 64)")
    parser.set_defaults(run=cmd_serve)
