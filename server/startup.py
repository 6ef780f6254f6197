"""The engine's start as a background task, so that the gateway listens from its first second.

Owns: building and warming the engine (AsyncEngine.start) while the routes already answer, the
start's state ("warming", "ready", "failed", "stopped") for /healthz, and the wait a route that
needs the engine does (`ready`). A page opened during warm-up loads and its offer waits for the
engine; before, the port refused connections for the whole warm-up (about 10 s on a CPU, longer
with compilation on a GPU) and a user who came early saw the browser's "unable to connect".
Does not own: the engine (streamdiff.engine) or what a route answers when it is not ready
(server.app).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from aiohttp import web

START_KEY = web.AppKey("engine_start", object)  # the EngineStart


class EngineStart:
    """`engine` (an AsyncEngine) started by `begin()` in a task; `own=False`: started by someone
    else, so its state is just whether it runs."""

    def __init__(self, engine, own: bool = True):
        self.engine = engine
        self.own = own
        self.task: asyncio.Task | None = None
        self._began = time.monotonic()

    def begin(self, then: Callable[[], Awaitable[None]] | None = None) -> asyncio.Task | None:
        """Start the engine in a task (`then` runs after it, in the same task); a no-op for an
        engine that is not ours or already runs."""
        if not self.own or self.engine.running:
            return None
        self._began = time.monotonic()

        async def run() -> None:
            await self.engine.start()
            if then is not None:
                await then()

        self.task = asyncio.create_task(run(), name="engine-start")
        return self.task

    @property
    def state(self) -> str:
        if self.task is not None:
            if not self.task.done():
                return "warming"
            if not self.task.cancelled() and self.task.exception() is not None:
                return "failed"
        return "ready" if self.engine.running else "stopped"

    @property
    def error(self) -> BaseException | None:
        """The exception the start ended with, if it failed."""
        return self.task.exception() if self.state == "failed" else None

    @property
    def warming_s(self) -> float:
        return time.monotonic() - self._began

    async def ready(self, timeout_s: float) -> str | None:
        """Wait up to `timeout_s` for a start in progress. None once the engine runs; otherwise why
        not, in one line (the route sends it with a 503)."""
        if self.state == "warming":  # asyncio.wait: neither a timeout nor a client that gives up cancels the start
            await asyncio.wait([self.task], timeout=timeout_s)
        state = self.state
        if state == "warming":
            return f"the model is still warming up ({self.warming_s:.0f} s so far); try again in a few seconds"
        if state == "ready":
            return None
        if state == "failed":
            return f"the model failed to start: {self.error}"
        return "the server is stopping"
