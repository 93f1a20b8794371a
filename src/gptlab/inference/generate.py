"""Text generation.

`generate` is the textbook's loop: crop to the context, run the whole model, take the last position's
logits, pick the argmax, append, repeat. It stays as the reference the fast path is tested against.

The fast path, from the inside out:
    Decoder            one session: the weights laid out for decoding and a KV cache; prefill, then step
    decode_steps       the loop: logits → choose_next_tokens → next ids, one step at a time
    generate_ids       token lists in, token lists out (stops at end-of-text if told its id)
    stream_batch       text in, (row, text piece) out as it is produced; stop strings, end-of-text
    stream_text / generate_text   the one-prompt iterator and the collect-everything call

Choosing the next token applies, in this order (as Hugging Face does): temperature (0 means greedy:
the argmax, no randomness), then top-k, then top-p, then a draw from the softmax with a
torch.Generator seeded from `seed`, so the same seed gives the same text.
"""

from __future__ import annotations

import codecs
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..model import GPTModel, KVCache
from ..tokenizer import Tokenizer


@torch.inference_mode()
def generate(model: GPTModel, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: (B, T) ids -> (B, T + max_new_tokens) ids."""
    context = model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])  # (B, T', V)
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. The defaults sample from the full distribution; temperature=0 is greedy.

    Invalid values raise ValueError whose message begins with the option's command-line name (without
    the leading dashes), so `gptlab generate` can report the flag the user typed.
    """

    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float = 1.0  # keep the fewest most likely tokens whose probabilities sum to at least top_p
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # end a sample at the first of these strings (which is not returned)
    num_samples: int = 1  # samples per prompt

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a sequence of strings, not the string {self.stop!r}; write ({self.stop!r},)")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 0:
            raise ValueError(f"max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top-k must be >= 1 (leave it out to keep every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num-samples must be >= 1, got {self.num_samples}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop must not be an empty string")

    def replace(self, **changes) -> "GenerationOptions":
        return dataclasses.replace(self, **changes)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p: (B, V) logits → (B, V) logits, -inf where a token may not be drawn.

    Top-k keeps every token tied with the k-th. Top-p keeps a token while the tokens more likely than it
    sum to less than top_p, so the most likely token always stays.
    """
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above
        drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next_tokens(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits → (B,) next ids: the argmax at temperature 0, otherwise a draw after filter_logits."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, options.temperature, options.top_k, options.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decoding_model(model: GPTModel, dtype: torch.dtype | None = None) -> GPTModel:
    """The model with its weights laid out for decoding, in `dtype` (default: the model's own).

    Decoding multiplies a few rows by every weight matrix, so its speed is how fast the weights stream
    from memory. In float32 MKL reads a Linear weight faster stored [in, out] than nn.Linear's [out, in]
    (products with GPT-2 124M's matrices alone, 2-core Xeon: 17.1 vs 18.5 ms per step at batch 1, only
    8% apart, but 32.6 vs 48.8 ms at batch 8), so each is stored transposed and viewed back as
    [out, in]: same values and shape, other memory order, the module code unchanged. In bfloat16 the
    [out, in] order is the faster one (17.0 vs 22.0 ms), so the weights are only converted. Tensors
    that need neither change are shared.

    Every generation session (a Decoder) calls this, which for GPT-2 124M copies ~0.5 GB (about 0.35 s)
    and frees it when generation ends. It changes nothing on a model it returned, so to pay once, pass
    its result to the generate functions in place of the model (the command line does). It is for
    generation only: a tied head becomes a second, transposed copy of the token embedding.
    """
    dtype = dtype or model.tok_emb.weight.dtype
    relayout = dtype == torch.float32
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.to(dtype)
        state[name] = tensor.t().contiguous().t() if relayout and name in linear_weights else tensor
    if model.cfg.tie_embeddings and not relayout:
        state["out_head.weight"] = state["tok_emb.weight"]  # one converted copy, not two
    with torch.device("meta"):
        copy = GPTModel(model.cfg)
    copy.load_state_dict(state, assign=True)
    return copy.requires_grad_(False).eval()


class Decoder:
    """One generation session: the model's weights laid out for decoding (see decoding_model), a KV cache
    for `batch_size` rows, and each row's tokens so far.

    Past the context, the window slides: when the cache is full, each row's last `keep` tokens are run
    again from an empty cache (positions 0..keep-1) and decoding carries on from there. So the logits
    for the token after position n come from the model run on the last w tokens, where w goes keep,
    keep + 1, ..., context_length, then keep again. The default keep is context_length // 2: one
    prefill of half a context buys half a context of cheap steps. keep = context_length reproduces the
    textbook `generate` exactly (it crops to the last context_length tokens at every step), at the
    cost of a full prefill per token once the context is full.
    """

    def __init__(self, model: GPTModel, batch_size: int, dtype: torch.dtype | None = None, keep: int | None = None):
        self.context = model.cfg.context_length
        self.keep = self.context // 2 if keep is None else keep
        if not 1 <= self.keep <= self.context:
            raise ValueError(f"keep must be between 1 and the context_length {self.context}, got {self.keep}")
        self.dtype = dtype or model.tok_emb.weight.dtype
        self.device = model.device
        self.model = decoding_model(model, self.dtype)
        self.cache = KVCache(model.cfg, batch_size, self.dtype, self.device)
        self.rows: list[list[int]] = []

    def prefill(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run rows of 1..context_length ids, left-padded, from an empty cache; the next-token logits (B, V)."""
        if any(not 1 <= len(row) <= self.context for row in rows):
            raise ValueError(f"each row needs 1 to {self.context} (context_length) tokens; crop from the left, "
                             "and start an empty prompt with the end-of-text token")
        self.rows = [list(row) for row in rows]
        longest = max(len(row) for row in rows)
        padding = [longest - len(row) for row in rows]
        ids = torch.tensor([[0] * pad + list(row) for pad, row in zip(padding, rows)], device=self.device)  # (B, T)
        self.cache.reset(torch.tensor(padding, device=self.device))
        return self.logits(ids)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one id per row (B,) and return the logits (B, V) for the token after it."""
        for row, token in zip(self.rows, next_ids.tolist()):
            row.append(token)
        if self.cache.length == self.context:
            return self.prefill([row[-self.keep:] for row in self.rows])
        return self.logits(next_ids[:, None])  # (B, 1) in

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ids (B, T) after the cached ones; logits (B, V) for the token after the last, in float32."""
        features = self.model.hidden_states(ids, self.cache)[:, -1]  # (B, C): only the last position is needed
        return self.model.out_head(features).float()


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.inference_mode()
def decode_steps(model: GPTModel, prompts: Sequence[Sequence[int]], options: GenerationOptions,
                 dtype: torch.dtype | None = None, keep: int | None = None) -> Iterator[list[int]]:
    """Yield each step's next ids, one per row, for up to options.max_new_tokens steps.

    The rows are the prompts (lists of ids, each cropped to its last context_length tokens as
    `generate` does) each repeated num_samples times: row r continues prompts[r // num_samples].
    A step's logits are computed only when that step is asked for, so stop iterating once done.
    dtype is the weights' and cache's type while decoding (default: the model's); keep: see Decoder.
    """
    if not prompts:
        raise ValueError("give at least one prompt")
    if options.max_new_tokens == 0:
        return
    context = model.cfg.context_length
    rows = [list(prompt)[-context:] for prompt in prompts for _ in range(options.num_samples)]
    generator = new_generator(options.seed, model.device)
    decoder = Decoder(model, len(rows), dtype, keep)
    next_ids = choose_next_tokens(decoder.prefill(rows), options, generator)  # (B,)
    yield next_ids.tolist()
    for _ in range(options.max_new_tokens - 1):
        next_ids = choose_next_tokens(decoder.step(next_ids), options, generator)
        yield next_ids.tolist()


def generate_ids(model: GPTModel, prompts: Sequence[Sequence[int]], options: GenerationOptions,
                 eot_id: int | None = None, dtype: torch.dtype | None = None, keep: int | None = None) -> list[list[int]]:
    """The new ids of every row (rows as in decode_steps); a row ends before eot_id when one is given."""
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * options.num_samples)]
    finished = [False] * len(outputs)
    for next_ids in decode_steps(model, prompts, options, dtype, keep):
        for row, token in enumerate(next_ids):
            if finished[row] or token == eot_id:
                finished[row] = True
            else:
                outputs[row].append(token)
        if all(finished):
            break
    return outputs


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
        piece = self.text[self.handed_out:end]
        self.handed_out = end
        return piece

    def finish(self) -> str:
        return self.feed(b"", final=True)

    def find_stop(self, searched: int) -> int | None:
        """Where the earliest stop string starts, looking only where new text (from `searched` on) could complete one."""
        starts = [self.text.find(stop, max(0, searched - len(stop) + 1)) for stop in self.stop]
        return min((start for start in starts if start >= 0), default=None)

    def held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        return max((size for stop in self.stop for size in range(1, len(stop)) if self.text.endswith(stop[:size])), default=0)


