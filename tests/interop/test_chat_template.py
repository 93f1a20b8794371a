"""Chat templates in exports: an instruction-tuned model's Hugging Face export carries its template as Jinja,
and transformers' apply_chat_template gives exactly the ids gptlab's chat_prompt_ids gives (and, for a
finished conversation, encode_chat's training ids), for GPT-2's BPE (whole and truncated) and characters,
both templates, with and without a system message, over several turns and non-ASCII text. gptlab encodes a
conversation piece by piece; why the export needs its segment mark, and exactly where a tokenizer that reads
the prompt as one text (llama.cpp, or transformers without the mark) differs, is tested here too.
"""

import jinja2
import jinja2.sandbox
import pytest
import torch

from gptlab import CharTokenizer, GPTModel, load_tokenizer
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.finetune.templates import TEMPLATES, chat_prompt_ids, encode_chat, format_chat, jinja_template, render
from gptlab.interop.hf import export_hf
from gptlab.interop.hf_tokenizer import SEGMENT_MARK
from gptlab.tokenizer import EOT_TEXT

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "user-only": [{"role": "user", "content": "Sort the letters: c a b"}],
    "system": [{"role": "system", "content": "You sort letters."}, {"role": "user", "content": "Sort: b a"}],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "Sort: b a"}],
    "multi-turn": [
        {"role": "user", "content": "Sort: b a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "And now:\n\nd c?"},
        {"role": "assistant", "content": "c d\n\n"},
        {"role": "user", "content": "Thanks."},
    ],
    # A response that starts with two newlines and spaces: a whole-text tokenizer joins them to the prefix's newline.
    "leading-whitespace": [
        {"role": "user", "content": "Indent it"},
        {"role": "assistant", "content": "\n\n  a b"},
        {"role": "user", "content": "Again"},
    ],
    "non-ascii": [
        {"role": "system", "content": "Réponds en français, s'il te plaît."},
        {"role": "user", "content": "Ünïcödé €5 😀 — ça va?\ttab"},
        {"role": "assistant", "content": "Très bien 👍"},
        {"role": "user", "content": "日本語も?"},
    ],
}
CHARS = "".join(
    sorted(
        {char for conversation in CONVERSATIONS.values() for message in conversation for char in message["content"]}
        | {char for template in TEMPLATES.values() for text in vars(template).values() for char in text}
    )
)
TOKENIZERS = {
    "gpt2": lambda: load_tokenizer("gpt2"),
    "gpt2-300-merges": lambda: load_tokenizer("gpt2", merges=300),
    "char": lambda: CharTokenizer(CHARS),
}


@pytest.fixture(
    scope="module",
    params=[(tokenizer, template) for tokenizer in TOKENIZERS for template in TEMPLATES],
    ids=lambda param: "-".join(param),
)
def export(request, tmp_path_factory):
    """(gptlab tokenizer, template name, transformers' AutoTokenizer of the model's export)."""
    name, template = request.param
    tokenizer = TOKENIZERS[name]()
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=256, emb_dim=8, n_heads=2, n_layers=1))
    folder = tmp_path_factory.mktemp(f"{name}-{template}")
    export_hf(model, tokenizer, folder, force=True, chat_template=jinja_template(template, SEGMENT_MARK))
    return tokenizer, template, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
def test_apply_chat_template_gives_chat_prompt_ids(export, conversation):
    tokenizer, template, hf_tokenizer = export
    messages = CONVERSATIONS[conversation]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == chat_prompt_ids(tokenizer, messages, template)
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.replace(SEGMENT_MARK, "") == format_chat(messages, template)
    assert hf_tokenizer.decode(ids) == format_chat(messages, template)  # the mark never reaches an id


def test_a_finished_conversation_gives_the_training_ids(export):
    tokenizer, template, hf_tokenizer = export
    messages = CONVERSATIONS["multi-turn"][:4]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids == encode_chat(tokenizer, messages, template)[0]


