"""Fixtures: the tiny checkpoints and the shared server (see serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import API_KEY, tiny_checkpoint

from gptlab.loading import load_model
from gptlab.serve.background import BackgroundServer


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat", chat_template="alpaca")


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-base")


@pytest.fixture(scope="session")
def server(chat_checkpoint) -> BackgroundServer:
    """The shared server: the tiny model with a chat template, default limits, no key."""
    server = BackgroundServer(chat_checkpoint)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def keyed_server(base_checkpoint) -> BackgroundServer:
    """A base model (no chat template) behind a key, with one row and no waiting line."""
    server = BackgroundServer(base_checkpoint, "--api-key", API_KEY, "--max-batch", "1", "--max-queue", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official openai client against the shared server, retrying nothing (a test sees every answer)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(chat_checkpoint):
    """The served model, loaded here, to generate the expected answers independently of the server."""
    return load_model(chat_checkpoint)
