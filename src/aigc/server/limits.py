"""What keeps a server standing: a body-size cap that never holds more than the cap in memory, a per-key rate
limit, and a bounded queue of generation work (uvicorn has no body limit, and its --limit-concurrency answers
a plain-text 503 without Retry-After: these are ours)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy",
             507: "insufficient_storage"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ApiError.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """The outermost ASGI layer: a request body over `max_bytes` is answered 413 (read and thrown away in
    chunks, so a client that sends it whole gets the answer); a body within it is passed on. An exception
    that escapes the app after its 500 was sent (Starlette re-raises it for the server's log) ends here:
    uvicorn would otherwise close the connection under the answer. Bodies to `streamed` paths (uploads, with a
    cap of their own) pass through as they come, unbuffered."""

    def __init__(self, app, max_bytes: int, streamed: tuple[str, ...] = ()):
        self.app, self.max_bytes, self.streamed = app, max_bytes, streamed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] in self.streamed:
            return await self._forward(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            return await _send_error(send, 400, "Content-Length is not a number")
        too_big = length is not None and int(length) > self.max_bytes
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            if not too_big:
                body += message.get("body", b"")
                too_big = len(body) > self.max_bytes
                if too_big:
                    body = bytearray()  # from now on only counted
            more = message.get("more_body", False)
        if too_big:
            return await _send_error(send, 413, f"request body over the server's cap of {self.max_bytes:,} bytes "
                                                f"(aigc serve --max-body-mb)")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the client's disconnect

        return await self._forward(scope, replay, send)

    async def _forward(self, scope, receive, send):
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, receive, watched_send)
        except Exception:  # noqa: BLE001 - logged by the app's 500 handler
            if not started:
                await _send_error(send, 500, "internal error")
            return None


async def _send_error(send, status: int, message: str) -> None:
    payload = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class RateLimit:
    """At most `per_minute` requests in any 60 s window per caller (an API key, or the client address while no
    key exists); 0 = no limit. Thread-safe."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self._seen: dict[str, deque] = {}
        self._lock = threading.Lock()

    def check(self, caller: str) -> None:
        if self.per_minute <= 0:
            return
        now = self.clock()
        with self._lock:
            seen = self._seen.setdefault(caller, deque())
            while seen and seen[0] <= now - 60:
                seen.popleft()
            if len(seen) >= self.per_minute:
                wait = max(1, math.ceil(seen[0] + 60 - now))
                raise ApiError(429, f"rate limit: {self.per_minute} requests a minute; try again in {wait} s",
                               code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
            seen.append(now)


class WorkQueue:
    """Generation work: `workers` run at once, at most `max_waiting` wait; past that a request is answered 503
    with Retry-After at once instead of piling up."""

    def __init__(self, workers: int, max_waiting: int):
        self.workers, self.max_waiting = workers, max_waiting
        self.running = self.waiting = 0
        self._free: asyncio.Condition | None = None

    async def acquire(self) -> None:
        if self._free is None:
            self._free = asyncio.Condition()
        if self.running >= self.workers and self.waiting >= self.max_waiting:
            raise ApiError(503, f"the server is busy ({self.running} generating, {self.waiting} waiting); "
                                f"try again shortly", code="queue_full", headers={"Retry-After": "2"})
        self.waiting += 1
        try:
            async with self._free:
                await self._free.wait_for(lambda: self.running < self.workers)
                self.running += 1
        finally:
            self.waiting -= 1

    async def release(self) -> None:
        async with self._free:
            self.running -= 1
            self._free.notify()
