"""`gptlab serve`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

    engine.py      the decoding loop that requests join and leave between steps
    protocol.py    OpenAI's request and response bodies
    state.py       the error envelope and the state the routes share
    checks.py      reading a request: validation, body limit, prompts and sampling options
    answers.py     a request's jobs in the engine, answered whole or as server-sent events
    app.py         the routes and the API key
    server.py      loading, uvicorn, graceful stop
    background.py  a server in a child process (tests, benchmarks, notebooks)
"""

from .server import ServeSettings, serve

__all__ = ["ServeSettings", "serve"]
