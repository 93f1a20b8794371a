"""`gptlab serve` against hostile and unusual requests, through real HTTP (the `openai` client where it applies):
each case of the server issue, next to good requests that must still get exactly what they get alone."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time
import urllib.request

import openai
import pytest
import torch
from serve_helpers import TINY, get_json, noisy_model, wait_until_idle

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.inference.generate import generate_text, generate_tokens
from gptlab.inference.sampling import MAX_SEED, GenerationOptions
from gptlab.loading import load_model
from gptlab.serve.background import BackgroundServer
from gptlab.tokenizer import load_tokenizer

PROMPT = "The meaning of life is"


def texts_alone(local, prompt: str, **options) -> list[str]:
    model, tokenizer = local
    rows = generate_tokens(model, [tokenizer.encode(prompt)], GenerationOptions(**options), eot_id=tokenizer.eot_id)
    return [tokenizer.decode([token.id for token in row]) for row in rows]


def post(url: str, body: dict | bytes, headers: dict | None = None, method: str = "POST") -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw else {}
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


# 1. One request must never kill the engine.


def test_the_largest_seed_with_n_2_is_served_and_the_server_stays_healthy(client, local, server):
    """seed + 1 passes 2**63 - 1: it wraps to 0 (sampling.offset_seed), as `gptlab generate` does too."""
    answer = client.completions.create(
        model="tiny-chat", prompt=PROMPT, n=2, seed=MAX_SEED, max_tokens=6, temperature=1
    )
    got = [choice.text for choice in sorted(answer.choices, key=lambda c: c.index)]
    assert got == texts_alone(local, PROMPT, max_new_tokens=6, temperature=1.0, seed=MAX_SEED, num_samples=2)
    assert got[1] == texts_alone(local, PROMPT, max_new_tokens=6, temperature=1.0, seed=0)[0]
    negative = client.completions.create(model="tiny-chat", prompt=PROMPT, seed=-1, max_tokens=6, temperature=1)
    assert negative.choices[0].text == got[0]  # -1 is 2**63 - 1 modulo 2**63
    assert get_json(server.url + "/health")[0] == 200
    assert (
        client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=2).choices[0].finish_reason == "length"
    )


# 2. Samples that end on their first token, next to requests decoding at that moment.


def test_samples_ending_on_their_first_token_do_not_disturb_the_others(client, local):
    first = texts_alone(local, PROMPT, max_new_tokens=1, temperature=0)[0]
    ending = [
        dict(max_tokens=1, n=3, temperature=1, seed=2),
        dict(max_tokens=8, n=2, temperature=0, stop=[first]),
        dict(max_tokens=8, n=2, temperature=0.7, seed=4, logit_bias={"50256": 100}),
    ]
    good = [dict(max_tokens=24, temperature=0.8, seed=seed) for seed in range(6)]

    def complete(options):
        stream = options is not None and "n" not in options
        answer = client.completions.create(model="tiny-chat", prompt=PROMPT, stream=stream, **options)
        if stream:
            return "".join(chunk.choices[0].text for chunk in answer if chunk.choices)
        return [(choice.text, choice.finish_reason) for choice in sorted(answer.choices, key=lambda c: c.index)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, options) for options in good[:3] + ending + good[3:]]
        results = [future.result() for future in futures]  # any 500 or stream error raises here
    ended = results[3:6]
    assert ended[0] == [
        (text, "length")
        for text in texts_alone(local, PROMPT, max_new_tokens=1, temperature=1.0, seed=2, num_samples=3)
    ]
    assert ended[1] == [("", "stop")] * 2 and ended[2] == [("", "stop")] * 2
    streamed = results[:3] + results[6:]
    assert streamed == [
        texts_alone(local, PROMPT, max_new_tokens=24, temperature=0.8, seed=seed)[0] for seed in range(6)
    ]


# 3. Sampling values that would make the logits non-finite.


def test_a_tiny_temperature_is_greedy_and_a_tiny_penalty_is_refused(client, local):
    tiny = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=8, temperature=1e-40, seed=1)
    assert tiny.choices[0].text == texts_alone(local, PROMPT, max_new_tokens=8, temperature=0)[0]
    with pytest.raises(openai.BadRequestError, match="repetition_penalty") as error:
        client.completions.create(
            model="tiny-chat", prompt=PROMPT, max_tokens=2, extra_body={"repetition_penalty": 1e-40}
        )
    assert error.value.body["param"] == "repetition_penalty"


# 4. Request-dependent costs are bounded at the door.


def test_long_stop_strings_and_too_many_prompts_are_400s_naming_the_limit(client, server):
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError, match="at most 1,000 characters") as error:
        client.completions.create(model="tiny-chat", prompt=PROMPT, stop=["ab" * 125_000] * 4, max_tokens=4)
    assert error.value.body["param"] == "stop" and time.perf_counter() - started < 10
    with pytest.raises(openai.BadRequestError, match="at most 64 prompts per request") as error:
        client.completions.create(model="tiny-chat", prompt=["hi"] * 100, max_tokens=1)
    assert error.value.body["param"] == "prompt"
    assert wait_until_idle(server.url)["requests_waiting"] == 0


def test_a_stop_string_near_the_limit_costs_little_per_token(client, local):
    """A 1,000-character stop that the text keeps almost matching is searched in linear time."""
    started = time.perf_counter()
    answer = client.completions.create(
        model="tiny-chat",
        prompt=PROMPT,
        stop=["e" * 999 + "!"] * 4,
        max_tokens=40,
        temperature=0,
        logit_bias={str(local[1].encode("e")[0]): 100},
    )
    assert answer.choices[0].finish_reason == "length" and time.perf_counter() - started < 20


# 5. A vocabulary padded past the tokenizer's.


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory):
    """A model of 50,304 rows (the 124M recipe's padding) whose 47 padded rows would win every draw."""
    tokenizer = load_tokenizer()
    model = noisy_model(TINY.replace(vocab_size=50304))
    with torch.no_grad():
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight[tokenizer.vocab_size :] = 5.0
    path = tmp_path_factory.mktemp("padded") / "padded"
    save_model(path, model, tokenizer)
    return path


def greedy_among_the_tokenizers_ids(model, tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding without the cache, the argmax over the tokenizer's own 50,257 rows at each step."""
    ids, new = tokenizer.encode(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            new.append(int(model(torch.tensor([ids + new]))[0, -1, : tokenizer.vocab_size].argmax()))
    return tokenizer.decode(new)


def test_a_padded_vocabulary_is_never_sampled_by_server_api_or_cli(padded_checkpoint, capsys):
    model, tokenizer = load_model(padded_checkpoint)
    assert model(torch.tensor([tokenizer.encode(PROMPT)]))[0, -1].argmax() >= tokenizer.vocab_size  # the trap is set
    expected = greedy_among_the_tokenizers_ids(model, tokenizer, PROMPT, 10)
    with BackgroundServer(padded_checkpoint) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        greedy = client.completions.create(model="padded", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=5)
        assert greedy.choices[0].text == expected
        sampled = client.completions.create(
            model="padded", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=3, n=3, logprobs=5
        )
        assert all(choice.finish_reason == "length" and len(choice.logprobs.tokens) == 10 for choice in sampled.choices)
    options = GenerationOptions(max_new_tokens=10, temperature=0)
    assert generate_text(model, tokenizer, [PROMPT], options) == [expected]
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(padded_checkpoint),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "10",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.rstrip("\n").endswith(expected.rstrip("\n"))


# 7. Exposure.


@pytest.fixture(scope="module")
def guarded_server(base_checkpoint):
    server = BackgroundServer(
        base_checkpoint,
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--idle-timeout",
        "1",
        "--allowed-origins",
        "https://app.example",
    )
    yield server
    server.stop()


def test_only_the_hosts_it_is_reached_by_are_answered(guarded_server):
    port = guarded_server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert post(guarded_server.url + "/tokenize", {"content": "hi"}, {"Host": host})[0] == 200
    status, _, body = post(guarded_server.url + "/tokenize", {"content": "hi"}, {"Host": "evil.example:80"})
    assert status == 400 and body["error"]["code"] == "invalid_host" and "--allowed-hosts" in body["error"]["message"]


def test_cors_only_for_the_origins_allowed(guarded_server, server):
    def preflight(url, origin):
        request = urllib.request.Request(
            url + "/v1/completions",
            method="OPTIONS",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("access-control-allow-origin")

    assert preflight(guarded_server.url, "https://app.example") == (200, "https://app.example")
    assert preflight(guarded_server.url, "https://evil.example")[1] is None
    assert preflight(server.url, "https://app.example")[1] is None  # off by default


def connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection (recv returns b"" or the answer, then b"") within seconds."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_idle_slowloris_and_slow_body_connections_are_closed(guarded_server):
    idle = [connection(guarded_server.url) for _ in range(20)]
    slowloris = [connection(guarded_server.url) for _ in range(10)]
    for sock in slowloris:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-a: ")
    started = time.perf_counter()
    assert all(closed_within(sock, 5) for sock in idle + slowloris)
    assert time.perf_counter() - started < 6
    slow_body = connection(guarded_server.url)
    slow_body.sendall(
        b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"content": '
    )
    slow_body.settimeout(5)
    assert b" 408 " in slow_body.recv(65536).split(b"\r\n")[0]
    keep_alive = connection(guarded_server.url)  # an answered request, then silence: closed after --idle-timeout
    keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert closed_within(keep_alive, 5)
    assert get_json(guarded_server.url + "/health")[0] == 200


def test_no_openapi_page_and_the_help_warns_about_the_key(server, capsys):
    status, _ = get_json_any(server.url + "/openapi.json")
    assert status == 404
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "GPTLAB_API_KEY" in help_text and "ps" in help_text and "--allowed-origins" in help_text


def get_json_any(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_listening_on_every_address_without_a_key_warns(base_checkpoint):
    with BackgroundServer(base_checkpoint, "--host", "0.0.0.0") as server:
        assert any("without an API key" in line for line in server.log)
        port = server.url.rsplit(":", 1)[1]
        assert get_json(f"http://127.0.0.1:{port}/health")[0] == 200


# 8. The shapes real clients send.


def test_chat_shapes_clients_send(client, local):
    model, tokenizer = local
    plain = client.chat.completions.create(
        model="x",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        max_tokens=8,
        temperature=0,
    )
    parts = client.chat.completions.create(
        model="x",
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
        ],
        max_tokens=8,
        temperature=0,
        response_format={"type": "text"},
        store=False,
        metadata={"k": "v"},
        user="u1",
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content and parts.model == "tiny-chat"
    with pytest.raises(openai.BadRequestError, match="role 'tool'") as error:
        client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "1"}],
        )
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
        )
    with pytest.raises(openai.BadRequestError, match="cannot constrain") as error:
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
        )
    assert error.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="no room is left for a reply") as error:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 400}])
    assert error.value.body["param"] == "messages" and error.value.body["code"] == "context_length_exceeded"


