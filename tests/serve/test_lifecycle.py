"""The server's life: loading (503), a client going away, SIGTERM with a stream in flight, and start-up
mistakes reported in one line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from fastapi.testclient import TestClient
from serve_helpers import get_json, wait_until_idle

from gptlab.serve.app import create_app
from gptlab.serve.background import BackgroundServer
from gptlab.serve.state import ServerState


def test_health_and_api_answer_503_while_loading():
    client = TestClient(create_app(ServerState(name="loading-model")))
    response = client.get("/health")
    assert response.status_code == 503 and response.json() == {"status": "loading"}
    response = client.post("/v1/completions", json={"prompt": "Hi"})
    assert response.status_code == 503 and "still loading" in response.json()["error"]["message"]
    assert response.headers["Retry-After"] == "1"


def test_a_chunked_body_over_the_limit_gets_413():
    client = TestClient(create_app(ServerState(name="m", max_body_bytes=1000)))
    response = client.post(
        "/v1/completions", content=(b"x" * 400 for _ in range(3)), headers={"Content-Type": "application/json"}
    )  # no Content-Length: sent in chunks
    assert response.status_code == 413 and "larger than 1,000 bytes" in response.json()["error"]["message"]


def read_events(response) -> list[dict]:
    events = []
    for line in response:
        line = line.decode().strip()
        if line == "data: [DONE]":
            return events
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def stream(url: str, **body):
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({"stream": True, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=60)


def test_a_client_that_goes_away_frees_its_rows(server):
    response = stream(server.url, prompt="Going away", max_tokens=250, temperature=0)
    response.readline()  # the first event has arrived: the request is decoding
    response.close()
    health = wait_until_idle(server.url)
    assert health["requests_decoding"] == 0 and health["requests_waiting"] == 0
    status, health = get_json(server.url + "/health")
    assert status == 200 and health["status"] == "ready"


def test_sigterm_finishes_the_stream_in_flight_then_exits(base_checkpoint):
    server = BackgroundServer(base_checkpoint)
    response = stream(server.url, prompt="Before the signal", max_tokens=200, temperature=0)
    first = response.readline()
    assert first.startswith(b"data: ")
    server.process.send_signal(signal.SIGTERM)
    events = read_events(response)  # the stream runs to its end, then [DONE]
    pieces = [json.loads(first[6:])] + events
    assert pieces[-1]["choices"][0]["finish_reason"] == "length"
    server.process.wait(timeout=30)
    assert "Shutting down" in "".join(server.log)
    host, port = server.url.removeprefix("http://").split(":")
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection((host, int(port)), timeout=2)


def run_serve(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptlab", "serve", *options], capture_output=True, text=True, timeout=60, check=False
    )


def test_start_up_mistakes_are_one_line_and_exit_2(tmp_path, base_checkpoint):
    result = run_serve("--checkpoint", str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "nothing-here" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_serve("--checkpoint", str(base_checkpoint), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and "pick another --port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
