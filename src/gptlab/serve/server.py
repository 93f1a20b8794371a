"""Running the server: the model loads in the background (GET /health answers 503 until it has), uvicorn
serves the app, and SIGTERM or Ctrl-C stops it gracefully: no new connections or requests, the
requests in flight (streams included) run to their end, then the engine and the process stop."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from ..finetune.templates import chat_template_of
from ..inference.quantize import quantize_model
from ..loading import check_language_model, load_model
from ..training.runtime import pick_device
from .app import create_app
from .engine import Engine
from .state import ServerState


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "float32"
    quantize: str | None = None
    model_name: str | None = None  # default: the checkpoint folder's name
    api_key: str | None = None
    max_batch: int = 16  # rows decoded together (a request with n samples takes n)
    max_queue: int = 64  # requests waiting for rows before 429
    max_body_bytes: int = 1 << 20

    def check(self) -> None:
        """Problems worth one line before anything starts: a ValueError naming the option."""
        check_language_model(Path(self.checkpoint))  # a bad folder or a classifier says what it is and what to pass
        device = pick_device(self.device)
        if self.quantize and device.type != "cpu":
            raise ValueError(f"--quantize uses CPU kernels; add --device cpu (not {device.type}), or drop --quantize")
        if self.max_batch < 1 or self.max_queue < 0:
            raise ValueError("--max-batch must be >= 1 and --max-queue >= 0")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.checkpoint).resolve().name


def load_engine(settings: ServeSettings, state: ServerState) -> None:
    """Load the model and start the engine; the routes answer from then on."""
    model, tokenizer = load_model(Path(settings.checkpoint), device=pick_device(settings.device),
                                  dtype=getattr(torch, settings.dtype))
    model.eval()
    if settings.quantize:
        model = quantize_model(model, settings.quantize)
    state.tokenizer = tokenizer
    state.chat_template = chat_template_of(settings.checkpoint)
    state.context_length = model.cfg.context_length
    state.parameters = sum(parameter.numel() for parameter in model.parameters())
    state.engine = Engine(model, tokenizer, settings.max_batch, settings.max_queue).start()
    if state.status == "loading":
        state.status = "ready"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads, so a taken port is a one-line error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host") from None
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app and the engine when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        self.state.status = "stopping"  # new requests get 503; the ones in flight go on
        super().handle_exit(sig, frame)


def serve(settings: ServeSettings) -> None:
    """Serve until stopped. Bad settings raise ValueError before anything is bound or loaded."""
    settings.check()
    sock = bind(settings.host, settings.port)
    state = ServerState(name=settings.name, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                        created=int(time.time()))
    server = GracefulServer(uvicorn.Config(create_app(state), log_level="info", access_log=False), state)

    def load() -> None:
        try:
            load_engine(settings, state)
        except Exception as error:  # noqa: BLE001 (reported as one line, and the server stops)
            state.status = "failed"
            print(f"gptlab serve: error: could not load {settings.checkpoint}: {error}", file=sys.stderr)
            server.should_exit = True
            return
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"gptlab serve: {state.name} ({state.parameters:,} parameters, context {state.context_length}) at "
              f"http://{host}:{sock.getsockname()[1]}  (playground: /, OpenAI API: /v1)", file=sys.stderr, flush=True)

    threading.Thread(target=load, name="gptlab-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.engine is not None:
            state.engine.stop()
    if state.status == "failed":
        raise SystemExit(1)
