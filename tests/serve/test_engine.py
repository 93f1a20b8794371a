"""The continuous-batching engine: jobs that join a running batch, rows that leave it, and a bounded queue.
Every job's tokens must equal gptlab.inference's generation of the same prompt alone."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from serve_helpers import noisy_model

from gptlab.config import GPTConfig
from gptlab.inference.generate import generate_tokens
from gptlab.inference.quantize import quantize_model
from gptlab.inference.sampling import GenerationOptions
from gptlab.model import GPTModel
from gptlab.serve.engine import (
    Done,
    Engine,
    EngineStopped,
    Failed,
    Job,
    Piece,
    Prefilled,
    QueueFull,
)
from gptlab.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer()
CFG = GPTConfig(vocab_size=TOKENIZER.vocab_size, context_length=96, emb_dim=32, n_heads=4, n_layers=2)


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return noisy_model(CFG)


class Recorder:
    """A job's events, in order, with a flag once it is done."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Done):
            self.done.set()

    def rows(self, count: int) -> list[list[int]]:
        rows = [[] for _ in range(count)]
        for event in self.events:
            if isinstance(event, Piece):
                rows[event.row] += [token.id for token in event.tokens]
        return rows

    def finish_reasons(self) -> dict[int, str]:
        return {
            event.row: event.finish_reason for event in self.events if isinstance(event, Piece) and event.finish_reason
        }


def alone(model: GPTModel, prompt: list[int], options: GenerationOptions) -> list[list[int]]:
    return [[token.id for token in row] for row in generate_tokens(model, [prompt], options, eot_id=TOKENIZER.eot_id)]


JOBS = [  # prompts of different lengths, greedy and sampled, n of 1 to 3, lengths that end at different steps
    (TOKENIZER.encode("Hello there"), GenerationOptions(max_new_tokens=20, temperature=0.0)),
    (
        TOKENIZER.encode("The quick brown fox jumps over"),
        GenerationOptions(max_new_tokens=31, temperature=0.8, seed=5, num_samples=3, top_k=50),
    ),
    (
        TOKENIZER.encode("A"),
        GenerationOptions(max_new_tokens=12, temperature=1.0, seed=9, top_p=0.8, repetition_penalty=1.3),
    ),
    (
        TOKENIZER.encode("Once upon a time, in a land far away, there lived"),
        GenerationOptions(max_new_tokens=25, temperature=0.7, seed=3, num_samples=2, min_p=0.1),
    ),
]


PRECISIONS = {  # what `gptlab serve --dtype ... --quantize ...` decodes with
    "float32": lambda model: model,
    "bfloat16": lambda model: copy.deepcopy(model).to(torch.bfloat16),
    "int4": lambda model: quantize_model(copy.deepcopy(model).to(torch.bfloat16), "int4"),
    "int8": lambda model: quantize_model(model, "int8"),
}
SHARED_SCALE = {"int8"}  # the rows of a step share one activation scale (inference/quantize.py)


def run_chained_jobs(model: GPTModel) -> list[Recorder]:
    """Each job is submitted from the engine's own thread when the one before it has produced 5 pieces, so it
    joins a batch that is mid-flight, with rows at other lengths; rows finish at different steps."""
    engine = Engine(model, TOKENIZER, max_batch=8).start()
    recorders = [Recorder() for _ in JOBS]

    def chained(index: int):
        def on_event(event) -> None:
            recorders[index](event)
            pieces = sum(isinstance(seen, Piece) for seen in recorders[index].events)
            if isinstance(event, Piece) and pieces == 5 and index + 1 < len(JOBS):
                engine.submit(Job(*JOBS[index + 1], chained(index + 1)))

        return on_event

    engine.submit(Job(*JOBS[0], chained(0)))
    for recorder in recorders:
        assert recorder.done.wait(60)
    engine.stop()
    assert engine.cache.active == 0 and all(row is None for row in engine.slot_rows)
    return recorders


