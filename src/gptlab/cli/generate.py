"""`gptlab generate`: sample text from a checkpoint or an untrained preset.

Ctrl-C and a closed pipe end the command quietly, with the exit codes shells expect: 130 after
SIGINT, 141 (128 + SIGPIPE) when the reader of stdout went away (`gptlab generate ... | head`). In
--interactive mode Ctrl-C stops the reply and brings the prompt back; Ctrl-D, or Ctrl-C twice at the
prompt, quits.

--chat talks to an instruction-tuned checkpoint (`gptlab finetune instruct`): the conversation is put in the
prompt template stored in its config.json and tokenized exactly as in training, and only the reply is
printed.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from ..finetune.templates import chat_prompt_ids, chat_template_of
from ..inference.decoder import DecoderSettings
from ..inference.generate import GenerationOptions, prompt_ids, stream_ids
from ..inference.quantize import quantize_model
from ..loading import load_model
from ..model import GPTModel
from ..tokenizer import Tokenizer, load_tokenizer
from ..training.runtime import pick_device
from .common import (
    add_command,
    add_model_arguments,
    config_from_args,
    reject_shape_options,
)

EXIT_SIGINT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_SIGPIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head`

DESCRIPTION = """Generate text from a prompt.

The next token is chosen in this order (as Hugging Face transformers does): --repetition-penalty on
every token already in the sample (prompt included), then --temperature (0 is greedy: the most likely
token, and the filters after it are skipped), then --top-k, then --top-p, then --min-p, then a random
draw. Sample r of a prompt draws with seed + r; --interactive reply n (from 0) with
seed + n * num-samples, so running that --seed with --prompt repeats it.

--chat (with --checkpoint of a model tuned by `gptlab finetune instruct`): --prompt is the user's message and
only the assistant's reply is printed; with --interactive each line is a message, and the conversation so
far is sent each turn (its oldest exchanges are dropped once it outgrows the context, keeping
--max-new-tokens, at most half the context, for the reply). Ctrl-C forgets the exchange it interrupts.

--prompt and --stop read \\n as a newline, \\t as a tab and \\\\ as one backslash."""

ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""\n → newline, \t → tab, \\ → backslash; any other backslash stays as typed."""
    return re.sub(r"\\([nt\\])", lambda match: ESCAPES[match[1]], text)


def generation_model(args: argparse.Namespace, seed: int) -> tuple[GPTModel, Tokenizer]:
    """The model to generate with, on --device in --dtype, its linear layers quantized with --quantize (its
    decoding layout is made once, on first use)."""
    model, tokenizer = unquantized_model(args, seed)
    return (quantize_model(model, args.quantize) if args.quantize else model), tokenizer


def unquantized_model(args: argparse.Namespace, seed: int) -> tuple[GPTModel, Tokenizer]:
    device, dtype = pick_device(args.device), getattr(torch, args.dtype)
    if args.compile and device.type != "cuda":
        raise UserError(
            f"--compile records the decode step as a CUDA graph and needs CUDA, not {device.type}; drop --compile"
        )
    if args.quantize and device.type != "cpu":
        raise UserError(f"--quantize uses CPU kernels; add --device cpu (not {device.type}), or drop --quantize")
    if args.checkpoint is not None:
        reject_shape_options(args)
        return load_model(args.checkpoint, device=device, dtype=dtype)
    torch.manual_seed(seed)
    model, tokenizer = GPTModel(config_from_args(args)).to(device, dtype).eval(), load_tokenizer()
    print(f"(untrained {args.model} weights, seed {seed}: expect gibberish)", file=sys.stderr)
    return model, tokenizer


def generation_options(args: argparse.Namespace, seed: int) -> GenerationOptions:
    try:
        return GenerationOptions(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=seed,
            stop=tuple(unescape(stop) for stop in args.stop),
            num_samples=args.num_samples,
        )
    except ValueError as error:  # its messages begin with the option's name, so "--" makes it the flag
        raise UserError(f"--{error}") from None


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from --prompt or --prompt-file; None with --interactive (prompts come from stdin)."""
    given = [name for name in ("prompt", "prompt_file", "interactive") if getattr(args, name) not in (None, False)]
    if len(given) != 1:
        raise UserError("give exactly one of --prompt TEXT, --prompt-file FILE or --interactive")
    if args.prompt is not None:
        return unescape(args.prompt)
    if args.prompt_file is None:
        return None
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8").removesuffix("\n")
    except OSError as error:
        raise UserError(f"cannot read --prompt-file {args.prompt_file}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None


def text_prompt_ids(tokenizer: Tokenizer, prompt: str, context: int) -> list[int]:
    """A prompt's ids, warning on stderr when it is cropped to the context."""
    num_tokens = len(tokenizer.encode(prompt))
    if num_tokens > context:
        print(
            f"warning: the prompt has {num_tokens} tokens, more than the model's context_length {context}; "
            f"keeping its last {context}",
            file=sys.stderr,
        )
    return prompt_ids(tokenizer, prompt, context)


