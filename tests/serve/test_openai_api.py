"""`gptlab serve` through the official `openai` client: what it generates equals gptlab's own generation
run in this process on the same weights, and errors arrive as the client's own exception types."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import urllib.request

import openai
import pytest
import torch
from serve_helpers import API_KEY, get_json, wait_until_idle

from gptlab.finetune.templates import chat_prompt_ids
from gptlab.inference.generate import generate_tokens
from gptlab.inference.sampling import GenerationOptions

PROMPT = "The meaning of life is"
JSON = {"Content-Type": "application/json"}


def expected(local, prompt_ids: list[int], **options) -> list[list[int]]:
    model, tokenizer = local
    rows = generate_tokens(model, [prompt_ids], GenerationOptions(**options), eot_id=tokenizer.eot_id)
    return [[token.id for token in row] for row in rows]


def test_completion_equals_local_greedy_generation(client, local):
    tokenizer = local[1]
    answer = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=12, temperature=0)
    (ids,) = expected(local, tokenizer.encode(PROMPT), max_new_tokens=12, temperature=0)
    assert answer.choices[0].text == tokenizer.decode(ids)
    assert answer.choices[0].finish_reason == "length"
    assert answer.object == "text_completion" and answer.model == "tiny-chat"
    assert answer.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and answer.usage.completion_tokens == 12


def test_stream_gives_the_same_text_in_pieces_and_usage_last(client):
    whole = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model="tiny-chat",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(pieces) > 5 and "".join(pieces) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"


def test_n_samples_with_a_seed_equal_local_rows(client, local):
    """Row r of a request draws with seed + r, as row r of gptlab.generate does."""
    tokenizer = local[1]
    answer = client.completions.create(
        model="tiny-chat", prompt=PROMPT, max_tokens=10, n=3, seed=7, temperature=0.9, extra_body={"top_k": 40}
    )
    rows = expected(
        local, tokenizer.encode(PROMPT), max_new_tokens=10, temperature=0.9, top_k=40, seed=7, num_samples=3
    )
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert [choice.text for choice in answer.choices] == [tokenizer.decode(row) for row in rows]
    assert len({choice.text for choice in answer.choices}) == 3


def test_prompt_list_and_token_prompts(client, local):
    """Two prompts, the second as token ids: choices 0 and 1 in order, each as it would be alone."""
    tokenizer = local[1]
    second = tokenizer.encode(" Once upon a time")
    answer = client.completions.create(
        model="tiny-chat", prompt=[[*tokenizer.encode(PROMPT)], second], max_tokens=6, temperature=0
    )
    assert [choice.text for choice in answer.choices] == [
        tokenizer.decode(expected(local, ids, max_new_tokens=6, temperature=0)[0])
        for ids in (tokenizer.encode(PROMPT), second)
    ]


def test_stop_string_ends_the_text_before_it(client, local):
    tokenizer = local[1]
    (ids,) = expected(local, tokenizer.encode(PROMPT), max_new_tokens=12, temperature=0)
    full = tokenizer.decode(ids)
    stop = tokenizer.decode(ids[4:6])
    answer = client.completions.create(
        model="tiny-chat", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"]
    )
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_logprobs_equal_the_uncached_log_softmax(client, local):
    model, tokenizer = local
    prompt_ids = tokenizer.encode(PROMPT)
    answer = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    (ids,) = expected(local, prompt_ids, max_new_tokens=5, temperature=0)
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt_ids + ids]))[0].log_softmax(-1)  # (T, V)
    got = answer.choices[0].logprobs
    assert got.tokens == [tokenizer.decode([token]) for token in ids]
    for step, token in enumerate(ids):
        position = len(prompt_ids) + step - 1
        assert got.token_logprobs[step] == pytest.approx(logprobs[position, token].item(), abs=1e-4)
        top = logprobs[position].topk(3)
        assert list(got.top_logprobs[step].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert got.text_offset == [len(tokenizer.decode(ids[:step])) for step in range(5)]


def test_echo_with_logprobs_scores_the_prompt(client, local):
    model, tokenizer = local
    prompt_ids = tokenizer.encode(PROMPT)
    answer = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt_ids]))[0].log_softmax(-1)
    assert answer.choices[0].text == PROMPT
    assert answer.choices[0].logprobs.token_logprobs[0] is None
    assert answer.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [logprobs[t - 1, prompt_ids[t]].item() for t in range(1, len(prompt_ids))], abs=1e-4
    )


def test_penalties_and_logit_bias(client, local):
    """A logit_bias of +3 on one token (far above this random model's spread of logits) makes greedy
    decoding pick it every time; frequency and presence penalties of 2 (minus 2 per use, minus 2 once
    used, as OpenAI defines them) take it back below the others after one use."""
    tokenizer = local[1]
    token = tokenizer.encode(" banana")[0]
    forced = client.completions.create(
        model="tiny-chat", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(token): 3}
    )
    assert forced.choices[0].text == " banana" * 4
    penalised = client.completions.create(
        model="tiny-chat",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logit_bias={str(token): 3},
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert penalised.choices[0].text.startswith(" banana") and penalised.choices[0].text != " banana" * 4


def test_chat_reply_equals_local_generation_from_the_template(client, local):
    tokenizer = local[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0)
    (ids,) = expected(local, chat_prompt_ids(tokenizer, messages, "alpaca"), max_new_tokens=8, temperature=0)
    assert answer.choices[0].message.content == tokenizer.decode(ids)
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
    streamed = list(
        client.chat.completions.create(
            model="tiny-chat", messages=messages, max_completion_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == tokenizer.decode(ids)


def test_concurrent_streams_each_get_what_they_get_alone(client):
    """Six streaming clients at once, each with its own seed, sampling options and length, get exactly
    the text each gets when it is the only request."""
    requests = [
        dict(
            prompt=f"Story {i}:",
            max_tokens=8 + 4 * i,
            temperature=0.5 + 0.1 * i,
            seed=100 + i,
            top_p=0.9 if i % 2 else 1.0,
            stop=["zzz"],
        )
        for i in range(6)
    ]

    def streamed(request: dict) -> str:
        stream = client.completions.create(model="tiny-chat", stream=True, **request)
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    alone = [streamed(request) for request in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(streamed, requests))
    assert together == alone
    assert len(set(alone)) == len(alone)


def test_bad_requests_raise_the_clients_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens can be at most"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=1000)
    assert client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=1).model == "tiny-chat"  # one model
    with pytest.raises(openai.BadRequestError, match="more than the model's context"):
        client.completions.create(model="tiny-chat", prompt=list(range(300)))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, temperature=5)
    with pytest.raises(openai.BadRequestError, match="unknown field 'tools'"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, extra_body={"tools": []})
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError, match="logprobs: Input should be less than or equal to 5"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, logprobs=6)
    with pytest.raises(openai.BadRequestError, match="n must be at most 16"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, n=17)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny-chat", prompt=[50257])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary") as error:
        client.completions.create(model="tiny-chat", prompt=PROMPT, logit_bias={"99999": 1})
    assert error.value.body["param"] == "logit_bias"


def test_malformed_json_and_a_body_over_the_limit(server):
    request = urllib.request.Request(server.url + "/v1/completions", data=b'{"prompt": "Hi", ', headers=JSON)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(error.value.read())
    assert error.value.code == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    # a declared length over 1 MiB is refused before the body is read
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "larger than 1,048,576 bytes" in json.loads(response.read())["error"]["message"]


def test_models_health_tokenize_and_page(server, local):
    tokenizer = local[1]
    status, models = get_json(server.url + "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny-chat" and models["data"][0]["max_model_len"] == 256
    assert models["data"][0]["parameters"] == sum(p.numel() for p in local[0].parameters())
    status, health = get_json(server.url + "/health")
    assert status == 200 and health["status"] == "ready"
    request = urllib.request.Request(
        server.url + "/tokenize", data=json.dumps({"content": PROMPT}).encode(), headers=JSON
    )
    with urllib.request.urlopen(request) as response:
        tokens = json.loads(response.read())["tokens"]
    assert tokens == tokenizer.encode(PROMPT)
    request = urllib.request.Request(
        server.url + "/detokenize", data=json.dumps({"tokens": tokens}).encode(), headers=JSON
    )
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read())["content"] == PROMPT
    with urllib.request.urlopen(server.url + "/") as response:
        assert response.headers["Content-Type"].startswith("text/html") and b"<html" in response.read()


def test_api_key_base_model_chat_and_busy_server(keyed_server):
    keyless = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        keyless.completions.create(model="tiny-base", prompt=PROMPT)
    status, body = get_json(keyed_server.url + "/v1/models")
    assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Hi"}])
    # the one row is taken by a long stream, and nothing may wait: the next request gets 429 with Retry-After
    stream = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=240, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as error:
        client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=3)
    assert error.value.response.headers["Retry-After"] == "1"
    stream.close()  # the server notices and frees the row
    assert wait_until_idle(keyed_server.url)["requests_decoding"] == 0
