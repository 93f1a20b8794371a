"""Choosing the next token: the options, the filters, one random stream per row, and log-probabilities.

The next-token scores of a row go through, in this order (Hugging Face's order, with vLLM's
additions in front):
    0. logit_bias          a fixed amount added to the logits of chosen token ids (OpenAI's logit_bias)
       frequency_penalty   minus the penalty times how often the token was generated so far, and
       presence_penalty    minus the penalty once it was generated at all (OpenAI's definitions:
                           generated tokens only, not the prompt); these three are the server's
    1. repetition_penalty  every token already in the row (prompt included): a negative logit is
                           multiplied by the penalty, a positive one divided by it (transformers'
                           RepetitionPenaltyLogitsProcessor); it applies to greedy decoding too
    2. temperature         0 means greedy: the argmax of the penalised logits, and steps 3-6 are skipped
    3. top_k               keep the k most likely tokens (and any tied with the k-th)
    4. top_p               keep the fewest most likely tokens whose probabilities sum to at least top_p
    5. min_p               keep the tokens at least min_p times as likely as the most likely one
                           (probabilities after steps 1-4, as transformers' MinPLogitsWarper)
    6. a draw from the softmax of what is left, with the row's own torch.Generator

Seeds: row r of a batch draws from a generator seeded with seed + r (rows are prompt 0's samples,
then prompt 1's, ...), so a row's tokens do not depend on the rows beside it: running prompt p alone
with seed + p·num_samples gives the same samples as in the batch. Seeds are taken modulo 2**63, so the
largest seed's next row is 0 (offset_seed). seed=None draws a random seed.

Vocabulary: a model's vocabulary may be padded past its tokenizer's (nanoGPT pads 50,257 ids to 50,304
for speed). The rows no token stands for cannot be decoded, so the Sampler never draws them, nor lists
them among the most likely alternatives, when given the tokenizer's size (vocab_limit); every caller
that decodes text passes it.

Log-probabilities (options.logprobs = N, at most 5) are the model's own: log_softmax of its raw logits,
before the penalty, temperature or any filter, for the chosen token and the N most likely tokens
(as OpenAI's API and vLLM's default report them), so they say what the model thinks whatever the
sampling settings.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserError

MAX_LOGPROBS = 5  # the most alternatives OpenAI's completions API returns
MAX_SEED = 2**63 - 1
# The rates that keep penalised logits finite (a penalty of 1e-40 would divide them to infinity).
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. The defaults sample from the full distribution; temperature=0 is greedy.

    Invalid values raise UserError whose message begins with the option's command-line name (without
    the leading dashes), so `gptlab generate` can report the flag the user typed.
    """

    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float = 1.0  # keep the fewest most likely tokens whose probabilities sum to at least top_p
    min_p: float = 0.0  # keep the tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row (1: off)
    seed: int | None = None  # row r draws with seed + r; None: a fresh random seed
    stop: tuple[str, ...] = ()  # end a sample at the first of these strings (which is not returned)
    num_samples: int = 1  # samples per prompt
    logprobs: int | None = None  # None: none; N: the chosen token's log-probability and the N most likely
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated tokens
    presence_penalty: float = 0.0  # subtracted once a token occurs in the generated tokens
    logit_bias: dict[int, float] | None = None  # token id → added to its logit (-100 bans it, 100 forces it)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise UserError(f"stop must be a sequence of strings, not the string {self.stop!r}; write ({self.stop!r},)")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 0:
            raise UserError(f"max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1 (leave it out to keep every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min-p must be in [0, 1] (0 keeps every token), got {self.min_p}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise UserError(
                f"repetition-penalty must be between {low:g} and {high:g} (1 is off, 1.1-1.3 is usual), "
                f"got {self.repetition_penalty}"
            )
        if not math.isfinite(self.temperature):
            raise UserError(f"temperature must be a finite number (0 means greedy), got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.num_samples < 1:
            raise UserError(f"num-samples must be >= 1, got {self.num_samples}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UserError(
                f"logprobs must be between 0 and {MAX_LOGPROBS} (alternatives per token), got {self.logprobs}"
            )
        if any(not stop for stop in self.stop):
            raise UserError("stop must not be an empty string")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name.replace('_', '-')} must be between -2 and 2, got {getattr(self, name)}")
        if self.logit_bias and any(not -100 <= bias <= 100 for bias in self.logit_bias.values()):
            raise UserError("logit-bias values must be between -100 and 100")

    def replace(self, **changes) -> "GenerationOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Token:
    """One generated token of one row; logprob and top_logprobs only when options.logprobs asked for them."""

    id: int
    logprob: float | None = None  # the model's log-probability of this token
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, log-probability) of the most likely tokens, best first


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits, (B, V) bool mask of the tokens each row holds → penalised (B, V) logits."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p: (B, V) logits → (B, V) logits, -inf where a token
    may not be drawn.

    Top-k keeps every token tied with the k-th. Top-p keeps a token while the tokens more likely than it
    sum to less than top_p, so the most likely token always stays; min-p keeps it too (its ratio is 1).
    The largest logit is subtracted before dividing by the temperature (which leaves the softmax as it
    is), so that a tiny temperature gives -inf for the others rather than inf - inf = NaN: greedy.
    """
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above
        drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def offset_seed(seed: int | None, offset: int) -> int | None:
    """seed + offset, modulo 2**63 so that it stays a valid seed (None stays None: a random seed)."""
    return None if seed is None else (seed + offset) % (MAX_SEED + 1)


def row_seeds(seed: int | None, num_rows: int) -> list[int]:
    """Row r's seed: seed + r modulo 2**63 (seed=None: a random one, from the OS, leaving torch's global RNG
    alone)."""
    base = secrets.randbits(62) if seed is None else seed
    return [offset_seed(base, row) for row in range(num_rows)]


class Sampler:
    """Chooses every row's next token for one generation session.

    It holds what outlives a step: one torch.Generator per row (see the module docstring for seeds),
    with a repetition penalty a (B, V) mask of the tokens each row holds so far, prompt included, and
    with a frequency or presence penalty a (B, V) count of the tokens each row has generated.
    """

    def __init__(
        self,
        options: GenerationOptions,
        rows: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        vocab_limit: int | None = None,
    ):
        """vocab_size: the model's logits per row; vocab_limit: the ids the tokenizer can decode, if fewer (a
        padded vocabulary): only ids below it are ever drawn or listed among the alternatives."""
        self.options = options
        self.size = vocab_size if vocab_limit is None else min(vocab_size, vocab_limit)  # the ids that can be drawn
        self.generators = []
        if options.temperature > 0:
            self.generators = [
                torch.Generator(device=device).manual_seed(seed) for seed in row_seeds(options.seed, len(rows))
            ]
        self.seen = None
        if options.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(rows), self.size, dtype=torch.bool, device=device)
            for row, tokens in enumerate(rows):
                self.seen[row, [token for token in tokens if token < self.size]] = True
        self.counts = None
        if options.frequency_penalty or options.presence_penalty:
            self.counts = torch.zeros(len(rows), self.size, device=device)
        self.bias = None
        if options.logit_bias:
            if any(not 0 <= token < self.size for token in options.logit_bias):
                raise UserError(f"logit-bias token ids must be between 0 and {self.size - 1} (the vocabulary)")
            self.bias = torch.zeros(self.size, device=device)
            self.bias[list(options.logit_bias)] = torch.tensor(
                list(options.logit_bias.values()), dtype=torch.float32, device=device
            )

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[Token]]:
        """(B, V) float32 logits → the next ids (B,) and each row's Token."""
        options = self.options
        scores = logits[:, : self.size]  # the ids a padded vocabulary adds are never drawn
        if self.bias is not None:
            scores = scores + self.bias
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, options.repetition_penalty)
        if self.counts is not None:
            scores = scores - options.frequency_penalty * self.counts - options.presence_penalty * (self.counts > 0)
        if options.temperature == 0:
            next_ids = scores.argmax(dim=-1)
        else:
            probs = filter_logits(scores, options.temperature, options.top_k, options.top_p, options.min_p).softmax(
                dim=-1
            )
            # one draw per row from the row's own generator, so rows never share a random stream
            next_ids = torch.cat(
                [
                    torch.multinomial(row_probs, 1, generator=generator)
                    for row_probs, generator in zip(probs, self.generators)
                ]
            )
        if self.seen is not None:
            self.seen[torch.arange(len(next_ids), device=next_ids.device), next_ids] = True
        if self.counts is not None:
            self.counts[torch.arange(len(next_ids), device=next_ids.device), next_ids] += 1
        return next_ids, self.tokens(logits, next_ids)

    def tokens(self, logits: torch.Tensor, next_ids: torch.Tensor) -> list[Token]:
        """Each row's Token, with the raw model's log-probabilities when options.logprobs asks for them."""
        if self.options.logprobs is None:
            return [Token(token) for token in next_ids.tolist()]
        logprobs = logits.log_softmax(dim=-1)  # (B, V)
        chosen = logprobs.gather(-1, next_ids[:, None])[:, 0].tolist()  # (B,)
        top = logprobs[:, : self.size].topk(self.options.logprobs, dim=-1)  # (B, N) values and indices
        return [
            Token(token, logprob, tuple(zip(ids, values)))
            for token, logprob, ids, values in zip(next_ids.tolist(), chosen, top.indices.tolist(), top.values.tolist())
        ]
