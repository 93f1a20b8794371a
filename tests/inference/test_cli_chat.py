"""`gptlab generate --chat`: the reply is the greedy continuation of the template's ids (as training
tokenized them), it ends at end-of-text, an interactive conversation is re-templated every turn and loses
its oldest exchanges once it outgrows the context, and a model without a template is one line."""

from __future__ import annotations

import io
import json

import pytest
from generation_helpers import (
    one_thread,
    random_model,
    save_random_checkpoint,
    scripted_model,
)

from gptlab.checkpoint import CONFIG_FILE, save_model
from gptlab.cli import generate as cli
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.finetune.templates import chat_prompt_ids
from gptlab.inference.generate import GenerationOptions, generate_ids
from gptlab.loading import load_model
from gptlab.tokenizer import load_tokenizer

REPLY = "Sorted: a b c"

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def save_chat_model(path, model, tokenizer, template):
    """A checkpoint as `gptlab finetune instruct` leaves it: the template's name in config.json."""
    save_model(path, model, tokenizer)
    meta = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**meta, "chat_template": template}))
    return path


@pytest.fixture(scope="module")
def random_chat(tmp_path_factory, tokenizer):
    """Random weights, context 128 (an Alpaca prompt alone is 33 tokens): the model and one checkpoint per template."""
    model = random_model(GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=1))
    folder = tmp_path_factory.mktemp("chat")
    return model, {
        template: save_chat_model(folder / template, model, tokenizer, template) for template in ("alpaca", "chatml")
    }


@pytest.fixture(scope="module")
def scripted_chat(tmp_path_factory, tokenizer):
    """Answers REPLY and end-of-text to any prompt ending in a newline (both templates' prompts do), in a
    context of 128."""
    model = scripted_model(tokenizer.encode("\n") + tokenizer.encode(REPLY) + [tokenizer.eot_id], context_length=128)
    return save_chat_model(tmp_path_factory.mktemp("chat") / "scripted", model, tokenizer, "chatml")


