"""`gptlab serve` in a child process, for tests, benchmarks and notebooks: start it on a free port, wait
until the model has loaded, stop it with SIGTERM as a service manager would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path


class BackgroundServer:
    """`python -m gptlab serve --checkpoint CHECKPOINT --port 0 OPTIONS...`; `url` once it is ready.
    `log` collects what it writes on stderr."""

    def __init__(self, checkpoint: Path, *options: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gptlab", "serve", "--checkpoint", str(checkpoint), "--port", "0", *options],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(r" at (http://\S+)", line)  # the line the server prints once the model is loaded
            if found:
                self.url = found[1]
                break
        else:
            raise RuntimeError("gptlab serve did not start:\n" + "".join(self.log))
        # go on reading stderr, so that the server never blocks on a full pipe
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=timeout)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