def test_roles_gptlab_refuses_are_refused_by_the_template(export):
    _, template, hf_tokenizer = export
    for messages in (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
        [{"role": "tool", "content": "a"}],
    ):
        with pytest.raises(
            jinja2.TemplateError,
            match=f"gptlab's {template} template takes system \\(first only\\), "
            f"user and assistant messages, not {messages[-1]['role']}",
        ):
            hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def whole_text_ids(tokenizer, text: str) -> list[int]:
    """The ids of a prompt tokenized as one text, as llama.cpp tokenizes a rendered template (end-of-text as
    its special token): gptlab's own BPE over each stretch between end-of-text tokens."""
    stretches = text.split(EOT_TEXT)
    return [
        i
        for n, stretch in enumerate(stretches)
        for i in [*([tokenizer.eot_id] if n else []), *tokenizer.encode(stretch)]
    ]


def split_blank_lines(tokenizer, messages: list[dict], template: str) -> list[int]:
    """chat_prompt_ids with the one change GPT-2's pattern makes to these conversations when their pieces are
    one text: a piece ending in a blank line ("\\n\\n", token 628) that runs straight into a piece starting
    with a non-space gives up the blank line's token for two newlines (198 198), because the pattern keeps a
    run of whitespace whole only before more whitespace or the end of the text."""
    segments = render(messages, template, generation_prompt=True)
    ids = []
    for segment, following in zip(segments, [*segments[1:], None]):
        piece = tokenizer.encode(segment.text)
        if (
            following is not None
            and not segment.end_of_text
            and segment.text.endswith("\n\n")
            and following.text[:1].strip()
        ):
            assert piece[-1] == 628
            piece = [*piece[:-1], 198, 198]
        ids += piece + [tokenizer.eot_id] * segment.end_of_text
    return ids


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
def test_where_a_whole_text_tokenizer_differs_from_gptlab(conversation):
    """Why the export needs its mark, and what a tokenizer gives that reads the rendered prompt as one text
    (llama.cpp with the GGUF's template, or the export's tokenizer without the mark): with GPT-2's 50,000
    merges, every Alpaca prompt differs, at each blank line before "###" (and, where an earlier response
    starts with whitespace, there too); ChatML's agree unless an earlier response starts with two or more
    whitespace characters. With characters, none differ."""
    tokenizer, messages = load_tokenizer("gpt2"), CONVERSATIONS[conversation]
    alpaca = whole_text_ids(tokenizer, format_chat(messages, "alpaca"))
    assert alpaca != chat_prompt_ids(tokenizer, messages, "alpaca")
    assert (alpaca == split_blank_lines(tokenizer, messages, "alpaca")) is (conversation != "leading-whitespace")
    chatml = whole_text_ids(tokenizer, format_chat(messages, "chatml"))
    assert (chatml == chat_prompt_ids(tokenizer, messages, "chatml")) is (conversation != "leading-whitespace")
    chars = CharTokenizer(CHARS)
    for template in TEMPLATES:
        assert whole_text_ids(chars, format_chat(messages, template)) == chat_prompt_ids(chars, messages, template)


def render_like_llama_cpp(source: str, messages: list[dict]) -> str:
    """The template rendered as llama.cpp's and transformers' Jinja engines render chat templates."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    return environment.from_string(source).render(
        messages=messages, add_generation_prompt=True, raise_exception=raise_exception
    )


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_unmarked_template_renders_format_chats_text(template):
    for messages in CONVERSATIONS.values():
        assert render_like_llama_cpp(jinja_template(template), messages) == format_chat(messages, template)


def test_convert_of_an_instruction_tuned_checkpoint_writes_its_template(tmp_path, capsys):
    tokenizer = load_tokenizer("gpt2", merges=300)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=8, n_heads=2, n_layers=1))
    save_model(tmp_path / "tuned", model, tokenizer, {"chat_template": "chatml"})
    save_model(tmp_path / "plain", model, tokenizer)
    assert main(["convert", "--to-hf", str(tmp_path / "tuned"), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.endswith("(GPT2LMHeadModel, chat template chatml in tokenizer_config.json)\n")
    messages = CONVERSATIONS["multi-turn"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == chat_prompt_ids(
        tokenizer, messages, "chatml"
    )
    assert main(["convert", "--to-hf", str(tmp_path / "plain"), str(tmp_path / "plain-hf")]) == 0
    assert capsys.readouterr().out.endswith("(GPT2LMHeadModel)\n")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "plain-hf").chat_template is None
