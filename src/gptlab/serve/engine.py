"""Continuous batching: one decoding loop shared by every request the server is working on.

A job is one prompt and the n rows (samples) it asks for. The engine holds a KV cache of `max_batch`
rows (slots), and each step runs one new token for every active row at once, so concurrent requests
share every pass over the weights. A job that arrives while others are decoding is prefilled on its
own (its prompt once; the keys and values copied into n free slots) and joins the batch at the next
step. A row that ends (end-of-text, a stop string, its max_new_tokens, or its client going away)
leaves at once and its slot is reused by the next job waiting.

Every row samples with its own Sampler (seed + r for row r of a job, as `gptlab generate` seeds
row r), from its own logits: what it generates does not depend on the rows beside it, so a request
gets the tokens it would get alone.

The rows of the batch have different lengths. Row b's tokens sit in slots 0..length_b - 1 of its
cache row; its next token is written at length_b and attends to 0..length_b, and a mask hides the
rest of the span the step reads. The active rows are kept in cache rows 0..n-1 (a leaving row's
place is taken by the last one), so a step reads the cache through plain views.

The engine runs in a thread of its own and talks back through each job's `on_event`, called from that
thread with Piece, Prefilled, Done or Failed.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import GPTConfig
from ..inference.decoder import cache_dtype, next_token_logits, prepared_model
from ..inference.generate import TextAssembler
from ..inference.sampling import GenerationOptions, Sampler, Token
from ..model import GPTModel, KVCache, LayerCache
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class Piece:
    """New text of one row (maybe empty while a stop string might be forming), the tokens that made it
    (with log-probabilities when asked for), and why the row ended, if it did: "stop" or "length"."""

    row: int
    text: str
    tokens: tuple[Token, ...]
    finish_reason: str | None = None


@dataclass(frozen=True)
class Prefilled:
    """The prompt has run. With prompt_logprobs asked for: a Token per prompt token (the first one has no
    log-probability: nothing precedes it)."""

    prompt_logprobs: tuple[Token, ...] | None


@dataclass(frozen=True)
class Done:
    """Every row of the job has ended; how many tokens they generated together (end-of-text not counted)."""

    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Prefilled | Done | Failed


class QueueFull(Exception):
    """The engine's waiting line is full: the request should be retried later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new jobs."""


@dataclass
class Row:
    """One sample of a job, decoding in cache row `slot`."""

    job: Job
    index: int  # within its job
    slot: int
    sampler: Sampler
    text: TextAssembler
    next_id: int = 0  # the token to feed at the next step
    generated: int = 0


@dataclass
class Job:
    prompt: list[int]
    options: GenerationOptions  # max_new_tokens, sampling, seed, stop, num_samples (rows), logprobs
    on_event: Callable[[Event], None]
    prompt_logprobs: bool = False
    rows: list[Row] = field(default_factory=list)
    live_rows: int = 0
    completion_tokens: int = 0
    cancelled: bool = False


class SlotCache:
    """The batch's KV cache: `slots` rows, each with its own length (see the module docstring). It offers
    what GPTModel asks of a cache (append, mask, layers[i].update) for a step of one token per active row."""

    def __init__(self, cfg: GPTConfig, slots: int, dtype: torch.dtype, device: torch.device):
        shape = (slots, cfg.n_heads, cfg.context_length, cfg.head_dim)  # (S, H, L_max, D)
        # zeros, not empty: slots past a row's length are masked out, but a NaN there would still make 0 · NaN = NaN
        self.layers = [SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.n_layers)]
        self.device = device
        self.positions = torch.arange(cfg.context_length, device=device)
        self.lengths = [0] * slots  # tokens cached in each cache row
        self.active = 0  # rows 0..active-1 decode
        self.mask: torch.Tensor | None = None

    def append(self, num_tokens: int) -> torch.Tensor:
        """Set up a step of one token per active row; its positions (B, 1)."""
        assert num_tokens == 1, "prompts are prefilled in a KVCache of their own"
        lengths = self.lengths[: self.active]
        self.uniform = len(set(lengths)) == 1
        self.span = max(lengths) + 1  # the keys this step reads: slots 0..span-1
        self.write_at = torch.tensor(lengths, device=self.device)  # (B,)
        # rows of equal length see every slot of the span; otherwise each row sees its own slots only
        self.mask = None if self.uniform else (self.positions[: self.span] <= self.write_at[:, None])[:, None, None]  # (B, 1, 1, L)
        return self.write_at[:, None]

    def advance(self) -> None:
        """The step ran: every active row holds one more token."""
        for slot in range(self.active):
            self.lengths[slot] += 1

    def store(self, slot: int, prompt_cache: KVCache, length: int) -> None:
        """Copy a prompt's keys and values (cache row 0 of prompt_cache) into cache row `slot`."""
        for layer, prompt_layer in zip(self.layers, prompt_cache.layers):
            layer.keys[slot, :, :length] = prompt_layer.keys[0, :, :length]
            layer.values[slot, :, :length] = prompt_layer.values[0, :, :length]
        self.lengths[slot] = length

    def move(self, source: int, target: int) -> None:
        """Copy cache row source into row target (which is free)."""
        length = self.lengths[source]
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]
        self.lengths[target] = length


