"""What `GET /metrics` reports, in Prometheus' text format (version 0.0.4), as vLLM and llama-server expose it:
counters, gauges and histograms written out by hand (a few dozen lines; no client library needed).

The engine counts prompt and generated tokens and finished requests, and times the first token of each
request (from when it was queued) and the gap between a row's tokens; the routes count errors by type;
the gauges (requests decoding and waiting) are read from the engine when the page is asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

PREFIX = "gptlab_"
# Seconds; the buckets vLLM uses for its time-to-first-token and inter-token-latency histograms, trimmed.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


def number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Counter:
    """A monotonically increasing count, optionally split by one label."""

    def __init__(self, name: str, help: str, label: str | None = None):
        self.name, self.help, self.label = PREFIX + name, help, label
        self.values: dict[str | None, float] = {} if label else {None: 0}
        self.lock = threading.Lock()

    def inc(self, label_value: str | None = None, amount: float = 1) -> None:
        with self.lock:
            self.values[label_value] = self.values.get(label_value, 0) + amount

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self.lock:
            for value_label, value in sorted(self.values.items(), key=lambda item: str(item[0])):
                labels = f'{{{self.label}="{value_label}"}}' if self.label else ""
                yield f"{self.name}{labels} {number(value)}"


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = PREFIX + name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.lock = 0.0, threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))] += 1
            self.sum += value

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self.lock:
            total = 0
            for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
                total += count
                yield f'{self.name}_bucket{{le="{bound}"}} {total}'
            yield f"{self.name}_sum {number(self.sum)}"
            yield f"{self.name}_count {total}"


def gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name} {number(value)}"]


class EngineMetrics:
    """The server's counters and histograms (shared by the engine's thread and the routes)."""

    def __init__(self):
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens run through the model.")
        self.generation_tokens = Counter("generation_tokens_total", "Tokens generated (end-of-text included).")
        self.requests_finished = Counter("requests_finished_total", "Prompts whose every sample has ended.")
        self.errors = Counter(
            "errors_total",
            "Failed requests, by type (the error envelope's type; engine: a failure inside the decoding loop).",
            label="type",
        )
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "From a prompt being queued to its first generated token.", TTFT_BUCKETS
        )
        self.inter_token_latency = Histogram(
            "inter_token_latency_seconds", "Between two tokens of one sample.", ITL_BUCKETS
        )

    def render(self, running: int, waiting: int, healthy: bool) -> str:
        lines = [
            *gauge("requests_running", "Prompts decoding now.", running),
            *gauge("requests_waiting", "Prompts waiting for rows.", waiting),
            *gauge("engine_healthy", "1 while the decoding loop runs and makes progress, else 0.", int(healthy)),
        ]
        for metric in (
            self.prompt_tokens,
            self.generation_tokens,
            self.requests_finished,
            self.errors,
            self.time_to_first_token,
            self.inter_token_latency,
        ):
            lines += metric.lines()
        return "\n".join(lines) + "\n"