def run_cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def record_prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids of every reply the command generates (the real stream_ids still generates them)."""
    prompts = []

    def recording(model, tokenizer, prompt_rows, options, settings):
        prompts.extend(map(list, prompt_rows))
        return stream_ids(model, tokenizer, prompt_rows, options, settings)

    stream_ids = cli.stream_ids
    monkeypatch.setattr(cli, "stream_ids", recording)
    return prompts


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize("template, system", [("alpaca", None), ("chatml", "Answer in one word.")])
def test_chat_reply_is_the_greedy_continuation_of_the_templated_ids(capsys, tokenizer, random_chat, template, system):
    model, checkpoints = random_chat
    args = [
        "--checkpoint",
        checkpoints[template],
        "--chat",
        "--prompt",
        "Sort: c a b",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ]
    code, out, err = run_cli(capsys, *args, *(["--system", system] if system else []))
    messages = ([{"role": "system", "content": system}] if system else []) + [user("Sort: c a b")]
    expected = generate_ids(
        model,
        [chat_prompt_ids(tokenizer, messages, template)],
        GenerationOptions(max_new_tokens=12, temperature=0),
        eot_id=tokenizer.eot_id,
    )[0]
    assert (code, out, err) == (0, tokenizer.decode(expected) + "\n", "")  # the reply only, not the template


def test_chat_reply_ends_at_end_of_text_or_a_stop_string(capsys, scripted_chat):
    args = [
        "--checkpoint",
        scripted_chat,
        "--chat",
        "--prompt",
        "Sort: c a b",
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
    ]
    assert run_cli(capsys, *args) == (0, REPLY + "\n", "")
    assert run_cli(capsys, *args, "--stop", " b") == (0, "Sorted: a\n", "")
    samples = f"--- sample 1 of 2 ---\n{REPLY}\n--- sample 2 of 2 ---\n{REPLY}\n"
    assert run_cli(capsys, *args, "--num-samples", "2") == (0, samples, "")


def test_interactive_chat_sends_the_whole_conversation_each_turn(capsys, tokenizer, scripted_chat, monkeypatch):
    prompts = record_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("Sort: c a b\nAnd b a?\n"))
    code, out, err = run_cli(
        capsys,
        "--checkpoint",
        scripted_chat,
        "--chat",
        "--interactive",
        "--system",
        r"Sort.\n",
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
    )
    system = {"role": "system", "content": "Sort.\n"}
    assert (code, out, err) == (0, REPLY + "\n" + REPLY + "\n", "")
    assert prompts == [
        chat_prompt_ids(tokenizer, [system, user("Sort: c a b")], "chatml"),
        chat_prompt_ids(tokenizer, [system, user("Sort: c a b"), assistant(REPLY), user("And b a?")], "chatml"),
    ]


def test_a_long_conversation_drops_its_oldest_exchanges_and_says_so_once(capsys, tokenizer, scripted_chat, monkeypatch):
    prompts = record_prompts(monkeypatch)
    lines = ["Sort: c a b", "Sort: f e d", "Sort: z y x", "Sort: q p"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code, out, err = run_cli(
        capsys, "--checkpoint", scripted_chat, "--chat", "--interactive", "--temperature", "0", "--max-new-tokens", "20"
    )
    limit = 128 - 20  # the context less room for the reply

    def turns(*indices):
        return [message for i in indices for message in (user(lines[i]), assistant(REPLY))]

    third = [user(lines[2])]
    assert len(chat_prompt_ids(tokenizer, turns(0, 1) + third, "chatml")) > limit  # so the first exchange goes
    assert len(chat_prompt_ids(tokenizer, turns(1) + third, "chatml")) <= limit
    assert prompts == [
        chat_prompt_ids(tokenizer, [user(lines[0])], "chatml"),
        chat_prompt_ids(tokenizer, turns(0) + [user(lines[1])], "chatml"),
        chat_prompt_ids(tokenizer, turns(1) + third, "chatml"),
        chat_prompt_ids(tokenizer, turns(2) + [user(lines[3])], "chatml"),
    ]
    assert (code, out) == (0, (REPLY + "\n") * 4)
    assert err == (
        f"(the conversation outgrew the {limit} tokens the context leaves for it: its oldest exchanges are dropped)\n"
    )


def test_a_message_longer_than_the_context_keeps_its_end(capsys, tokenizer, scripted_chat, monkeypatch):
    prompts = record_prompts(monkeypatch)
    message = "x." * 80 + "Sort: c a b"
    code, out, err = run_cli(
        capsys,
        "--checkpoint",
        scripted_chat,
        "--chat",
        "--prompt",
        message,
        "--temperature",
        "0",
        "--max-new-tokens",
        "200",
    )
    templated = chat_prompt_ids(tokenizer, [user(message)], "chatml")
    assert prompts == [templated[-64:]]  # the reply's room is at most half the context of 128
    assert (code, out) == (0, REPLY + "\n")
    assert err == (
        f"warning: the message has {len(templated)} tokens in its template, more than the 64 the context "
        "leaves for it; keeping its last 64\n"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ctrl_c_during_a_reply_forgets_that_exchange(capsys, tokenizer, scripted_chat, monkeypatch):
    prompts = record_prompts(monkeypatch)
    recorded = cli.stream_ids

    def interrupted_once(*args):
        for number, row_and_piece in enumerate(recorded(*args)):
            if len(prompts) == 1 and number == 1:
                raise KeyboardInterrupt  # what Ctrl-C raises, after the first reply's first piece
            yield row_and_piece

    monkeypatch.setattr(cli, "stream_ids", interrupted_once)
    monkeypatch.setattr("sys.stdin", Terminal("Sort: c a b\nSort: f e d\n"))
    code, out, err = run_cli(capsys, "--checkpoint", scripted_chat, "--chat", "--interactive", "--temperature", "0")
    first_piece = tokenizer.decode(tokenizer.encode(REPLY)[:1])
    assert (code, out) == (0, "> " + first_piece + "\n> " + REPLY + "\n> \n")
    assert prompts[1] == chat_prompt_ids(tokenizer, [user("Sort: f e d")], "chatml")
    parameters = sum(p.numel() for p in load_model(scripted_chat)[0].parameters())
    assert err == (
        f"{scripted_chat}, {parameters:,} parameters, chatml template. One message per line; Ctrl-C stops "
        "a reply, Ctrl-D or Ctrl-C twice quits.\n"
    )


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer):
    return save_random_checkpoint(tmp_path_factory.mktemp("base") / "base", tokenizer)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--chat", "--prompt", "Hi"],
            "{base} was not instruction-tuned (no chat_template in its config.json); "
            "fine-tune it with `gptlab finetune instruct`, or drop --chat",
        ),
        (
            ["--prompt", "Hi", "--system", "Be brief."],
            "--system is the system message of a --chat; add --chat or drop --system",
        ),
        (
            ["--chat", "--interactive", "--num-samples", "2"],
            "--chat --interactive keeps one reply per turn in the conversation; drop --num-samples",
        ),
    ],
)
def test_chat_mistakes_exit_2_with_one_line(capsys, base_model, args, message):
    code, out, err = run_cli(capsys, "--checkpoint", base_model, *args)
    assert (code, out, err) == (2, "", f"gptlab generate: error: {message.format(base=base_model)}\n")


def test_chat_without_a_checkpoint_exits_2_with_one_line(capsys):
    code, out, err = run_cli(capsys, "--chat", "--prompt", "Hi", "--n-layers", "1")
    assert (code, out) == (2, "")
    assert err == (
        "gptlab generate: error: --chat needs --checkpoint DIR, a model tuned with `gptlab finetune "
        "instruct` (untrained --model gpt2 weights have no prompt template); add --checkpoint or drop --chat\n"
    )