class SlotLayer(LayerCache):
    """One layer's slice of a SlotCache."""

    owner: SlotCache

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each active row's new key and value (B, H, 1, D) at its own length; return the span read (B, H, L, D)."""
        owner = self.owner
        rows = owner.active
        if owner.uniform:
            position = owner.span - 1
            self.keys[:rows, :, position] = k[:, :, 0]
            self.values[:rows, :, position] = v[:, :, 0]
        else:
            row_index = torch.arange(rows, device=k.device)
            self.keys[row_index, :, owner.write_at] = k[:, :, 0]  # (B, H, D) at (row, :, length)
            self.values[row_index, :, owner.write_at] = v[:, :, 0]
        return self.keys[:rows, :, : owner.span], self.values[:rows, :, : owner.span]


class Engine:
    """The decoding loop (see the module docstring). submit() from any thread; the loop runs in its own."""

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64):
        self.model = prepared_model(model)  # the decoding layout, made once
        self.tokenizer = tokenizer
        self.context = model.cfg.context_length
        self.max_batch = max_batch
        self.max_queue = max_queue
        device = model.device
        dtype = cache_dtype(model.tok_emb.weight.dtype, device)
        self.cache = SlotCache(model.cfg, max_batch, dtype, device)
        self.prompt_cache = KVCache(model.cfg, 1, dtype, device)
        self.slot_rows: list[Row | None] = [None] * max_batch  # the row decoding in each cache row
        self.waiting: deque[Job] = deque()
        self.jobs: list[Job] = []  # admitted, with rows still decoding
        self.wakeup = threading.Condition()
        self.accepting = True
        self.thread = threading.Thread(target=self.run, name="gptlab-engine", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def submit(self, job: Job) -> Job:
        """Queue a job; QueueFull when max_queue jobs already wait, EngineStopped once stop() was called."""
        if job.options.num_samples > self.max_batch:
            raise ValueError(f"n must be at most {self.max_batch} (the server's --max-batch), got {job.options.num_samples}")
        with self.wakeup:
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            rows_free = self.max_batch - self.cache.active
            if len(self.waiting) >= self.max_queue and (self.waiting or job.options.num_samples > rows_free):
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            self.wakeup.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job's rows leave the batch before the next step."""
        with self.wakeup:
            job.cancelled = True
            self.wakeup.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the ones accepted, end the loop."""
        with self.wakeup:
            self.accepting = False
            self.wakeup.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @torch.inference_mode()
    def run(self) -> None:
        while True:
            with self.wakeup:
                while not (self.waiting or self.jobs) and self.accepting:
                    self.wakeup.wait()
                if not (self.waiting or self.jobs):
                    return
                for job in [job for job in self.jobs if job.cancelled]:
                    self.leave(job)
                admitted, rows_free = [], self.max_batch - self.cache.active
                # first come, first served: a job that needs more rows than are free holds the line
                while self.waiting and (self.waiting[0].cancelled or self.waiting[0].options.num_samples <= rows_free):
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admitted.append(job)
                        rows_free -= job.options.num_samples
            try:
                for job in admitted:
                    self.prefill(job)
                if self.cache.active:
                    self.step()
            except Exception as error:  # noqa: BLE001 (a bug, not a user's mistake: fail every job rather than hang them)
                traceback.print_exc()
                for job in {id(job): job for job in admitted + self.jobs}.values():
                    job.on_event(Failed(f"the engine failed: {error}"))
                    if job in self.jobs:
                        self.leave(job)

    def prefill(self, job: Job) -> None:
        """Run the job's prompt, give its n rows cache rows and their first tokens."""
        model, options = self.model, job.options
        ids = torch.tensor([job.prompt], device=model.device)  # (1, T)
        self.prompt_cache.reset(torch.zeros(1, dtype=torch.long, device=model.device))
        features = model.hidden_states(ids, self.prompt_cache)  # (1, T, C)
        job.on_event(Prefilled(self.prompt_logprobs(job, features) if job.prompt_logprobs else None))
        if options.max_new_tokens == 0:  # only the prompt was wanted (echo with logprobs)
            for index in range(options.num_samples):
                job.on_event(Piece(index, "", (), "length"))
            job.on_event(Done(0))
            return
        logits = model.out_head(features[:, -1]).float()  # (1, V)
        self.jobs.append(job)
        for index in range(options.num_samples):
            slot = self.cache.active
            self.cache.active += 1
            self.cache.store(slot, self.prompt_cache, len(job.prompt))
            # row r of a job draws with seed + r, as row r of a batch does in gptlab.generate
            seed = None if options.seed is None else options.seed + index
            sampler = Sampler(options.replace(seed=seed), [job.prompt], model.cfg.vocab_size, model.device)
            row = Row(job, index, slot, sampler, TextAssembler(options.stop))
            self.slot_rows[slot] = row
            job.rows.append(row)
            job.live_rows += 1
            self.take(row, logits)

    def prompt_logprobs(self, job: Job, features: torch.Tensor) -> tuple[Token, ...]:
        """Each prompt token's log-probability given the tokens before it, and the most likely alternatives."""
        logprobs = self.model.out_head(features[0, :-1]).float().log_softmax(dim=-1)  # (T-1, V)
        following = torch.tensor(job.prompt[1:], device=logprobs.device)
        chosen = logprobs.gather(-1, following[:, None])[:, 0].tolist()
        top = logprobs.topk(job.options.logprobs, dim=-1)
        return (Token(job.prompt[0]),) + tuple(
            Token(token, logprob, tuple(zip(ids, values)))
            for token, logprob, ids, values in zip(job.prompt[1:], chosen, top.indices.tolist(), top.values.tolist()))

    def step(self) -> None:
        """One token for every active row."""
        active = self.cache.active
        next_ids = torch.tensor([self.slot_rows[slot].next_id for slot in range(active)], device=self.model.device)
        logits = next_token_logits(self.model, next_ids[:, None], self.cache)  # (B, V)
        self.cache.advance()
        # rows that end in take() hand their cache row to another, so list them by cache row before any does
        for slot, row in enumerate(self.slot_rows[:active]):
            self.take(row, logits[slot : slot + 1])

    def take(self, row: Row, logits: torch.Tensor) -> None:
        """Choose the row's next token from its logits (1, V), pass its text on, end the row if it is done."""
        job = row.job
        _, (token,) = row.sampler.choose(logits)
        row.next_id = token.id
        row.generated += 1
        if token.id == self.tokenizer.eot_id:
            text, tokens = row.text.finish(), ()
        else:
            text, tokens = row.text.feed(self.tokenizer.decode_bytes([token.id])), (token,)
            job.completion_tokens += 1
        finish_reason = "stop" if row.text.finished else None
        # the next step would write at position prompt + generated - 1, which must be inside the context
        if finish_reason is None and (row.generated == job.options.max_new_tokens or
                                      len(job.prompt) + row.generated > self.context):
            text += row.text.finish()
            finish_reason = "length"
        job.on_event(Piece(row.index, text, tokens, finish_reason))
        if finish_reason is not None:
            self.free(row)
            job.live_rows -= 1
            if job.live_rows == 0:
                self.jobs.remove(job)
                job.on_event(Done(job.completion_tokens))

    def free(self, row: Row) -> None:
        """Give the row's cache row up; the last active row moves into it, keeping rows 0..active-1 dense."""
        last = self.cache.active - 1
        if row.slot != last:
            moved = self.slot_rows[last]
            self.cache.move(last, row.slot)
            moved.slot = row.slot
            self.slot_rows[row.slot] = moved
        self.slot_rows[last] = None
        self.cache.active -= 1
        row.slot = -1

    def leave(self, job: Job) -> None:
        """Drop a job's remaining rows (its client went away, or the engine failed)."""
        for row in job.rows:
            if row.slot >= 0:
                self.free(row)
        job.live_rows = 0
        self.jobs.remove(job)
