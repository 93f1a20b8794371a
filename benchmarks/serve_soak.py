"""Soak `gptlab serve`: good streaming clients while hostile ones send every request that used to break it.

A random-weight checkpoint of gpt2-mini's shape is served by `gptlab serve` in a child process (localhost
only). Two phases of `--seconds` each, bounded in time and requests:

1. baseline: `--good` clients stream completions one after another (a 16-token prompt, 48 greedy tokens,
   end-of-text banned so each makes all 48);
2. soak: the same good clients while `--hostile` threads cycle through the hostile cases below.

Printed and written as JSON: good clients' failures (must be 0; a 429 with Retry-After is retried, as the
`openai` client does, and counted as a retry), their per-token latency p50/p95 in each phase and the ratio
(target: soak p95 within 2x of baseline p95), the hostile answers by status (a 5xx is a server fault and
counted), and whether `/health` is 200 and a greedy completion still equals its baseline answer at the end.

    .venv/bin/python benchmarks/serve_soak.py [--seconds 20] [--good 4] [--hostile 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import torch
from common import machine_info, write_report

from gptlab.checkpoint import save_model
from gptlab.config import get_config
from gptlab.model import GPTModel
from gptlab.serve.background import BackgroundServer
from gptlab.tokenizer import load_tokenizer

PROMPT_TOKENS, NEW_TOKENS = 16, 48
DEFAULT_OUT = Path(__file__).parent / "results" / "serve_soak.json"
SERVER_OPTIONS = (
    "--max-batch",
    "8",
    "--max-queue",
    "16",
    "--header-timeout",
    "2",
    "--body-timeout",
    "2",
    "--idle-timeout",
    "2",
)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def post(address, path: str, body: bytes, headers: dict | None = None, timeout: float = 60):
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    return connection, connection.getresponse()


class GoodClient:
    """Streams completions one after another until `stop` is set; records gaps between tokens."""

    def __init__(self, address, prompt: list[int], eot_id: int):
        self.address, self.eot_id = address, eot_id
        self.body = json.dumps(
            {
                "prompt": prompt,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "stream": True,
                "logit_bias": {str(eot_id): -100},
            }
        ).encode()
        self.gaps: list[float] = []
        self.failures: list[str] = []
        self.requests = self.retries = 0
        self.texts: Counter = Counter()

    def one(self) -> None:
        for _ in range(20):  # 429: wait as the server says, as the openai client does
            connection, response = post(self.address, "/v1/completions", self.body)
            if response.status != 429:
                break
            self.retries += 1
            delay = float(response.getheader("Retry-After") or 1)
            connection.close()
            time.sleep(delay)
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        arrivals, text, done = [], [], False
        for line in response:
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                arrivals.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
        connection.close()
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
        self.gaps.extend(later - earlier for earlier, later in zip(arrivals, arrivals[1:]))
        self.texts["".join(text)] += 1

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.requests += 1
            try:
                self.one()
            except Exception as error:  # noqa: BLE001 (counted and reported: the soak goes on)
                self.failures.append(repr(error))


def completion(**fields) -> bytes:
    return json.dumps({"prompt": "Once upon a time", "max_tokens": 4, **fields}).encode()


# Each hostile case: a name and a function of the server's address that returns a status (or a word).
def send_json(body: bytes, headers: dict | None = None, path: str = "/v1/completions"):
    def case(address):
        connection, response = post(address, path, body, headers)
        response.read()
        connection.close()
        return response.status

    return case


def disconnect_mid_stream(address):
    connection, response = post(address, "/v1/completions", completion(max_tokens=200, stream=True, n=2))
    response.fp.readline()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    return "disconnected"


def flood_queue(address):
    """More prompts at once than the queue holds: some 429s, never a 5xx."""
    statuses, threads = [], []
    for _ in range(24):
        threads.append(threading.Thread(target=lambda: statuses.append(send_json(completion(max_tokens=2))(address))))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return max(statuses)  # the worst answer counts


def idle_connections(address, count: int = 20):
    """Connections that send nothing: the server must close them after its header timeout."""
    sockets = [socket.create_connection((address.hostname, address.port)) for _ in range(count)]
    closed = 0
    for sock in sockets:
        sock.settimeout(10)
        try:
            closed += sock.recv(1) == b""
        except ConnectionError:
            closed += 1
        except TimeoutError:
            pass
        sock.close()
    return "closed" if closed == count else f"held {count - closed}"


def slowloris(address):
    """Headers sent a byte a second: the server must give up (408 or close) within its header timeout."""
    sock = socket.create_connection((address.hostname, address.port))
    sock.settimeout(10)
    try:
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n":
            sock.sendall(bytes([byte]))
            time.sleep(0.5)
        return "held"
    except (BrokenPipeError, ConnectionError):
        return "closed"
    finally:
        sock.close()


HOSTILE_CASES = {
    "largest seed, n=2": send_json(completion(n=2, seed=2**63 - 1, max_tokens=2)),
    "n=2, sample 0 ends at once": send_json(completion(n=2, max_tokens=1)),
    "stop string first": send_json(completion(n=3, stop=[" "], max_tokens=8)),
    "temperature 1e-40": send_json(completion(temperature=1e-40)),
    "repetition_penalty 1e-40": send_json(completion(repetition_penalty=1e-40)),
    "four 250,000-character stops": send_json(completion(stop=["x" * 250_000] * 4)),
    "100 prompts": send_json(json.dumps({"prompt": ["hi"] * 100, "max_tokens": 1}).encode()),
    "token id past the vocabulary": send_json(json.dumps({"prompt": [50_303, 99_999], "max_tokens": 1}).encode()),
    "max_tokens as a string": send_json(completion(max_tokens="5")),
    "malformed JSON": send_json(b'{"prompt": "hi", '),
    "2 MB body": send_json(completion(suffix="y" * 2_000_000)),
    "foreign Host header": send_json(completion(), {"Host": "evil.example"}),
    "chat with a tool message": send_json(
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), path="/v1/chat/completions"
    ),
    "disconnect mid-stream": disconnect_mid_stream,
    "flood the queue": flood_queue,
    "idle connections": idle_connections,
    "slowloris headers": slowloris,
}


def hostile(address, stop: threading.Event, start: int, answers: dict, lock: threading.Lock) -> None:
    names = list(HOSTILE_CASES)
    index = start
    while not stop.is_set():
        name = names[index % len(names)]
        index += 1
        try:
            answer = HOSTILE_CASES[name](address)
        except Exception as error:  # noqa: BLE001 (a refused or reset connection is an answer, reported as such)
            answer = type(error).__name__
        with lock:
            answers.setdefault(name, Counter())[str(answer)] += 1


def phase(address, prompt, eot_id, good: int, hostile_threads: int, seconds: float) -> tuple[list[GoodClient], dict]:
    clients = [GoodClient(address, prompt, eot_id) for _ in range(good)]
    answers: dict = {}
    stop, lock = threading.Event(), threading.Lock()
    threads = [threading.Thread(target=client.run, args=(stop,)) for client in clients]
    threads += [
        threading.Thread(target=hostile, args=(address, stop, index * 5, answers, lock))
        for index in range(hostile_threads)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return clients, answers


def summary(clients: list[GoodClient]) -> dict:
    gaps = [gap for client in clients for gap in client.gaps]
    failures = [failure for client in clients for failure in client.failures]
    return {
        "requests": sum(client.requests for client in clients),
        "failures": len(failures),
        "failure_messages": failures[:3],
        "retries_after_429": sum(client.retries for client in clients),
        "per_token_p50_ms": 1000 * percentile(gaps, 0.5),
        "per_token_p95_ms": 1000 * percentile(gaps, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="length of each phase")
    parser.add_argument("--good", type=int, default=4, help="good streaming clients")
    parser.add_argument("--hostile", type=int, default=3, help="hostile threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    prompt = torch.randint(
        0, tokenizer.vocab_size - 1, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "gpt2-mini-random"
        torch.manual_seed(0)
        save_model(checkpoint, GPTModel(get_config("gpt2-mini")).eval(), tokenizer)
        with BackgroundServer(checkpoint, *SERVER_OPTIONS) as server:
            address = urlparse(server.url)
            GoodClient(address, prompt, tokenizer.eot_id).one()  # warm-up
            base_clients, _ = phase(address, prompt, tokenizer.eot_id, args.good, 0, args.seconds)
            soak_clients, answers = phase(address, prompt, tokenizer.eot_id, args.good, args.hostile, args.seconds)
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            connection.request("GET", "/health")
            health = connection.getresponse().status
            after = GoodClient(address, prompt, tokenizer.eot_id)
            after.one()
    baseline, soak = summary(base_clients), summary(soak_clients)
    expected = set(sum((client.texts for client in base_clients), Counter()))
    answers_same = set(sum((client.texts for client in soak_clients), Counter())) | set(after.texts) == expected
    server_faults = sum(
        count for cases in answers.values() for status, count in cases.items() if status.startswith("5")
    )
    ratio = soak["per_token_p95_ms"] / baseline["per_token_p95_ms"]
    print(
        f"baseline ({args.good} good clients): {baseline['requests']} requests, per token p50 "
        f"{baseline['per_token_p50_ms']:.0f} ms, p95 {baseline['per_token_p95_ms']:.0f} ms, failures {baseline['failures']}"
    )
    print(
        f"soak (+{args.hostile} hostile): {soak['requests']} requests, per token p50 {soak['per_token_p50_ms']:.0f} ms, "
        f"p95 {soak['per_token_p95_ms']:.0f} ms, failures {soak['failures']}, retries after 429 {soak['retries_after_429']}"
    )
    for name, cases in answers.items():
        print(f"  hostile {name}: " + ", ".join(f"{status} x{count}" for status, count in sorted(cases.items())))
    print(
        f"soak p95 / baseline p95: {ratio:.2f}x (target <= 2); server faults (5xx) {server_faults}; "
        f"/health at the end {health}; greedy answers unchanged: {answers_same}"
    )
    write_report(
        {
            "benchmark": "serve_soak",
            "machine": machine_info(),
            "seconds": args.seconds,
            "good": args.good,
            "hostile": args.hostile,
            "server_options": SERVER_OPTIONS,
            "baseline": baseline,
            "soak": soak,
            "p95_ratio": ratio,
            "hostile_answers": {name: dict(cases) for name, cases in answers.items()},
            "server_faults": server_faults,
            "health_at_end": health,
            "answers_unchanged": answers_same,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
