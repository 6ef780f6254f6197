"""Stage transports in this process: the `Stages` protocol the staged executor drives, and
three ways to run StageWorkers without Ray.

Owns: `Stages` (submit a forward's first message, get its last stage's output in submission
order, call a stage's method, recover, shut down), `StageFailure`, and the in-process
transports: `InProcessStages` (every stage runs at submit: a reference), `TickStages` (one
stage per tick, the pipelined schedule made deterministic, for tests) and `ThreadedStages`
(a thread per stage with queues between them: stages really overlap; the served demo, drills
and the bench), and `CoreMeter` (how many CPU cores threaded stages had to themselves lately).
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
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from streamdiff.config import Config
from streamdiff.model.build import apply_threads
from streamdiff.parallel.messages import StageInput, StageSpec, StepOut, stage_specs
from streamdiff.parallel.partition import ranges
from streamdiff.parallel.stage import StageWorker


class StageFailure(RuntimeError):
    """A stage died, hung past the step timeout, or raised."""


class StreamsNotRestarted(StageFailure):
    """From `recover`: the stages serve again, but the streams they held are closed, not
    restarted (in-process stages: an error raised in a forward could come back at once)."""


class Stages(Protocol):
    specs: list[StageSpec]
    # CPU cores the stages share (threads on one CPU), or None: each stage has a device of its
    # own as far as the transport knows. The executor's pipeline period counts it.
    shared_cores: int | None
    # Forwards the transport holds in flight at most (Ray's compiled graph), or None: no bound.
    max_executions: int | None

    def submit(self, msg: StageInput) -> object: ...

    def get(self, handle: object) -> StepOut: ...

    def call(self, index: int, method: str, *args) -> object: ...

    def recover(self) -> str: ...

    def shutdown(self) -> None: ...


class InProcessStages:
    """StageWorkers called one after another in this process (tests, and a reference for the
    Ray transport: same messages, no serialization). A forward runs every stage at submit."""

    shared_cores: int | None = None  # one stage at a time: nothing overlaps
    max_executions: int | None = None

    def __init__(self, cfg: Config, counts: list[int], device: str | None = None):
        # This process's torch threads (runtime.threads), as a one-process engine sets them: the
        # served demo's stage threads ran with torch's default (one per core, OpenMP barriers)
        # where its config asks for one each.
        apply_threads(cfg)
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

    def recover(self) -> str:
        raise StreamsNotRestarted("streams on in-process stages are closed, not restarted: start them again")

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


def usable_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity: a container's cpuset, `taskset`), or None
    where the platform cannot say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    """How many CPU cores this process may use: its affinity set, else os.cpu_count()."""
    cpus = usable_cpus()
    return len(cpus) if cpus else (os.cpu_count() or 1)


def proc_busy_s(cpus: set[int] | None = None, stat: str | None = None) -> float | None:
    """Seconds the CPUs `cpus` (None: all of them) have spent busy since boot, from /proc/stat
    (or its text `stat`): every field but idle and iowait. None where there is no /proc/stat."""
    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.read()
        except OSError:
            return None
    ticks = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        number = name[3:]
        wanted = name == "cpu" if cpus is None else (name.startswith("cpu") and number.isdigit() and int(number) in cpus)
        if not wanted:
            continue
        fields = [int(v) for v in rest.split()]
        ticks += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def threads_cpu_s(threads: list[threading.Thread]) -> float:
    """The CPU seconds `threads` have used (their per-thread CPU clocks; Linux). A thread that
    ended (or has not started) no longer counts."""
    total = 0.0
    for thread in threads:
        if not thread.is_alive():  # a joined thread's id may already name another thread
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (AttributeError, OSError, TypeError):
            pass
    return total


@dataclass(frozen=True)
class CoreShare:
    """What the stage threads of a CPU process had lately (CoreMeter). `free`: the cores left to
    this process (the machine's less other processes' busy time). `helper_ms_per_chunk`: the
    process's CPU time outside the stage threads (a server's codecs, the engine loop) per chunk
    done: work that grows with the chunks a plan carries, so a newcomer's share is predicted
    with its chunks instead of being taken from the cores as if it stayed what it was."""

    free: float
    helper_ms_per_chunk: float


class CoreMeter:
    """The CPU cores some threads (the stages) can count on, over the last `window_s`: the busy
    time of the CPUs this process may use (/proc/stat, its affinity's lines) less this process's
    CPU time is what other processes took; the process's CPU time less the threads' own
    (`threads_cpu`) is its helpers' (codecs, the engine loop), counted per chunk done. Where
    /proc/stat or per-thread clocks are missing, or before `min_s` of history, None."""

    def __init__(self, cores: int, threads_cpu: Callable[[], float], window_s: float = 3.0, min_s: float = 1.0,
                 busy_s: Callable[[], float | None] | None = None, clock: Callable[[], float] = time.monotonic,
                 process_cpu: Callable[[], float] = time.process_time):
        if busy_s is None:  # the CPUs this process may use (a cpuset's), not the whole machine's
            cpus = usable_cpus()
            busy_s = lambda: proc_busy_s(cpus)  # noqa: E731
        self.cores, self.window_s, self.min_s = cores, window_s, min_s
        self._threads_cpu, self._busy_s, self._clock, self._process_cpu = threads_cpu, busy_s, clock, process_cpu
        # (time, machine busy s, process CPU s, threads' CPU s, chunks done)
        self._samples: deque[tuple[float, float, float, float, int]] = deque()
        self.ok = busy_s() is not None

    def share(self, chunks_done: int = 0) -> CoreShare | None:
        """The window up to now; `chunks_done`: the chunks the threads finished so far (a count
        that only grows). Free cores are 0.25 at least. With no chunk done in the window the
        helpers' time counts as taken cores, as other processes' does."""
        if not self.ok:
            return None
        now, busy = self._clock(), self._busy_s()
        if busy is None:
            return None
        self._samples.append((now, busy, self._process_cpu(), self._threads_cpu(), chunks_done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        (t0, busy0, process0, mine0, chunks0), (_, _, process, mine, chunks) = self._samples[0], self._samples[-1]
        seconds = now - t0
        if seconds < self.min_s:
            return None
        helpers = max(0.0, (process - process0) - (mine - mine0))
        others = max(0.0, (busy - busy0) - max(process - process0, mine - mine0)) / seconds
        if chunks > chunks0:
            return CoreShare(max(0.25, min(float(self.cores), self.cores - others)), 1000.0 * helpers / (chunks - chunks0))
        return CoreShare(max(0.25, min(float(self.cores), self.cores - others - helpers / seconds)), 0.0)


class ThreadedStages(InProcessStages):
    """In-process stages that really overlap: a thread per stage, a queue in front of each.
    A forward's output goes to the next stage's queue; control calls queue on their stage's
    thread too, so they run between forwards in submission order. (torch releases the GIL in
    its kernels, and drills' sleeps release it too.)"""

    POLL_S = 0.5  # how often a wait looks at the stage threads

    def __init__(self, cfg: Config, counts: list[int], device: str | None = None, timeout_s: float | None = None):
        super().__init__(cfg, counts, device)
        self.timeout_s = timeout_s or cfg.parallel.step_timeout_s
        # On a CPU the stage threads share its cores: at most cores // (torch threads per op) run
        # at once, so the pipeline's period is at least their summed work over that. None: each
        # stage has a device of its own as far as this transport knows, or a drill's stages
        # mostly sleep (parallel.block_delay_ms), which takes no core.
        on_cpu = self.workers[0].runner.device.type == "cpu" and not cfg.parallel.block_delay_ms
        self.shared_cores = max(1, usable_cores() // max(1, torch.get_num_threads())) if on_cpu else None
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in self.workers]
        self.busy_s = [0.0] * len(self.workers)  # seconds each stage spent running forwards
        self._threads: list[threading.Thread] = [None] * len(self.workers)  # type: ignore[list-item]
        self._ended: list[BaseException | None] = [None] * len(self.workers)  # why a stage's thread ended
        self._stopping = False
        # Forwards carry the recovery count they were submitted in: one that timed out runs on in
        # its stage (a thread cannot be stopped) and was handed on to the next stage after the
        # recovery had cleared it, writing K/V and prompt K/V the next stream on those lanes read
        # (a review: 14 grey levels off). Every stage drops a forward from before a recovery.
        self._epoch = 0
        for k in range(len(self.workers)):
            self._start(k)
        # The cores the stages can count on (shared cores only): the executor's period divides the
        # stages' CPU time by it instead of their wall time (which counts every wait for a core).
        # A stage's CPU time is its thread's (`ModelRunner.run`): with more torch threads per op
        # the work runs on pool threads too, uncounted, so the meter is for one thread a stage.
        one_thread = torch.get_num_threads() == 1
        per_thread = hasattr(time, "pthread_getcpuclockid")
        self.meter = (CoreMeter(self.shared_cores, lambda: threads_cpu_s(self._threads))
                      if self.shared_cores and one_thread and per_thread else None)

    def core_share(self, chunks_done: int) -> CoreShare | None:
        """The cores the stage threads had lately and their helpers' CPU per chunk (CoreMeter),
        or None: unknown."""
        return self.meter.share(chunks_done) if self.meter is not None else None

    def _start(self, k: int) -> None:
        self._ended[k] = None
        self._threads[k] = threading.Thread(target=self._loop, args=(k,), name=f"streamdiff-stage-{k}", daemon=True)
        self._threads[k].start()

    def _dead(self) -> str | None:
        """Why a stage's thread is gone, if one is (a fault probe: a stage thread that ended
        left the engine waiting `timeout_s` on every forward and call, then closing every new
        stream, while /healthz said ready)."""
        if self._stopping:
            return None
        for k, thread in enumerate(self._threads):
            if not thread.is_alive():
                why = self._ended[k]
                return f"stage {k}'s thread ended" + (f" ({type(why).__name__}: {why})" if why is not None else "")
        return None

    def _wait(self, future: Future, deadline: float, late: str) -> object:
        """The future's result by `deadline` (monotonic), failing at once if a stage's thread is gone."""
        while True:
            left = deadline - time.monotonic()
            try:
                return future.result(timeout=max(0.0, min(left, self.POLL_S)))
            except FutureTimeout:
                if (dead := self._dead()) is not None:
                    raise StageFailure(dead) from None
                if left <= self.POLL_S:
                    raise StageFailure(late) from None

    def _loop(self, k: int) -> None:
        try:
            self._serve(k)
        except BaseException as exc:  # the loop itself failed (forwards and calls are caught below)
            self._ended[k] = exc
            raise

    def _serve(self, k: int) -> None:
        worker, inbox = self.workers[k], self._queues[k]
        while (item := inbox.get()) is not None:
            kind, payload, future = item
            if kind == "run" and future.epoch != self._epoch:
                if not future.done():
                    future.set_exception(StageFailure("a forward from before the stages were recovered"))
                continue
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
        future.deadline = time.monotonic() + self.timeout_s  # from its submission (a fault probe: the
        # live loop collects a plan overdue by timeout_s, and a wait of timeout_s more made it twice)
        future.epoch = self._epoch
        self._queues[0].put(("run", msg, future))
        return future

    def get(self, handle: object) -> StepOut:
        try:
            return self._wait(handle, handle.deadline, f"a forward was not back within {self.timeout_s:g} s")
        except StageFailure:
            raise
        except Exception as exc:  # a stage raised: the executor's fault path, as over Ray (not the engine loop's end)
            raise StageFailure(f"{type(exc).__name__}: {exc}") from exc

    def ready(self, handle: object) -> bool:
        """Back, or never coming back: a stage thread that ended makes the live loop collect the
        forward now (`get` then fails at once) instead of once it is overdue."""
        return handle.done() or self._dead() is not None

    def call(self, index: int, method: str, *args) -> object:
        """`method` on stage `index`'s worker, in its thread after what it is running: StageFailure
        when it is not back within `timeout_s` (a stage stuck in a forward would otherwise hold
        the engine's recovery, which clears every stage, for ever)."""
        future: Future = Future()
        self._queues[index].put(("call", (method, args), future))
        return self._wait(future, time.monotonic() + self.timeout_s,
                          f"stage {index} did not answer {method} within {self.timeout_s:g} s")

    def recover(self) -> str:
        """A stage thread that ended is started again on a fresh queue (what waited in the old one
        fails); the streams are closed, not restarted, as after any in-process stage failure.
        Forwards still running or queued are dropped by every stage (`_epoch`)."""
        self._epoch += 1
        restarted = []
        for k, thread in enumerate(self._threads):
            if thread.is_alive():
                continue
            old, self._queues[k] = self._queues[k], queue.SimpleQueue()
            while True:
                try:
                    item = old.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], Future):
                    item[2].set_exception(StageFailure(f"stage {k}'s thread ended"))
            self._start(k)
            restarted.append(k)
        what = f"stage thread {', '.join(map(str, restarted))} started again; " if restarted else ""
        raise StreamsNotRestarted(f"{what}streams on in-process stages are closed, not restarted: start them again")

    def shutdown(self) -> None:
        self._stopping = True
        for inbox in self._queues:
            inbox.put(None)
        for thread in self._threads:
            thread.join(timeout=10.0)
        super().shutdown()


__all__ = ["CoreMeter", "CoreShare", "InProcessStages", "StageFailure", "Stages", "StreamsNotRestarted",
           "ThreadedStages", "TickStages", "proc_busy_s", "threads_cpu_s", "usable_cores", "usable_cpus"]
