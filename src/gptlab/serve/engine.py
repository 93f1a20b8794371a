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

Faults. A job's rows (samplers, random generators, text assemblers) are built in full before any cache row
is claimed for them. An exception while prefilling a job, or while choosing one of its tokens, fails that
job alone: its rows leave the batch, it gets Failed, and the others decode on. An exception in the batched
forward pass cannot be pinned on one job, so it fails the jobs in the batch and empties the cache, and the
loop goes on with the jobs waiting. Nothing ends the loop but stop(); should the thread die all the same,
`failure` says why, `health()` says "dead", and submit() refuses new jobs at once. While it has work, the
loop records the time of its last progress (`heartbeat`): `health()` says "wedged" once that is older
than `wedged_after` seconds.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..inference.cache import KVCache
from ..inference.decoder import cache_dtype, next_token_logits, prepared_model
from ..inference.generate import TextAssembler
from ..inference.sampling import GenerationOptions, Sampler, Token, offset_seed
from ..model import GPTModel
from ..tokenizer import Tokenizer
from .metrics import EngineMetrics


@dataclass(frozen=True)
class Piece:
    """New text of one row (maybe empty while a stop string might be forming), the tokens that made it
    (with log-probabilities when asked for; a generated end-of-text token is among them, though it adds no
    text), and why the row ended, if it did: "stop" or "length"."""

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
    last_token_at: float = 0.0  # time.monotonic() of its last token, for the latency histogram


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
    ended: bool = False  # Done or Failed was sent: no more events
    submitted_at: float = 0.0  # time.monotonic() when it was queued, for the time to first token


