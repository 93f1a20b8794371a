"""Text generation.

`generate` is the call most people want: token ids in, ids out, greedy by default, through the KV cache.
`generate_uncached` is the textbook's loop it must agree with: crop to the context, run the whole model,
take the last position's argmax, append, repeat. It stays as the reference the fast path is tested against.

The fast path, from the inside out:
    Decoder            (decoder.py) one session: weights prepared for decoding once per model, a KV cache;
                       prefill, then one-token steps
    Sampler            (sampling.py) the next token of every row: penalty, filters, one generator per row
    decode_steps       the loop: logits → Sampler → next ids, one step at a time, each row's Token per step
    generate_tokens    token lists in, Tokens (id and log-probabilities) out; generate_ids: ids only
    stream_batch       text in, (row, text piece) out as it is produced; stop strings, end-of-text
    stream_ids         the same from prompts already tokenized (a chat template's ids)
    stream_text / generate_text   the one-prompt iterator and the collect-everything call

Choosing the next token applies, in this order (as Hugging Face does): repetition_penalty, then
temperature (0 means greedy: the argmax, no randomness), then top-k, then top-p, then min-p, then a
draw from the softmax with the row's own torch.Generator, seeded with seed + row. Log-probabilities
are the raw model's, before any of these. Details in sampling.py.
"""

from __future__ import annotations

import codecs
from typing import Iterator, Sequence

import torch

from ..model import GPTModel
from ..tokenizer import Tokenizer
from .decoder import Decoder, DecoderSettings
from .sampling import GenerationOptions, Sampler, Token


@torch.inference_mode()
def generate_uncached(model: GPTModel, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The textbook's greedy loop, no cache: (B, T) ids -> (B, T + max_new_tokens) ids."""
    context = model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])  # (B, T', V)
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def generate(
    model: GPTModel, ids: torch.Tensor, max_new_tokens: int, vocab_limit: int | None = None, **sampling
) -> torch.Tensor:
    """(B, T) ids → (B · num_samples, T + max_new_tokens) ids, through the KV cache.

    Greedy by default, giving the same tokens as generate_uncached, past the context too (there each
    new token re-runs the last context_length tokens, as the textbook loop does). `sampling` takes
    GenerationOptions' other fields: temperature, top_k, top_p, min_p, repetition_penalty, seed,
    num_samples (row r of the output continues ids[r // num_samples]). stop strings and logprobs need
    text or more than ids: use generate_text or generate_tokens. vocab_limit: the tokenizer's vocabulary
    size when the model's is padded past it (ids from it on are never drawn; sampling.py).
    """
    options = GenerationOptions(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **sampling})
    if options.stop or options.logprobs is not None:
        raise ValueError("generate returns ids only: for stop strings use generate_text, for logprobs generate_tokens")
    prompts = ids.tolist()
    settings = DecoderSettings(keep=model.cfg.context_length)
    new_ids = generate_ids(model, prompts, options, settings=settings, vocab_limit=vocab_limit)
    new_ids = torch.tensor(new_ids, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids.repeat_interleave(options.num_samples, dim=0), new_ids], dim=1)  # (B · n, T + new)


@torch.inference_mode()
def decode_steps(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    settings: DecoderSettings = DecoderSettings(),
    vocab_limit: int | None = None,
) -> Iterator[list[Token]]:
    """Yield each step's Token for every row, for up to options.max_new_tokens steps.

    The rows are the prompts (lists of ids, each cropped to its last context_length tokens as
    `generate_uncached` does) each repeated num_samples times: row r continues prompts[r // num_samples].
    A step's logits are computed only when that step is asked for, so stop iterating once done.
    vocab_limit: the tokenizer's vocabulary size, when the model's is padded past it (see sampling.py).
    """
    if not prompts:
        raise ValueError("give at least one prompt")
    if options.max_new_tokens == 0:
        return
    context = model.cfg.context_length
    rows = [list(prompt)[-context:] for prompt in prompts for _ in range(options.num_samples)]
    decoder = Decoder(model, len(rows), settings)
    sampler = Sampler(options, rows, model.cfg.vocab_size, decoder.device, vocab_limit)
    next_ids, tokens = sampler.choose(decoder.prefill(rows))  # (B,)
    yield tokens
    for _ in range(options.max_new_tokens - 1):
        next_ids, tokens = sampler.choose(decoder.step(next_ids))
        yield tokens


def generate_tokens(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    eot_id: int | None = None,
    settings: DecoderSettings = DecoderSettings(),
    vocab_limit: int | None = None,
) -> list[list[Token]]:
    """The new Tokens of every row (rows as in decode_steps); a row ends before eot_id when one is given."""
    outputs: list[list[Token]] = [[] for _ in range(len(prompts) * options.num_samples)]
    finished = [False] * len(outputs)
    for tokens in decode_steps(model, prompts, options, settings, vocab_limit):
        for row, token in enumerate(tokens):
            if finished[row] or token.id == eot_id:
                finished[row] = True
            else:
                outputs[row].append(token)
        if all(finished):
            break
    return outputs