@pytest.mark.parametrize("precision", sorted(set(PRECISIONS) - SHARED_SCALE))
def test_jobs_joining_a_running_batch_get_what_they_get_alone(model, precision):
    """In float32, bfloat16 and int4 one kernel serves every row count, so batching changes no token."""
    model = PRECISIONS[precision](model)
    recorders = run_chained_jobs(model)
    for (prompt, options), recorder in zip(JOBS, recorders):
        assert recorder.rows(options.num_samples) == alone(model, prompt, options)
        assert set(recorder.finish_reasons().values()) <= {"stop", "length"}
    # the later jobs really joined while the first was decoding: its Done comes after job 1's first piece
    first_done = next(i for i, event in enumerate(recorders[0].events) if isinstance(event, Done))
    assert len([event for event in recorders[0].events[:first_done] if isinstance(event, Piece)]) == 20


def test_int8_rows_in_a_batch_move_with_their_neighbours(model):
    """What the docs say of --quantize int8: a row's activations share one 8-bit scale with the rest of its
    step, so its products move with its neighbours (here rows beside larger ones), each within half a step
    of that scale times Σ|w| of the exact product (the bound tests/inference/test_quantize.py checks); greedy
    tokens through the engine still mostly agree with those alone."""
    quantized = PRECISIONS["int8"](model)
    rows = torch.nn.functional.embedding(torch.tensor([JOBS[3][0]]), quantized.tok_emb.weight)[0]  # (T, C)
    qkv = quantized.trf_blocks[0].att.qkv
    alone_product, batch_product = qkv(rows), qkv(torch.cat([rows, 20 * rows]))[: len(rows)]
    assert not torch.equal(alone_product, batch_product)  # the scale is shared
    q, scales, bias = qkv.unpacked()
    weight = q.double() * scales.double()[:, None]  # (out, in)
    exact = rows.double() @ weight.T + (0.0 if bias is None else bias.double())
    for product, peak in ((alone_product, rows.abs().max()), (batch_product, 20 * rows.abs().max())):
        step = 2 * peak.double() / 127  # (max(x, 0) - min(x, 0)) / 127, at most
        assert torch.all((product.double() - exact).abs() <= step / 2 * weight.abs().sum(dim=1) + 1e-6)
    recorders = run_chained_jobs(quantized)
    greedy = recorders[0].rows(1)[0]
    expected = alone(quantized, JOBS[0][0], JOBS[0][1])[0]
    assert sum(a == b for a, b in zip(greedy, expected)) >= len(expected) // 2


def test_text_pieces_stop_strings_and_finish_reasons(model):
    prompt, options = JOBS[0]
    (ids,) = alone(model, prompt, options)
    text = TOKENIZER.decode(ids)
    stop = TOKENIZER.decode(ids[6:8])
    engine = Engine(model, TOKENIZER, max_batch=2).start()
    recorder = Recorder()
    engine.submit(Job(prompt, options.replace(stop=(stop,)), recorder))
    assert recorder.done.wait(60)
    engine.stop()
    pieces = [event for event in recorder.events if isinstance(event, Piece)]
    assert "".join(piece.text for piece in pieces) == text[: text.index(stop)]
    assert pieces[-1].finish_reason == "stop" and isinstance(recorder.events[0], Prefilled)


def test_a_cancelled_job_leaves_the_batch_at_once(model):
    """Cancelled after its third piece (from the engine's thread, as a disconnect would arrive between steps),
    a job produces at most one more step, frees its rows, and the job beside it is unaffected."""
    engine = Engine(model, TOKENIZER, max_batch=4)
    cancelled, kept = Recorder(), Recorder()
    long_job = Job(
        TOKENIZER.encode("Cancel me"), GenerationOptions(max_new_tokens=60, temperature=0.0, num_samples=2), None
    )

    def on_cancelled(event) -> None:
        cancelled(event)
        if sum(isinstance(seen, Piece) for seen in cancelled.events) == 6:  # 3 steps of 2 rows
            engine.cancel(long_job)

    long_job.on_event = on_cancelled
    prompt, options = JOBS[2]
    engine.submit(long_job)
    engine.submit(Job(prompt, options, kept))
    engine.start()
    assert kept.done.wait(60)
    engine.stop()
    assert sum(isinstance(event, Piece) for event in cancelled.events) <= 8
    assert not cancelled.done.is_set()
    assert kept.rows(1) == alone(model, prompt, options)
    assert engine.cache.active == 0 and engine.jobs == []