class Engine:
    """The decoding loop (see the module docstring). submit() from any thread; the loop runs in its own."""

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        wedged_after: float = 60.0,
        metrics: EngineMetrics | None = None,
    ):
        self.model = prepared_model(model)  # the decoding layout, made once
        self.tokenizer = tokenizer
        self.context = model.cfg.context_length
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.wedged_after = wedged_after
        self.metrics = metrics or EngineMetrics()
        device = model.device
        self.cache_dtype = cache_dtype(model.tok_emb.weight.dtype, device)
        self.cache = KVCache(model.cfg, max_batch, self.cache_dtype, device, ragged=True)
        self.cache.active = 0  # rows 0..active-1 decode
        self.prompt_cache = KVCache(model.cfg, 1, self.cache_dtype, device)
        self.slot_rows: list[Row | None] = [None] * max_batch  # the row decoding in each cache row
        self.waiting: deque[Job] = deque()
        self.jobs: list[Job] = []  # admitted, with rows still decoding
        self.wakeup = threading.Condition()
        self.accepting = True
        self.heartbeat = time.monotonic()
        self.failure: BaseException | None = None  # why the loop's thread ended, if it did other than by stop()
        self.thread = threading.Thread(target=self.run, name="gptlab-engine", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def health(self) -> str:
        """ "ok", "dead" (the loop's thread ended without stop()) or "wedged" (it has work but has made no
        progress for wedged_after seconds)."""
        if self.failure is not None or (
            self.accepting and self.thread.ident is not None and not self.thread.is_alive()
        ):
            return "dead"
        busy = bool(self.jobs or self.waiting)
        return "wedged" if busy and time.monotonic() - self.heartbeat > self.wedged_after else "ok"

    def submit(self, job: Job) -> Job:
        """Queue a job; QueueFull when max_queue jobs already wait, EngineStopped once stop() was called or
        the loop has died."""
        if job.options.num_samples > self.max_batch:
            raise UserError(
                f"n must be at most {self.max_batch} (the server's --max-batch), got {job.options.num_samples}"
            )
        with self.wakeup:
            if not self.accepting or self.health() == "dead":
                raise EngineStopped(
                    "the server is shutting down"
                    if not self.accepting
                    else f"the decoding loop has stopped ({self.failure!r})"
                )
            rows_free = self.max_batch - self.cache.active
            if len(self.waiting) >= self.max_queue and (self.waiting or job.options.num_samples > rows_free):
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            if not (self.jobs or self.waiting):
                self.heartbeat = time.monotonic()  # idle until now: the wait for progress starts here
            job.submitted_at = time.monotonic()
            self.waiting.append(job)
            self.wakeup.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a decoding one's rows before the next step."""
        with self.wakeup:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
            self.wakeup.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the ones accepted, end the loop."""
        with self.wakeup:
            self.accepting = False
            self.wakeup.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as error:  # noqa: BLE001 (the loop catches its jobs' errors; this is the last resort)
            self.failure = error
            traceback.print_exc()
            for job in [*self.jobs, *self.waiting]:
                self.fail(job, f"the decoding loop stopped: {error!r}")

    @torch.inference_mode()
    def loop(self) -> None:
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
                while self.waiting and self.waiting[0].options.num_samples <= rows_free:
                    job = self.waiting.popleft()
                    admitted.append(job)
                    rows_free -= job.options.num_samples
                self.heartbeat = time.monotonic()
            for job in admitted:
                self.guarded(job, self.prefill)
            if self.cache.active:
                self.step()
            self.heartbeat = time.monotonic()

    def guarded(self, job: Job, work: Callable[[Job], None]) -> None:
        """work(job); an exception fails that job alone."""
        try:
            work(job)
        except Exception as error:  # noqa: BLE001 (a bug or a bad request that passed the checks: this job fails)
            traceback.print_exc()
            self.fail(job, f"the engine failed on this request: {error!r}")
        self.heartbeat = time.monotonic()

    def fail(self, job: Job, message: str) -> None:
        """End the job with Failed, its rows out of the batch."""
        self.metrics.errors.inc("engine")
        self.leave(job)
        self.send(job, Failed(message))

    def send(self, job: Job, event: Event) -> None:
        if not job.ended:
            job.ended = isinstance(event, (Done, Failed))
            job.on_event(event)

    def prefill(self, job: Job) -> None:
        """Run the job's prompt, give its n rows cache rows and their first tokens. The rows are built before
        any cache row is claimed, so a request that cannot be served leaves the cache as it was."""
        model, options = self.model, job.options
        rows = [
            Row(
                job,
                index,
                -1,
                Sampler(
                    options.replace(seed=offset_seed(options.seed, index)),
                    [job.prompt],
                    model.cfg.vocab_size,
                    model.device,
                    self.tokenizer.vocab_size,
                ),
                TextAssembler(options.stop),
            )
            for index in range(options.num_samples)
        ]  # row r of a job draws with seed + r, as in gptlab.generate
        ids = torch.tensor([job.prompt], device=model.device)  # (1, T)
        self.prompt_cache.reset()
        features = model.hidden_states(ids, self.prompt_cache)  # (1, T, C)
        self.metrics.prompt_tokens.inc(amount=len(job.prompt))
        self.send(job, Prefilled(self.prompt_logprobs(job, features) if job.prompt_logprobs else None))
        if options.max_new_tokens == 0:  # only the prompt was wanted (echo with logprobs)
            for index in range(options.num_samples):
                self.send(job, Piece(index, "", (), "length"))
            self.send(job, Done(0))
            return
        logits = model.out_head(features[:, -1]).float()  # (1, V)
        job.rows, job.live_rows = rows, len(rows)
        self.jobs.append(job)
        for row in rows:
            row.slot = self.cache.active
            self.cache.active += 1
            self.cache.store(row.slot, self.prompt_cache, len(job.prompt))
            self.slot_rows[row.slot] = row
        for row in rows:
            if row.slot >= 0:  # a row may already have ended, and with it the job, if a token failed
                self.take(row, logits)

    def prompt_logprobs(self, job: Job, features: torch.Tensor) -> tuple[Token, ...]:
        """Each prompt token's log-probability given the tokens before it, and the most likely alternatives
        among the ids the tokenizer can decode."""
        logprobs = self.model.out_head(features[0, :-1]).float().log_softmax(dim=-1)  # (T-1, V)
        following = torch.tensor(job.prompt[1:], device=logprobs.device)
        chosen = logprobs.gather(-1, following[:, None])[:, 0].tolist()
        top = logprobs[:, : self.tokenizer.vocab_size].topk(job.options.logprobs, dim=-1)
        return (Token(job.prompt[0]),) + tuple(
            Token(token, logprob, tuple(zip(ids, values)))
            for token, logprob, ids, values in zip(job.prompt[1:], chosen, top.indices.tolist(), top.values.tolist())
        )

    def step(self) -> None:
        """One token for every active row. A failure of the forward pass fails every job in the batch."""
        active = self.cache.active
        next_ids = torch.tensor([self.slot_rows[slot].next_id for slot in range(active)], device=self.model.device)
        try:
            logits = next_token_logits(self.model, next_ids[:, None], self.cache)  # (B, V)
        except Exception as error:  # noqa: BLE001 (cannot be pinned on one job: all of them fail, the loop goes on)
            traceback.print_exc()
            for job in list(self.jobs):
                self.fail(job, f"the engine failed on a batch of requests: {error!r}")
            return
        # rows that end in take() hand their cache row to another, so list them by cache row before any does
        for slot, row in enumerate(self.slot_rows[:active]):
            if row.slot >= 0:  # not gone with a job that failed in this loop
                self.guarded(row.job, lambda job, row=row, slot=slot: self.take(row, logits[slot : slot + 1]))

    def take(self, row: Row, logits: torch.Tensor) -> None:
        """Choose the row's next token from its logits (1, V), pass its text on, end the row if it is done."""
        job = row.job
        _, (token,) = row.sampler.choose(logits)
        row.next_id = token.id
        row.generated += 1
        now = time.monotonic()
        if row.generated == 1:
            self.metrics.time_to_first_token.observe(now - job.submitted_at)
        else:
            self.metrics.inter_token_latency.observe(now - row.last_token_at)
        row.last_token_at = now
        self.metrics.generation_tokens.inc()
        if token.id == self.tokenizer.eot_id:
            text = row.text.finish()
        else:
            text = row.text.feed(self.tokenizer.decode_bytes([token.id]))
            job.completion_tokens += 1
        finish_reason = "stop" if row.text.finished else None
        # the next step would write at position prompt + generated - 1, which must be inside the context
        if finish_reason is None and (
            row.generated == job.options.max_new_tokens or len(job.prompt) + row.generated > self.context
        ):
            text += row.text.finish()
            finish_reason = "length"
        self.send(job, Piece(row.index, text, (token,), finish_reason))
        if finish_reason is not None:
            self.free(row)
            job.live_rows -= 1
            if job.live_rows == 0:
                self.jobs.remove(job)
                self.metrics.requests_finished.inc()
                self.send(job, Done(job.completion_tokens))

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
        """Drop a job's remaining rows (its client went away, or it failed); it may hold none yet."""
        for row in job.rows:
            if row.slot >= 0:
                self.free(row)
        job.live_rows = 0
        if job in self.jobs:
            self.jobs.remove(job)