def test_strict_types_and_head(server):
    status, _, body = post(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": "5"})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert post(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 1})[0] == 200
    request = urllib.request.Request(server.url + "/", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and response.read() == b""


# 9. Running it.


def test_one_ctrl_c_exits_quietly_with_130(base_checkpoint):
    server = BackgroundServer(base_checkpoint)
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 130
    time.sleep(0.2)  # the reader thread collects what was left on stderr
    assert not any("Traceback" in line for line in server.log)


def test_a_runs_checkpoint_is_served_under_the_runs_name_and_any_id_is_answered(tmp_path):
    run = tmp_path / "runs" / "sorter"
    save_model(run / "best", noisy_model(TINY), load_tokenizer())
    (run / "gptlab-run.json").write_text('{"format": "gptlab-run"}\n')
    with BackgroundServer(run / "best") as server:
        assert get_json(server.url + "/v1/models")[1]["data"][0]["id"] == "sorter"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="gpt2", prompt="hi", max_tokens=1).model == "sorter"


# 10. Observability.


def test_metrics_in_prometheus_format_count_what_happened(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    def read() -> dict:
        status, raw = get_json_any(server.url + "/metrics")
        assert status == 200
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(raw.decode())
            for sample in family.samples
        }

    before = read()
    client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=5, n=2, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt=PROMPT, temperature=9)
    after = read()
    prompt_tokens = len(load_tokenizer().encode(PROMPT))
    assert after["gptlab_prompt_tokens_total{}"] - before["gptlab_prompt_tokens_total{}"] == prompt_tokens
    assert after["gptlab_generation_tokens_total{}"] - before["gptlab_generation_tokens_total{}"] == 10
    key = 'gptlab_errors_total{"type": "invalid_request_error"}'
    assert after[key] - before.get(key, 0) == 1
    ttft = "gptlab_time_to_first_token_seconds_count{}"
    assert after[ttft] - before[ttft] == 2  # one first token per sample
    assert (
        after["gptlab_inter_token_latency_seconds_count{}"] - before["gptlab_inter_token_latency_seconds_count{}"] == 8
    )
    assert after["gptlab_engine_healthy{}"] == 1 and "gptlab_requests_waiting{}" in after


def test_a_dead_engine_is_a_503_at_once(base_checkpoint):
    """The loop's thread ended: /health says so and a completion gets 503 at once rather than hanging."""
    import threading

    import uvicorn

    from gptlab.serve.app import create_app
    from gptlab.serve.engine import Engine
    from gptlab.serve.state import ServerState

    model, tokenizer = load_model(base_checkpoint)
    engine = Engine(model, tokenizer)
    engine.loop = lambda: (_ for _ in ()).throw(RuntimeError("the thread broke"))
    engine.start()
    engine.thread.join(5)
    state = ServerState(
        name="tiny", engine=engine, tokenizer=tokenizer, context_length=model.cfg.context_length, status="ready"
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        status, health = get_json(url + "/health")
        assert status == 503 and health["engine"] == "dead"
        started = time.perf_counter()
        status, _, body = post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 503 and "dead" in body["error"]["message"] and time.perf_counter() - started < 5
    finally:
        server.should_exit = True
        thread.join(10)