def test_queue_bound_and_stop(model):
    engine = Engine(model, TOKENIZER, max_batch=2, max_queue=1)  # not started: nothing leaves the queue
    options = GenerationOptions(max_new_tokens=3, temperature=0.0)
    engine.submit(Job([1, 2], options, Recorder()))
    with pytest.raises(QueueFull):
        engine.submit(Job([1, 2], options, Recorder()))
    with pytest.raises(ValueError, match="n must be at most 2"):
        engine.submit(Job([1, 2], options.replace(num_samples=3), Recorder()))
    engine.start()
    engine.stop()  # finishes the job it accepted, then takes no more
    with pytest.raises(EngineStopped):
        engine.submit(Job([1, 2], options, Recorder()))


def test_prompt_logprobs_equal_the_uncached_log_softmax(model):
    prompt = TOKENIZER.encode("Scores for every prompt token")
    engine = Engine(model, TOKENIZER).start()
    recorder = Recorder()
    engine.submit(Job(prompt, GenerationOptions(max_new_tokens=0, logprobs=2), recorder, prompt_logprobs=True))
    assert recorder.done.wait(60)
    engine.stop()
    (prefilled,) = [event for event in recorder.events if isinstance(event, Prefilled)]
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt]))[0].log_softmax(-1)  # (T, V)
    assert prefilled.prompt_logprobs[0].logprob is None
    for position, token in enumerate(prefilled.prompt_logprobs[1:], start=1):
        assert token.id == prompt[position]
        assert token.logprob == pytest.approx(logprobs[position - 1, prompt[position]].item(), abs=1e-5)
        assert [id_ for id_, _ in token.top_logprobs] == logprobs[position - 1].topk(2).indices.tolist()


def run_jobs(engine: Engine, jobs: list[Job], timeout: float = 60) -> None:
    """Queue every job before the loop starts (so they decode side by side), then wait for all to end."""
    for job in jobs:
        engine.submit(job)
    engine.start()
    assert all(job.on_event.done.wait(timeout) for job in jobs)
    engine.stop()


class Ending(Recorder):
    """A Recorder whose `done` is also set by Failed."""

    def __call__(self, event) -> None:
        super().__call__(event)
        if isinstance(event, Failed):
            self.done.set()


def test_samples_that_end_on_their_first_token_beside_other_jobs(model):
    """n rows of a job, all ending on the first token (max_new_tokens 1, a stop string, end-of-text first), while
    other jobs decode: every row gets its finish reason, and the other jobs what they get alone."""
    prompt = TOKENIZER.encode("Once upon a time")
    first = alone(model, prompt, GenerationOptions(max_new_tokens=1, temperature=0))[0][0]
    cases = [
        GenerationOptions(max_new_tokens=1, temperature=1.0, seed=3, num_samples=3),
        GenerationOptions(max_new_tokens=8, temperature=0, num_samples=2, stop=(TOKENIZER.decode([first]),)),
        GenerationOptions(max_new_tokens=8, temperature=0.7, seed=1, num_samples=2, logit_bias={TOKENIZER.eot_id: 100}),
    ]
    steady = GenerationOptions(max_new_tokens=12, temperature=0.9, seed=5, num_samples=2)
    jobs = [Job(prompt, options, Ending()) for options in cases] + [Job(prompt[:2], steady, Ending())]
    run_jobs(Engine(model, TOKENIZER, max_batch=16), jobs)
    assert not any(isinstance(event, Failed) for job in jobs for event in job.on_event.events)
    assert jobs[0].on_event.finish_reasons() == {0: "length", 1: "length", 2: "length"}
    assert jobs[1].on_event.finish_reasons() == {0: "stop", 1: "stop"}
    assert jobs[2].on_event.finish_reasons() == {0: "stop", 1: "stop"}
    assert jobs[3].on_event.rows(2) == alone(model, prompt[:2], steady)


