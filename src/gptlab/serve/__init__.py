"""`gptlab serve`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

    engine.py      the decoding loop that requests join and leave between steps
    protocol.py    OpenAI's request and response bodies
    state.py       the error envelope and the state the routes share
    checks.py      reading a request: validation, body limit, prompts and sampling options
    answers.py     a request's jobs in the engine, answered whole or as server-sent events
    app.py         the routes and the API key
    server.py      loading, uvicorn, graceful stop
    background.py  a server in a child process (tests, benchmarks, notebooks)

ServeSettings and serve load on first use, so `import gptlab.serve.engine` does not load FastAPI and uvicorn.
"""

from __future__ import annotations

__all__ = ["ServeSettings", "serve"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'gptlab.serve' has no attribute {name!r}")
    from . import server

    return getattr(server, name)
