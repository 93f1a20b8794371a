"""What stands between a connection and the routes: the Host check, the body's size and time limits, and a
time limit on a request's headers. Each refusal is one answer in OpenAI's error envelope, counted in /metrics.

    HostGuard        a browser page on another site can make requests to 127.0.0.1 if it gets its own name
                     to resolve there (DNS rebinding); such requests carry that site's name as their Host. So
                     only the names this server is reached by are accepted (allowed_hosts).
    BodyLimit        a body over max_bytes is 413; one that takes longer than body_timeout to arrive is 408.
    header_timeout   a connection that has not finished sending a request's headers within this many seconds
                     of opening (or of its previous answer) is closed (slowloris): guarded_protocol.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from .metrics import EngineMetrics
from .state import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names accepted (without ports), or None for any: the bound address, and on a loopback address
    localhost and both loopback addresses too; plus `extra` (--allowed-hosts; "*" accepts any). A server
    bound to every address (0.0.0.0, ::) cannot know the names it is reached by, so it accepts any unless
    --allowed-hosts names them."""
    if "*" in extra:
        return None
    if bind_host in WILDCARD_HOSTS and not extra:
        return None
    names = set(extra) | ({bind_host} if bind_host not in WILDCARD_HOSTS else set())
    if is_loopback(bind_host):
        names |= LOOPBACK_NAMES
    return frozenset(name.lower() for name in names)


def host_name(header: str) -> str:
    """A Host header's name: 'example.com:8000' → 'example.com', '[::1]:8000' → '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def refuse(error: APIError, metrics: EngineMetrics, scope, receive, send) -> None:
    metrics.errors.inc(error.type)
    await error.response()(scope, receive, send)


class HostGuard:
    def __init__(self, app, allowed: frozenset[str] | None, metrics: EngineMetrics):
        self.app, self.allowed, self.metrics = app, allowed, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                return await refuse(
                    APIError(
                        400,
                        f"Host {host!r} is not one this server answers to; it answers to "
                        f"{', '.join(sorted(self.allowed))} (add names with --allowed-hosts)",
                        code="invalid_host",
                    ),
                    self.metrics,
                    scope,
                    receive,
                    send,
                )
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, whether or not they declare their length, and bodies that
    take more than timeout seconds to arrive with 408. The body is read here, up to the limit, and handed on
    whole (a body is at most max_bytes, 1 MiB by default)."""

    def __init__(self, app, max_bytes: int, timeout: float, metrics: EngineMetrics):
        self.app, self.max_bytes, self.timeout, self.metrics = app, max_bytes, timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        body, more = b"", True
        deadline = time.monotonic() + self.timeout
        while more and len(body) <= self.max_bytes and not (declared.isdigit() and int(declared) > self.max_bytes):
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await refuse(
                    APIError(
                        408,
                        f"the request body did not arrive within {self.timeout:g} s",
                        headers={"Connection": "close"},
                    ),
                    self.metrics,
                    scope,
                    receive,
                    send,
                )
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if more or len(body) > self.max_bytes:
            return await refuse(
                APIError(413, f"the request body is larger than {self.max_bytes:,} bytes"),
                self.metrics,
                scope,
                receive,
                send,
            )
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: wait for the client to go away
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose next request's headers are not complete within
    header_timeout seconds of it opening or of its previous answer. (uvicorn's own keep-alive timeout stops
    counting once any byte arrives, so a client sending a header a minute keeps it open for ever.)"""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_timer()

        def arm_header_timer(self) -> None:
            self.loop.call_later(header_timeout, self.header_timeout_handler, self.cycle)

        def header_timeout_handler(self, cycle_when_armed) -> None:
            # a new cycle means a request's headers arrived since: the body limit and the routes take over
            waiting_for_headers = self.cycle is cycle_when_armed and (
                self.cycle is None or self.cycle.response_complete
            )
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
