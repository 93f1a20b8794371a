"""Running the server: the model loads in the background (GET /health answers 503 until it has), uvicorn
serves the app, and SIGTERM or Ctrl-C stops it gracefully: no new connections or requests, the
requests in flight (streams included) run to their end, then the engine and the process stop (exit code
0 after SIGTERM, 130 after Ctrl-C, as a shell reports it, and no traceback)."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from ..errors import UserError
from ..finetune.templates import chat_template_of
from ..inference.quantize import quantize_model
from ..loading import RUN_CHECKPOINTS, check_language_model, load_model
from ..training.runtime import pick_device
from ..training.state import RUN_MARKER
from .app import create_app
from .engine import Engine
from .guards import allowed_hosts, guarded_protocol, is_loopback
from .state import ServerState

EXIT_SIGINT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "float32"
    quantize: str | None = None
    model_name: str | None = None  # default: the run's name for runs/NAME/best or last, else the folder's name
    api_key: str | None = None
    max_batch: int = 16  # rows decoded together (a request with n samples takes n)
    max_queue: int = 64  # prompts waiting for rows before 429; also the most prompts one request may carry
    max_body_bytes: int = 1 << 20
    allowed_hosts: tuple[str, ...] = ()  # Host names answered to besides the bound address (guards.allowed_hosts)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (CORS); none by default
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    body_timeout: float = 30.0  # seconds for a request's body to arrive
    idle_timeout: int = 5  # seconds an idle keep-alive connection stays open
    max_connections: int = 256  # open connections at once; more are answered 503
    wedged_after: float = 60.0  # seconds without progress, with work to do, before /health says wedged

    def check(self) -> None:
        """Problems worth one line before anything starts: a ValueError naming the option."""
        check_language_model(Path(self.checkpoint))  # a bad folder or a classifier says what it is and what to pass
        device = pick_device(self.device)
        if self.quantize and device.type != "cpu":
            raise UserError(f"--quantize uses CPU kernels; add --device cpu (not {device.type}), or drop --quantize")
        if self.max_batch < 1 or self.max_queue < 0:
            raise UserError("--max-batch must be >= 1 and --max-queue >= 0")
        if (
            min(self.header_timeout, self.body_timeout, self.idle_timeout, self.wedged_after) <= 0
            or self.max_connections < 1
        ):
            raise UserError(
                "--header-timeout, --body-timeout, --idle-timeout and --wedged-after must be positive, and "
                "--max-connections at least 1"
            )

    @property
    def name(self) -> str:
        """The model's id in the API: --model-name, else the run's name for a run's checkpoint (runs/X/best
        → X), else the folder's name."""
        if self.model_name:
            return self.model_name
        folder = Path(self.checkpoint).resolve()
        if folder.name in RUN_CHECKPOINTS and (folder.parent / RUN_MARKER).is_file():
            return folder.parent.name
        return folder.name

    @property
    def exposed(self) -> bool:
        """Whether the server listens beyond this machine without a key."""
        return not is_loopback(self.host) and self.api_key is None


def load_engine(settings: ServeSettings, state: ServerState) -> None:
    """Load the model and start the engine; the routes answer from then on."""
    model, tokenizer = load_model(
        Path(settings.checkpoint), device=pick_device(settings.device), dtype=getattr(torch, settings.dtype)
    )
    model.eval()
    if settings.quantize:
        model = quantize_model(model, settings.quantize)
    state.tokenizer = tokenizer
    state.chat_template = chat_template_of(settings.checkpoint)
    state.context_length = model.cfg.context_length
    state.parameters = sum(parameter.numel() for parameter in model.parameters())
    state.engine = Engine(
        model, tokenizer, settings.max_batch, settings.max_queue, settings.wedged_after, state.metrics
    ).start()
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
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host") from None
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app and the engine when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.signals: list[int] = []

    def handle_exit(self, sig, frame) -> None:
        self.state.status = "stopping"  # new requests get 503; the ones in flight go on
        self.signals.append(sig)
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, which would end the process with a
        # traceback (SIGINT) or kill it before the engine stops (SIGTERM); serve() reports it instead
        self._captured_signals.clear()


def serve(settings: ServeSettings) -> None:
    """Serve until stopped. Bad settings raise ValueError before anything is bound or loaded."""
    settings.check()
    sock = bind(settings.host, settings.port)
    if settings.exposed:
        print(
            f"gptlab serve: warning: listening on {settings.host} without an API key: anyone who can reach this "
            f"machine can use the model; set GPTLAB_API_KEY (or --api-key), or listen on 127.0.0.1",
            file=sys.stderr,
            flush=True,
        )
    state = ServerState(
        name=settings.name,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        max_batch=settings.max_batch,
        max_prompts=max(1, settings.max_queue),
        created=int(time.time()),
    )
    app = create_app(
        state, allowed_hosts(settings.host, settings.allowed_hosts), settings.allowed_origins, settings.body_timeout
    )
    config = uvicorn.Config(
        app,
        log_level="info",
        access_log=False,
        http=guarded_protocol(settings.header_timeout),
        timeout_keep_alive=settings.idle_timeout,
        limit_concurrency=settings.max_connections,
    )
    server = GracefulServer(config, state)

    def load() -> None:
        try:
            load_engine(settings, state)
        except Exception as error:  # noqa: BLE001 (reported as one line, and the server stops)
            state.status = "failed"
            print(f"gptlab serve: error: could not load {settings.checkpoint}: {error}", file=sys.stderr)
            server.should_exit = True
            return
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(
            f"gptlab serve: {state.name} ({state.parameters:,} parameters, context {state.context_length}) at "
            f"http://{host}:{sock.getsockname()[1]}  (playground: /, OpenAI API: /v1)",
            file=sys.stderr,
            flush=True,
        )

    threading.Thread(target=load, name="gptlab-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.engine is not None:
            state.engine.stop()
    if state.status == "failed":
        raise SystemExit(1)
    if signal.SIGINT in server.signals:
        raise SystemExit(EXIT_SIGINT)
