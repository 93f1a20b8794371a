"""`gptlab serve`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

    engine.py    the decoding loop that requests join and leave between steps
    protocol.py  OpenAI's request and response bodies
    app.py       the routes, errors, keys and limits
    server.py    loading, uvicorn, graceful stop
"""

from .server import ServeSettings, serve

__all__ = ["ServeSettings", "serve"]