def print_generation(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt: list[int],
    shown: str,
    options: GenerationOptions,
    settings: DecoderSettings,
) -> str:
    """Print `shown` (the prompt as the reader sees it: the text, or nothing for a chat) and what the model
    adds to the prompt ids: the first sample as it is produced, any others once done. Returns the first
    sample. Ctrl-C ends the line being printed and is passed on."""
    samples = options.num_samples
    texts = [""] * samples
    if samples > 1:
        print(f"--- sample 1 of {samples} ---")
    print(shown, end="", flush=True)
    try:
        for row, piece in stream_ids(model, tokenizer, [prompt], options, settings):
            if row == 0:
                print(piece, end="", flush=True)
            texts[row] += piece
    finally:
        print(flush=True)  # the reply's line ends, whether it finished or was interrupted
    for row in range(1, samples):
        print(f"--- sample {row + 1} of {samples} ---")
        print(shown + texts[row], flush=True)
    return texts[0]


@dataclass
class Chat:
    """A conversation with an instruction-tuned model, put in its template anew each turn.

    The prompt holds at most `limit` tokens, so that the reply fits in the context after it: past that the
    oldest exchanges (a user's message and its reply) are dropped for good, the system message kept.
    """

    tokenizer: Tokenizer
    template: str
    limit: int
    messages: list[dict] = field(default_factory=list)  # an optional system message, then user and assistant in turn
    dropped: bool = False  # whether exchanges were dropped yet (said once, on stderr)

    def prompt_ids(self, user: str) -> list[int]:
        """The ids to generate the reply to this message from, tokenized as in training (chat_prompt_ids)."""
        system = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        while True:
            ids = chat_prompt_ids(self.tokenizer, [*self.messages, {"role": "user", "content": user}], self.template)
            if len(ids) <= self.limit or len(self.messages) == system:
                break
            del self.messages[system : system + 2]
            if not self.dropped:
                self.dropped = True
                print(
                    f"(the conversation outgrew the {self.limit} tokens the context leaves for it: its oldest "
                    "exchanges are dropped)",
                    file=sys.stderr,
                )
        if len(ids) > self.limit:
            print(
                f"warning: the message has {len(ids)} tokens in its template, more than the {self.limit} the "
                f"context leaves for it; keeping its last {self.limit}",
                file=sys.stderr,
            )
        return ids[-self.limit :]

    def answered(self, user: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def start_chat(args: argparse.Namespace, tokenizer: Tokenizer, context: int, max_new_tokens: int) -> Chat:
    """The conversation --chat asks for, in the template stored in --checkpoint's config.json."""
    template = chat_template_of(args.checkpoint)
    if template is None:
        raise UserError(
            f"{args.checkpoint} was not instruction-tuned (no chat_template in its config.json); "
            "fine-tune it with `gptlab finetune instruct`, or drop --chat"
        )
    # room for the reply, but never more than half the context: a longer reply slides past it instead
    limit = context - min(max_new_tokens, context // 2)
    system = [{"role": "system", "content": unescape(args.system)}] if args.system is not None else []
    return Chat(tokenizer, template, limit, system)


def input_lines(banner: str) -> Iterator[str]:
    """Lines from stdin until EOF. At a terminal: the banner, a "> " prompt and line editing; Ctrl-C at
    the prompt says how to quit, and a second one in a row is passed on."""
    terminal = sys.stdin.isatty()
    if terminal:
        import readline  # noqa: F401  (imported for its effect: input() gets line editing and history)

        print(banner, file=sys.stderr)
    interrupted_at_prompt = False
    while True:
        try:
            line = input("> " if terminal else "")
        except EOFError:
            if terminal:
                print()  # the shell's prompt then starts on a line of its own
            return
        except KeyboardInterrupt:
            if interrupted_at_prompt:
                raise
            interrupted_at_prompt = True
            print("\n(Ctrl-C again or Ctrl-D to quit)", file=sys.stderr, flush=True)
            continue
        interrupted_at_prompt = False
        yield line


def run_interactive(
    model: GPTModel,
    tokenizer: Tokenizer,
    options: GenerationOptions,
    settings: DecoderSettings,
    name: str,
    chat: Chat | None = None,
) -> None:
    """One prompt (with a chat: one message) per line from stdin until EOF; reply n samples with
    seed + n * num_samples. Ctrl-C stops a reply, and a chat forgets that exchange."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    what = f", {chat.template} template. One message" if chat else ". One prompt"
    banner = f"{name}, {parameters:,} parameters{what} per line; Ctrl-C stops a reply, Ctrl-D or Ctrl-C twice quits."
    for reply, line in enumerate(input_lines(banner)):
        reply_options = options.replace(seed=options.seed + reply * options.num_samples)
        try:
            if chat is None:
                prompt = text_prompt_ids(tokenizer, line, model.cfg.context_length)
                print_generation(model, tokenizer, prompt, line, reply_options, settings)
            else:
                chat.answered(
                    line, print_generation(model, tokenizer, chat.prompt_ids(line), "", reply_options, settings)
                )
        except KeyboardInterrupt:
            pass  # the reply stops; back to the prompt


def cmd_generate(args: argparse.Namespace) -> None:
    try:
        generate_or_converse(args)
    except KeyboardInterrupt:
        raise SystemExit(EXIT_SIGINT) from None
    except BrokenPipeError:
        # Python's documented idiom: point stdout at /dev/null so the flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(EXIT_SIGPIPE) from None


def generate_or_converse(args: argparse.Namespace) -> None:
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    options = generation_options(args, seed)
    prompt = read_prompt(args)
    check_chat_arguments(args, options)
    model, tokenizer = generation_model(args, seed)
    context = model.cfg.context_length
    chat = start_chat(args, tokenizer, context, options.max_new_tokens) if args.chat else None
    if args.seed is None and options.temperature > 0:
        print(f"(sampling with seed {seed}: pass --seed {seed} to repeat)", file=sys.stderr)
    settings = DecoderSettings(compile=args.compile)
    if prompt is None:
        run_interactive(model, tokenizer, options, settings, str(args.checkpoint or f"untrained {args.model}"), chat)
    elif chat is None:
        print_generation(model, tokenizer, text_prompt_ids(tokenizer, prompt, context), prompt, options, settings)
    else:
        print_generation(model, tokenizer, chat.prompt_ids(prompt), "", options, settings)


def check_chat_arguments(args: argparse.Namespace, options: GenerationOptions) -> None:
    """The chat options' mistakes, found before any model is loaded."""
    if not args.chat:
        if args.system is not None:
            raise UserError("--system is the system message of a --chat; add --chat or drop --system")
        return
    if args.checkpoint is None:
        raise UserError(
            "--chat needs --checkpoint DIR, a model tuned with `gptlab finetune instruct` (untrained "
            f"--model {args.model} weights have no prompt template); add --checkpoint or drop --chat"
        )
    if args.interactive and options.num_samples > 1:
        raise UserError("--chat --interactive keeps one reply per turn in the conversation; drop --num-samples")


def add_parsers(commands) -> None:
    gen = add_command(
        commands, "generate", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(gen, vocab_size=False)
    gen.add_argument(
        "--checkpoint",
        type=Path,
        help="generate with the model in this checkpoint folder instead of --model's untrained weights",
    )
    gen.add_argument(
        "--prompt", help="the text to continue (empty: start from end-of-text); \\n and \\t are read as escapes"
    )
    gen.add_argument(
        "--prompt-file", help="read the prompt from this UTF-8 file (one final newline is dropped; no escapes)"
    )
    gen.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line, until EOF (Ctrl-D); Ctrl-C stops a reply",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="talk to an instruction-tuned --checkpoint: --prompt (or "
        "each --interactive line) is the user's message, put in the model's prompt template; only the "
        "reply is printed",
    )
    gen.add_argument(
        "--system",
        help="with --chat: the system message (default: the template's own, if any); \\n and \\t are read as escapes",
    )
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the fewest tokens holding this much probability"
    )
    gen.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than this fraction of the most likely one (default 0: keep all)",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide positive (multiply negative) logits "
        "of tokens already in the sample by this (default 1: off; 1.1-1.3 is usual)",
    )
    gen.add_argument(
        "--seed",
        type=int,
        help="seeds the sampling and --model's random weights (default: a fresh one, "
        "printed on stderr so the run can be repeated)",
    )
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        help="end at this text, not printed (repeatable; \\n and \\t are read as escapes, e.g. --stop '\\n\\n')",
    )
    gen.add_argument("--num-samples", type=int, default=1, help="samples per prompt, generated as one batch")
    gen.add_argument(
        "--device", default="auto", help="auto (the default: CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps"
    )
    gen.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights while generating"
    )
    gen.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="CPU only: int8 (per-channel) or int4 (groups of 32) "
        "weights for the linear layers; embeddings and norms stay in --dtype",
    )
    gen.add_argument(
        "--compile",
        action="store_true",
        help="CUDA only: compile the one-token step into a CUDA graph "
        "(the first reply waits about a minute for the compiler)",
    )
    gen.set_defaults(run=cmd_generate)
