"""Stage transports in this process: the `Stages` protocol the staged executor drives, and
three ways to run StageWorkers without Ray.

Owns: `Stages` (submit a forward's first message, get its last stage's output in submission
order, call a stage's method, recover, shut down), `StageFailure`, and the in-process
transports: `InProcessStages` (every stage runs at submit: a reference), `TickStages` (one
stage per tick, the pipelined schedule made deterministic, for tests) and `ThreadedStages`
(a thread per stage with queues between them: stages really overlap; drills and the bench).
Does not own: what a plan does (executor.py), Ray actors (ray_executor.py), the stage's model
work (engine/model_runner.py behind stage.py's StageWorker).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Protocol

import torch

from streamdiff.config import Config
from streamdiff.parallel.messages import StageInput, StageSpec, StepOut, stage_specs
from streamdiff.parallel.partition import ranges
from streamdiff.parallel.stage import StageWorker


class StageFailure(RuntimeError):
    """A stage died, hung past the step timeout, or raised."""


class Stages(Protocol):
    specs: list[StageSpec]
    # CPU cores the stages share (threads on one CPU), or None: each stage has a device of its
    # own as far as the transport knows. The executor's pipeline period counts it.
    shared_cores: int | None

    def submit(self, msg: StageInput) -> object: ...

    def get(self, handle: object) -> StepOut: ...

    def call(self, index: int, method: str, *args) -> object: ...

    def recover(self) -> str: ...

    def shutdown(self) -> None: ...


class InProcessStages:
    """StageWorkers called one after another in this process (tests, and a reference for the
    Ray transport: same messages, no serialization). A forward runs every stage at submit."""

    shared_cores: int | None = None  # one stage at a time: nothing overlaps

    def __init__(self, cfg: Config, counts: list[int], device: str | None = None):
        self.specs = stage_specs(ranges(counts), cfg.parallel.vae_stages)  # + encode / decode stages if asked
        self.workers = [StageWorker(cfg, spec, device) for spec in self.specs]

    def submit(self, msg: StageInput) -> object:
        out = msg
        for worker in self.workers:
            out = worker.run(out)
        return out

    def get(self, handle: object) -> StepOut:
        return handle

    def call(self, index: int, method: str, *args) -> object:
        return getattr(self.workers[index], method)(*args)

    def recover(self) -> str:  # pragma: no cover - in-process stages do not die
        raise StageFailure("in-process stages cannot be rebuilt")

    def shutdown(self) -> None:
        self.workers.clear()


class _Handle:
    out: StepOut | None = None


class TickStages(InProcessStages):
    """In-process stages that advance one stage per tick: at tick t stage k runs the forward
    submitted k ticks after it entered (forward p at stage 1 while p + 1 is at stage 0), the
    schedule of real pipelined stages, deterministic and in one thread. `get` ticks until its
    forward is out. `trace` lists (tick, stage, forward key) of every stage run."""

    def __init__(self, cfg: Config, counts: list[int], device: str | None = None):
        super().__init__(cfg, counts, device)
        self._waiting: deque[tuple[StageInput, _Handle]] = deque()
        self._at: list[tuple[object, _Handle] | None] = [None] * len(self.workers)  # next run of stage k
        self.ticks = 0
        self.trace: list[tuple[int, int, tuple]] = []

    def submit(self, msg: StageInput) -> object:
        handle = _Handle()
        self._waiting.append((msg, handle))
        return handle

    def tick(self) -> None:
        if self._at[0] is None and self._waiting:
            self._at[0] = self._waiting.popleft()
        for k in reversed(range(len(self.workers))):  # the last stage first: each item moves one stage
            if self._at[k] is None:
                continue
            msg, handle = self._at[k]
            self._at[k] = None
            out = self.workers[k].run(msg)
            key = out.key if hasattr(out, "key") else (out.step_id, out.part)  # an encode stage passes a StageInput on
            self.trace.append((self.ticks, k, key))
            if k + 1 < len(self.workers):
                self._at[k + 1] = (out, handle)
            else:
                handle.out = out
        self.ticks += 1

    def get(self, handle: object) -> StepOut:
        while handle.out is None:
            if not self._waiting and all(item is None for item in self._at):
                raise StageFailure("internal: a forward was lost")
            self.tick()
        return handle.out


class ThreadedStages(InProcessStages):
    """In-process stages that really overlap: a thread per stage, a queue in front of each.
    A forward's output goes to the next stage's queue; control calls queue on their stage's
    thread too, so they run between forwards in submission order. (torch releases the GIL in
    its kernels, and drills' sleeps release it too.)"""

    def __init__(self, cfg: Config, counts: list[int], device: str | None = None, timeout_s: float | None = None):
        super().__init__(cfg, counts, device)
        self.timeout_s = timeout_s or cfg.parallel.step_timeout_s
        # On a CPU the stage threads share its cores: at most cores // (torch threads per op) run
        # at once, so the pipeline's period is at least their summed work over that. None: each
        # stage has a device of its own as far as this transport knows, or a drill's stages
        # mostly sleep (parallel.block_delay_ms), which takes no core.
        on_cpu = self.workers[0].runner.device.type == "cpu" and not cfg.parallel.block_delay_ms
        self.shared_cores = max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads())) if on_cpu else None
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in self.workers]
        self.busy_s = [0.0] * len(self.workers)  # seconds each stage spent running forwards
        self._threads = [threading.Thread(target=self._loop, args=(k,), name=f"streamdiff-stage-{k}", daemon=True)
                         for k in range(len(self.workers))]
        for thread in self._threads:
            thread.start()

    def _loop(self, k: int) -> None:
        worker, inbox = self.workers[k], self._queues[k]
        while (item := inbox.get()) is not None:
            kind, payload, future = item
            try:
                if kind == "call":
                    method, args = payload
                    future.set_result(getattr(worker, method)(*args))
                    continue
                t0 = time.perf_counter()
                out = worker.run(payload)
                self.busy_s[k] += time.perf_counter() - t0
            except BaseException as exc:  # surfaced to whoever waits on the forward / call
                future.set_exception(exc)
                continue
            if k + 1 < len(self._queues):
                self._queues[k + 1].put(("run", out, future))
            else:
                future.set_result(out)

    def submit(self, msg: StageInput) -> object:
        future: Future = Future()
        self._queues[0].put(("run", msg, future))
        return future

    def get(self, handle: object) -> StepOut:
        try:
            return handle.result(timeout=self.timeout_s)
        except TimeoutError as exc:
            raise StageFailure(f"a forward was not back within {self.timeout_s:g} s") from exc
        except Exception as exc:  # a stage raised: the executor's fault path, as over Ray (not the engine loop's end)
            raise StageFailure(f"{type(exc).__name__}: {exc}") from exc

    def ready(self, handle: object) -> bool:
        return handle.done()

    def call(self, index: int, method: str, *args) -> object:
        """`method` on stage `index`'s worker, in its thread after what it is running: StageFailure
        when it is not back within `timeout_s` (a stage stuck in a forward would otherwise hold
        the engine's recovery, which clears every stage, for ever)."""
        future: Future = Future()
        self._queues[index].put(("call", (method, args), future))
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError as exc:
            raise StageFailure(f"stage {index} did not answer {method} within {self.timeout_s:g} s") from exc

    def shutdown(self) -> None:
        for inbox in self._queues:
            inbox.put(None)
        for thread in self._threads:
            thread.join(timeout=10.0)
        super().shutdown()


__all__ = ["InProcessStages", "StageFailure", "Stages", "ThreadedStages", "TickStages"]
