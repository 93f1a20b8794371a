"""What the benchmark scripts share: timing one call, describing the machine, writing the JSON report."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch
import transformers

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def machine_info() -> dict:
    """Enough to tell runs apart: the CPU, library versions, threads, and how busy the shared machine was."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