def prompt_ids(tokenizer: Tokenizer, prompt: str, context_length: int) -> list[int]:
    """A prompt's ids, cropped to its last context_length; an empty prompt starts from end-of-text."""
    return (tokenizer.encode(prompt) or [tokenizer.eot_id])[-context_length:]


def stream_batch(model: GPTModel, tokenizer: Tokenizer, prompts: Sequence[str], options: GenerationOptions,
                 dtype: torch.dtype | None = None, keep: int | None = None) -> Iterator[tuple[int, str]]:
    """Generate from every prompt in one batch; yield (row, piece of text) as the text is produced.

    Row r is sample r % num_samples of prompts[r // num_samples]. Pieces hold whole characters and
    exclude the prompt. A row ends at end-of-text or at a stop string (neither is returned) or after
    max_new_tokens; generation ends when every row has.
    """
    prompt_rows = [prompt_ids(tokenizer, prompt, model.cfg.context_length) for prompt in prompts]
    texts = [TextAssembler(options.stop) for _ in range(len(prompt_rows) * options.num_samples)]
    for next_ids in decode_steps(model, prompt_rows, options, dtype, keep):
        for row, (token, text) in enumerate(zip(next_ids, texts)):
            if text.finished:
                continue
            piece = text.finish() if token == tokenizer.eot_id else text.feed(tokenizer.decode_bytes([token]))
            if piece:
                yield row, piece
        if all(text.finished for text in texts):
            return
    for row, text in enumerate(texts):
        piece = text.finish()
        if piece:
            yield row, piece


def stream_text(model: GPTModel, tokenizer: Tokenizer, prompt: str, options: GenerationOptions,
                dtype: torch.dtype | None = None) -> Iterator[str]:
    """One prompt, one sample: yield its continuation in pieces as it is produced (see stream_batch)."""
    if options.num_samples != 1:
        raise ValueError(f"stream_text makes one sample, got num_samples={options.num_samples}; use stream_batch")
    for _, piece in stream_batch(model, tokenizer, [prompt], options, dtype):
        yield piece


def generate_text(model: GPTModel, tokenizer: Tokenizer, prompts: Sequence[str], options: GenerationOptions,
                  dtype: torch.dtype | None = None) -> list[str]:
    """Every row's continuation (row r is sample r % num_samples of prompts[r // num_samples])."""
    texts = [""] * (len(prompts) * options.num_samples)
    for row, piece in stream_batch(model, tokenizer, prompts, options, dtype):
        texts[row] += piece
    return texts