def generate_ids(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    eot_id: int | None = None,
    settings: DecoderSettings = DecoderSettings(),
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """generate_tokens' ids only."""
    return [
        [token.id for token in row] for row in generate_tokens(model, prompts, options, eot_id, settings, vocab_limit)
    ]


class TextAssembler:
    """One row's text, built from its tokens' bytes and handed out in pieces as it grows.

    Bytes go through an incremental UTF-8 decoder, so a character split across tokens comes out whole
    in one piece (invalid bytes become U+FFFD, as tokenizer.decode does). The text ends at the first stop
    string, which is never handed out: text that could still turn into a stop string is held back.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.handed_out = 0  # len(text) already returned as pieces
        self.finished = False

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add a token's bytes; the new piece of text that is safe to hand out (maybe empty).
        final=True flushes an incomplete character and finishes the text."""
        searched = len(self.text)
        self.text += self.utf8.decode(data, final)
        stop_at = self.find_stop(searched)
        if stop_at is not None:
            self.text = self.text[:stop_at]
            final = True
        self.finished = final
        end = len(self.text) if final else len(self.text) - self.held_back()
        piece = self.text[self.handed_out : end]
        self.handed_out = end
        return piece

    def finish(self) -> str:
        return self.feed(b"", final=True)

    def find_stop(self, searched: int) -> int | None:
        """Where the earliest stop string starts, looking only where new text (from `searched` on) could complete one."""
        starts = [self.text.find(stop, max(0, searched - len(stop) + 1)) for stop in self.stop]
        return min((start for start in starts if start >= 0), default=None)

    def held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string. Only ends that start
        with a stop's first character are compared, so a long stop costs little per token."""
        longest = 0
        for stop in self.stop:
            window = self.text[-(len(stop) - 1) :] if len(stop) > 1 else ""
            start = window.find(stop[0])
            while start >= 0:
                if stop.startswith(window[start:]):
                    longest = max(longest, len(window) - start)
                    break  # the first match from the left is the longest
                start = window.find(stop[0], start + 1)
        return longest


def prompt_ids(tokenizer: Tokenizer, prompt: str, context_length: int) -> list[int]:
    """A prompt's ids, cropped to its last context_length; an empty prompt starts from end-of-text."""
    return (tokenizer.encode(prompt) or [tokenizer.eot_id])[-context_length:]


def stream_batch(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: GenerationOptions,
    settings: DecoderSettings = DecoderSettings(),
) -> Iterator[tuple[int, str]]:
    """Generate from every prompt in one batch; yield (row, piece of text) as the text is produced.

    Row r is sample r % num_samples of prompts[r // num_samples]. Pieces hold whole characters and
    exclude the prompt. A row ends at end-of-text or at a stop string (neither is returned) or after
    max_new_tokens; generation ends when every row has.
    """
    prompt_rows = [prompt_ids(tokenizer, prompt, model.cfg.context_length) for prompt in prompts]
    yield from stream_ids(model, tokenizer, prompt_rows, options, settings)


def stream_ids(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt_rows: Sequence[Sequence[int]],
    options: GenerationOptions,
    settings: DecoderSettings = DecoderSettings(),
) -> Iterator[tuple[int, str]]:
    """stream_batch for prompts already tokenized (each non-empty; cropped to its last context_length
    ids), such as a chat template's, whose segments are encoded apart (finetune/templates.py)."""
    texts = [TextAssembler(options.stop) for _ in range(len(prompt_rows) * options.num_samples)]
    for tokens in decode_steps(model, prompt_rows, options, settings, vocab_limit=tokenizer.vocab_size):
        for row, (token, text) in enumerate(zip(tokens, texts)):
            if text.finished:
                continue
            piece = text.finish() if token.id == tokenizer.eot_id else text.feed(tokenizer.decode_bytes([token.id]))
            if piece:
                yield row, piece
        if all(text.finished for text in texts):
            return
    for row, text in enumerate(texts):
        piece = text.finish()
        if piece:
            yield row, piece


def stream_text(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt: str,
    options: GenerationOptions,
    settings: DecoderSettings = DecoderSettings(),
) -> Iterator[str]:
    """One prompt, one sample: yield its continuation in pieces as it is produced (see stream_batch)."""
    if options.num_samples != 1:
        raise ValueError(f"stream_text makes one sample, got num_samples={options.num_samples}; use stream_batch")
    for _, piece in stream_batch(model, tokenizer, [prompt], options, settings):
        yield piece


def generate_text(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: GenerationOptions,
    settings: DecoderSettings = DecoderSettings(),
) -> list[str]:
    """Every row's continuation (row r is sample r % num_samples of prompts[r // num_samples])."""
    texts = [""] * (len(prompts) * options.num_samples)
    for row, piece in stream_batch(model, tokenizer, prompts, options, settings):
        texts[row] += piece
    return texts