def test_a_failure_fails_its_own_job_and_the_loop_goes_on(model, monkeypatch):
    """A job whose token choice raises gets Failed and leaves the batch; the jobs beside it, and one queued after,
    get what they get alone, and no cache row is left claimed."""
    from gptlab.inference import sampling

    choose = sampling.Sampler.choose

    def broken(self, logits):
        if self.options.seed == 666:
            raise RuntimeError("a bug in sampling")
        return choose(self, logits)

    monkeypatch.setattr(sampling.Sampler, "choose", broken)
    prompt = TOKENIZER.encode("A list of")
    good = GenerationOptions(max_new_tokens=10, temperature=0.8, seed=7, num_samples=2)
    jobs = [
        Job(prompt, good, Ending()),
        Job(prompt, good.replace(seed=666, num_samples=3), Ending()),
        Job(prompt[:3], good.replace(seed=9), Ending()),
    ]
    engine = Engine(model, TOKENIZER, max_batch=8)
    run_jobs(engine, jobs)
    failed = [event for event in jobs[1].on_event.events if isinstance(event, Failed)]
    assert len(failed) == 1 and "a bug in sampling" in failed[0].message
    assert jobs[0].on_event.rows(2) == alone(model, prompt, good)
    assert jobs[2].on_event.rows(2) == alone(model, prompt[:3], good.replace(seed=9))
    assert engine.cache.active == 0 and engine.jobs == [] and engine.health() == "ok"
    assert engine.metrics.errors.values.get("engine") == 1


def test_a_failing_forward_pass_fails_the_batch_then_serves_the_next(model, monkeypatch):
    from gptlab.serve import engine as engine_module

    calls = {"n": 0}
    real = engine_module.next_token_logits

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory, say")
        return real(*args)

    monkeypatch.setattr(engine_module, "next_token_logits", flaky)
    prompt, options = TOKENIZER.encode("def f"), GenerationOptions(max_new_tokens=6, temperature=0)
    engine = Engine(model, TOKENIZER, max_batch=4).start()
    first = Ending()
    engine.submit(Job(prompt, options, first))
    assert first.done.wait(30) and isinstance(first.events[-1], Failed)
    second = Ending()
    engine.submit(Job(prompt, options, second))
    assert second.done.wait(30) and second.rows(1) == alone(model, prompt, options)
    engine.stop()
    assert engine.cache.active == 0


def test_a_cancelled_waiting_job_leaves_the_queue_at_once(model):
    engine = Engine(model, TOKENIZER, max_batch=1, max_queue=2)  # not started: nothing leaves the queue by itself
    options = GenerationOptions(max_new_tokens=2, temperature=0)
    engine.submit(Job([1, 2], options, Recorder()))
    waiting = engine.submit(Job([1, 2], options, Recorder()))
    with pytest.raises(QueueFull):
        engine.submit(Job([1, 2], options, Recorder()))
    engine.cancel(waiting)
    assert waiting not in engine.waiting
    engine.submit(Job([1, 2], options, Recorder()))  # its place is free again


def test_a_dead_loop_says_so_and_refuses_new_jobs(model, monkeypatch):
    engine = Engine(model, TOKENIZER)
    monkeypatch.setattr(engine, "loop", lambda: (_ for _ in ()).throw(RuntimeError("the thread broke")))
    engine.start()
    engine.thread.join(5)
    assert engine.health() == "dead" and "the thread broke" in repr(engine.failure)
    with pytest.raises(EngineStopped, match="the thread broke"):
        engine.submit(Job([1], GenerationOptions(max_new_tokens=1), Recorder()))


def test_a_loop_without_progress_is_wedged(model):
    engine = Engine(model, TOKENIZER, wedged_after=0.05)
    engine.submit(Job([1], GenerationOptions(max_new_tokens=1), Recorder()))  # never started: no progress
    assert engine.health() == "ok"
    threading.Event().wait(0.1)
    assert engine.health() == "wedged"
