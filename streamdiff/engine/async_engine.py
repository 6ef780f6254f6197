"""AsyncEngine: the asyncio handle to an EngineCore running in one background thread.

Owns: the engine loop thread (the only thread that touches the core, the executor and the
model; torch releases the GIL while it computes), the thread-safe inbox that carries control
commands and input frames into it, the per-stream bounded output queues on the asyncio side,
start (with warm-up) and a clean stop.
Does not own: scheduling, model work or metrics (core, executor, metrics) and no networking
(the server uses this API).

Inbox: commands (add / update / remove / stats) run in the loop thread between steps, in the
order they were sent, and resolve a future the caller awaits. Input frames wait per stream in
a bounded deque (`inbox_frames`, newest kept; overflow counts as dropped input), so a slow step
never lets input pile up. Loop: apply commands -> hand frames to the core -> one `core.step()`
-> post the output frames waiting to the event loop; with nothing to do it sleeps on the inbox
(after a refusal, once no stream runs, it first re-measures the step: EngineCore.measure).
With plans in flight (pipeline stages) the step does not block on the oldest plan while no new
chunk is ready (`step(block=False)`): the loop polls the inbox every PIPELINE_POLL_S instead,
so a chunk that gets ready meanwhile enters the pipeline at once.

Outputs: `next_frame(stream_id)` returns `OutputFrame`s in order: the frame, the input frame id
and pts it was made from, arrival and output times (engine clock, `time.monotonic`). A queue
holds at most `output_queue_frames`; when full the oldest frame is dropped (counted).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from streamdiff.config import Config
from streamdiff.engine.core import EngineCore
from streamdiff.engine.executor import Executor, LocalExecutor
from streamdiff.engine.types import OutputFrame, StreamClosedError, StreamParams, validate_changes
from streamdiff.scheduler import Admission, StreamSLO

log = logging.getLogger(__name__)
PIPELINE_POLL_S = 0.002  # how often the loop looks for a finished plan while plans are in flight


class _Inbox:
    """Commands and input frames for the loop thread (thread-safe)."""

    def __init__(self, frames_per_stream: int):
        self.frames_per_stream = frames_per_stream
        self._cond = threading.Condition()
        self._commands: deque[tuple[Callable[[EngineCore], object], concurrent.futures.Future]] = deque()
        self._frames: dict[str, deque] = {}
        self._overflow: dict[str, int] = {}

    def command(self, fn: Callable[[EngineCore], object]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    def frame(self, stream_id: str, item: tuple) -> None:
        with self._cond:
            queue = self._frames.setdefault(stream_id, deque())
            queue.append(item)
            if len(queue) > self.frames_per_stream:
                queue.popleft()
                self._overflow[stream_id] = self._overflow.get(stream_id, 0) + 1
            self._cond.notify()

    def forget(self, stream_id: str) -> int:
        """Drop the stream's waiting frames; returns how many frames came in for it since the loop
        last took them (those waiting and those they pushed out), which the engine never saw."""
        with self._cond:
            return len(self._frames.pop(stream_id, ())) + self._overflow.pop(stream_id, 0)

    def take(self, timeout: float) -> tuple[list, dict[str, deque], dict[str, int]]:
        """Everything queued now; waits up to `timeout` s if nothing is."""
        with self._cond:
            if not self._commands and not self._frames and timeout > 0:
                self._cond.wait(timeout)
            commands, frames, overflow = list(self._commands), self._frames, self._overflow
            self._commands.clear()
            self._frames, self._overflow = {}, {}
            return commands, frames, overflow

    def fail_all(self, exc: BaseException) -> None:
        with self._cond:
            for _, future in self._commands:
                if not future.done():
                    future.set_exception(exc)
            self._commands.clear()
            self._frames.clear()


def _count_unseen(core: EngineCore, stream_id: str, n: int) -> None:
    """Input frames of a stream that was removed before the loop took them: they came in (frames_in)
    and will never be output (dropped, "removed"), so the totals still add up."""
    if n:
        core.metrics.frame_in(stream_id, n)
        core.metrics.frames_dropped(stream_id, n, "removed")


class _OutputQueue:
    """One stream's output frames on the asyncio side: bounded, drop-oldest, closable."""

    def __init__(self, maxlen: int):
        self.items: deque[OutputFrame] = deque()
        self.maxlen = maxlen
        self.closed: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, item: OutputFrame) -> bool:
        """Append; returns True if the oldest frame had to be dropped."""
        dropped = len(self.items) >= self.maxlen
        if dropped:
            self.items.popleft()
        self.items.append(item)
        self.event.set()
        return dropped

    def close(self, exc: BaseException) -> None:
        self.closed = exc
        self.event.set()

    async def get(self) -> OutputFrame:
        while True:
            if self.items:
                return self.items.popleft()
            if self.closed is not None:
                raise self.closed
            self.event.clear()
            await self.event.wait()


class AsyncEngine:
    """asyncio API over an EngineCore in a background thread (see the module docstring).

    executor: defaults to a LocalExecutor built from `cfg` in `start()`. Extra keyword
    arguments go to EngineCore (scheduler, clock, max_extra_frames, ...).
    """

    def __init__(
        self,
        cfg: Config,
        executor: Executor | None = None,
        *,
        executor_factory: Callable[[Config], Executor] | None = None,
        warmup: bool = True,
        inbox_frames: int = 8,
        output_queue_frames: int = 64,
        idle_wait_s: float = 0.05,
        **core_kwargs,
    ):
        self.cfg = cfg
        self.executor = executor
        self.executor_factory = executor_factory or local_executor  # run in a thread by start()
        self.warmup = warmup
        self.output_queue_frames = output_queue_frames
        self.idle_wait_s = idle_wait_s
        self._core_kwargs = dict(core_kwargs, output_queue_frames=output_queue_frames)
        self._inbox = _Inbox(inbox_frames)
        self._outputs: dict[str, _OutputQueue] = {}
        # The same queues as the loop thread knows them (set and read on that thread only, by the
        # add and remove commands and the loop): outputs and closes go to the queue of the stream
        # that made them, not to whatever queue its id names when they arrive (a probe: a stream
        # removed and added again under its id got the removed one's last frames).
        self._thread_queues: dict[str, _OutputQueue] = {}
        self._core: EngineCore | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        self.warmup_ms: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build the executor if needed, warm up (one dummy prepare + stream-batch steps at the
        configured size), then start the loop thread."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        built = self.executor is None
        if built:  # (a stop meanwhile waits for the build and shuts down what it made: a probe's
            # SIGTERM during `serve --stages`'s start left Ray actors and a compiled graph to
            # Ray's exit hook, which waited 60 s on them and exited 1)
            build = asyncio.ensure_future(asyncio.to_thread(self.executor_factory, self.cfg))
            try:
                self.executor = await asyncio.shield(build)
            except asyncio.CancelledError:
                await asyncio.wait([build])
                if not build.cancelled() and build.exception() is None:
                    await asyncio.to_thread(build.result().shutdown)
                raise
        try:
            core = EngineCore(self.cfg, self.executor, **self._core_kwargs)
            if self.warmup:
                work = asyncio.ensure_future(asyncio.to_thread(core.warmup))
                try:
                    self.warmup_ms = await asyncio.shield(work)
                except asyncio.CancelledError:  # stopped during warm-up: a step cannot be cut short
                    await asyncio.wait([work])
                    raise
        except BaseException:  # failed or cancelled: the executor (stage threads, actors) goes with it
            executor = self.executor
            if built:
                self.executor = None
            await asyncio.to_thread(executor.shutdown)
            raise
        self._core = core
        self._thread = threading.Thread(target=self._run, name="streamdiff-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the loop after the step in progress, remove every stream, shut the executor
        down and join the thread. Waiting `next_frame` calls raise StreamClosedError."""
        if self._thread is None:
            return
        self._stopping = True
        self._inbox.command(lambda core: None)  # wake the loop
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for queue in self._outputs.values():
            queue.close(StreamClosedError("engine stopped"))
        self._outputs.clear()
        self._thread_queues.clear()  # (the thread has ended)

    async def __aenter__(self) -> "AsyncEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ streams

    async def add_stream(
        self,
        stream_id: str,
        prompt: str,
        *,
        slo: StreamSLO | None = None,
        target_fps: float | None = None,
        deadline_ms: float | None = None,
        input_fps: float | None = None,
        **params: object,
    ) -> Admission:
        """Ask to serve a stream. `params`: steps, seed, noise_strength, motion_aware,
        prompt_blend_chunks (defaults from the config). SLO: `slo`, or target_fps and
        deadline_ms (defaults: the config's `slo:`, target fps 0 meaning video.fps). `input_fps`:
        the rate its frames will arrive at, if the client said (default video.fps; measured once
        they come). Returns the Admission (falsy if refused; it says what the stream can expect
        when admitted)."""
        full = StreamParams.defaults(self.cfg, prompt).with_changes({"prompt": prompt, **params})
        if slo is None:
            default = StreamSLO(self.cfg.slo.target_fps or self.cfg.video.fps, self.cfg.slo.deadline_ms)
            slo = StreamSLO(target_fps or default.target_fps, deadline_ms or default.deadline_ms)
        if stream_id in self._outputs:
            raise KeyError(f"stream {stream_id!r} already exists")
        self._check_running()
        queue = self._outputs[stream_id] = _OutputQueue(self.output_queue_frames)

        def add(core: EngineCore) -> Admission:
            admission = core.add_stream(stream_id, full, slo, input_fps=input_fps)
            if admission:
                self._thread_queues[stream_id] = queue
            return admission

        command = self._inbox.command(add)
        try:  # (shielded: a command the loop has begun cannot be taken back)
            admission = await asyncio.shield(asyncio.wrap_future(command))
        except asyncio.CancelledError:  # the caller gave up: what the add does is undone after it
            self._drop(stream_id, queue)
            self._inbox.command(self._remover(stream_id, 0))
            raise
        except BaseException:
            self._drop(stream_id, queue)
            raise
        if not admission:
            self._drop(stream_id, queue)
        return admission

    def _drop(self, stream_id: str, queue: _OutputQueue) -> bool:
        """Forget `queue`, not another one its id names now (a refused add's clean-up took the
        queue of a later add of the same id: a probe). False if the id names another or none."""
        if self._outputs.get(stream_id) is not queue:
            return False
        del self._outputs[stream_id]
        return True

    def _remover(self, stream_id: str, unseen: int) -> Callable[[EngineCore], bool]:
        def remove(core: EngineCore) -> bool:
            _count_unseen(core, stream_id, unseen)  # before its metrics go (a probe: 25 of 30 frames uncounted)
            self._thread_queues.pop(stream_id, None)
            return core.remove_stream(stream_id)

        return remove

    def push_frame(self, stream_id: str, frame: np.ndarray, pts: object = None) -> None:
        """Hand over one input frame [H, W, 3] uint8 (do not modify it afterwards). Never
        blocks; under overload older frames are dropped (newest kept)."""
        self._check_running()
        if stream_id not in self._outputs:
            raise KeyError(f"unknown stream {stream_id!r}")
        h, w = self.cfg.video.height, self.cfg.video.width
        if not isinstance(frame, np.ndarray) or frame.shape != (h, w, 3) or frame.dtype != np.uint8:
            got = f"{frame.dtype} {list(frame.shape)}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame must be uint8 [{h}, {w}, 3], got {got}")
        self._inbox.frame(stream_id, (frame, pts, self._core.clock()))

    async def next_frame(self, stream_id: str, timeout: float | None = None) -> OutputFrame:
        """The stream's next output frame (waits for it). Raises StreamClosedError when the
        stream is removed or closed, or the engine stops, while the call waits, and on every
        call once the engine loop has failed; asyncio.TimeoutError after `timeout` s; KeyError
        for a stream not served (never added, or removed, closed or stopped before the call)."""
        queue = self._outputs.get(stream_id)
        if queue is None:
            raise KeyError(f"unknown stream {stream_id!r}")
        if timeout is None:
            return await queue.get()
        return await asyncio.wait_for(queue.get(), timeout)

    async def update_params(self, stream_id: str, **changes: object) -> StreamParams:
        """Change live parameters: prompt, prompt_blend_chunks, steps (1-4, re-prepares the
        stream), seed, noise_strength (0.1-1.0), motion_aware. ValueError names a bad field and
        its range; returns the stream's new parameters."""
        changes = validate_changes(changes)
        if stream_id not in self._outputs:
            raise KeyError(f"unknown stream {stream_id!r}")
        return await self._call(lambda core: core.update_params(stream_id, **changes))

    async def remove_stream(self, stream_id: str) -> bool:
        """Stop serving the stream and free everything it holds. False if unknown."""
        queue = self._outputs.pop(stream_id, None)
        if queue is None:
            return False
        queue.close(StreamClosedError(f"stream {stream_id!r} was removed"))
        self._check_running()
        command = self._inbox.command(self._remover(stream_id, self._inbox.forget(stream_id)))
        # shielded: a caller cancelled meanwhile (a handler whose client left) must not take the
        # removal back, its queue being gone already (the stream stayed admitted for good: a probe)
        return await asyncio.shield(asyncio.wrap_future(command))

    async def params(self, stream_id: str) -> StreamParams:
        return await self._call(lambda core: core.params(stream_id))

    async def admission(self, stream_id: str) -> Admission:
        """What the stream can expect now (its latest admission; a steps change re-admits)."""
        return await self._call(lambda core: core.admission(stream_id))

    async def stats(self) -> dict:
        """Bookkeeping sizes from the loop thread (streams, waiting frames, pool slots, ...)."""
        return await self._call(lambda core: core.stats())

    async def expect(self, steps: int | None = None) -> tuple[float, float, float]:
        """(step ms, fps, latency ms) one more stream could expect now."""
        return await self._call(lambda core: core.expect(steps))

    async def outlooks(self) -> dict[str, tuple[float, float]]:
        """(fps, latency ms) each stream can expect beside the streams served now."""
        return await self._call(lambda core: core.outlooks())

    def metrics(self) -> dict:
        """The metrics snapshot (thread-safe; see streamdiff.metrics)."""
        if self._core is None:
            return {}
        core = self._core  # (never a re-measure's scratch metrics: EngineCore.measure)
        return core.served_metrics.snapshot(core.clock())

    # ------------------------------------------------------------------ plumbing

    def _check_running(self) -> None:
        if self._error is not None:
            raise RuntimeError("the engine loop failed") from self._error
        if self._thread is None or self._stopping:
            raise RuntimeError("AsyncEngine is not running (call await start())")

    async def _call(self, fn: Callable[[EngineCore], object]):
        self._check_running()
        return await asyncio.wrap_future(self._inbox.command(fn))

    def _run(self) -> None:
        """The loop thread: commands -> frames -> one step -> outputs to the event loop."""
        core = self._core
        busy = False
        try:
            while True:
                # 1. Control commands, in order.
                # (plans in flight: poll briefly, so new input enters the pipeline while they run)
                wait_s = 0.0 if busy else (PIPELINE_POLL_S if core.plans_in_flight else self.idle_wait_s)
                commands, frames, overflow = self._inbox.take(wait_s)
                for fn, future in commands:
                    if not future.set_running_or_notify_cancel():
                        continue
                    try:
                        future.set_result(fn(core))
                    except BaseException as exc:  # reported to the caller, the loop goes on
                        future.set_exception(exc)
                if self._stopping:
                    break
                # 2. Input frames (streams removed meanwhile are skipped).
                known = set(core.stream_ids)
                for stream_id, items in frames.items():
                    if stream_id not in known:  # came in, and never will: counted in the totals
                        _count_unseen(core, stream_id, len(items) + overflow.get(stream_id, 0))
                        continue
                    for frame, pts, arrival_s in items:
                        core.push_frame(stream_id, frame, pts, now=arrival_s)
                    superseded = overflow.get(stream_id, 0)  # came in, and a newer frame pushed them out
                    if superseded:
                        core.metrics.frame_in(stream_id, superseded)
                        core.metrics.frames_dropped(stream_id, superseded, "input")
                # 3. One step, then hand its outputs (and streams it had to close) to the event loop.
                report = core.step(block=False)
                busy = report is not None
                if not busy and core.wants_measure and not core.stream_ids:
                    core.measure()  # a refusal on stale numbers: measure again now that it is idle
                closed = core.take_closed()
                if closed:
                    for stream_id in closed:
                        _count_unseen(core, stream_id, self._inbox.forget(stream_id))
                    self._post(self._close_streams, [(sid, self._thread_queues.pop(sid, None), why)
                                                     for sid, why in closed.items()])
                # (a command may have collected plans too: adding a stream drains the pipeline)
                waiting = [sid for sid in core.stream_ids if core.output_frames_waiting(sid)]
                if waiting:
                    self._post(self._deliver, [(sid, self._thread_queues.get(sid), core.pop_outputs(sid))
                                               for sid in waiting])
        except BaseException as exc:  # pragma: no cover - surfaced to every waiter
            log.exception("engine loop failed")
            self._error = exc
            self._inbox.fail_all(exc)
            self._post(self._fail, exc)
        finally:
            for stream_id in core.stream_ids:
                try:
                    core.remove_stream(stream_id)
                except Exception:  # pragma: no cover
                    log.exception("removing stream %r at stop", stream_id)
            self._inbox.fail_all(StreamClosedError("engine stopped"))
            core.executor.shutdown()

    def _post(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _deliver(self, batch: list[tuple[str, _OutputQueue | None, list[OutputFrame]]]) -> None:
        for stream_id, queue, frames in batch:
            if queue is None or self._outputs.get(stream_id) is not queue:  # removed meanwhile
                continue
            overwritten = sum(queue.put(frame) for frame in frames)
            self._core.metrics.frames_overwritten(stream_id, overwritten)

    def _close_streams(self, closed: list[tuple[str, _OutputQueue | None, str]]) -> None:
        for stream_id, queue, reason in closed:
            if queue is not None and self._drop(stream_id, queue):
                queue.close(StreamClosedError(f"stream {stream_id!r} was closed: {reason}"))

    def _fail(self, exc: BaseException) -> None:
        for queue in self._outputs.values():
            closed = StreamClosedError("the engine loop failed")
            closed.__cause__ = exc
            queue.close(closed)
        for callback in list(self._failure_callbacks):
            callback(exc)

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(exc)` runs on the event loop when the engine loop fails (after every
        waiting reader has been told): the server stops instead of serving nothing."""
        self._failure_callbacks.append(callback)


def local_executor(cfg: Config) -> Executor:
    """The default executor factory: one process, one ModelRunner. Pipeline stages are chosen
    where the engine is composed (streamdiff.parallel.build_executor), so the engine never
    imports `parallel`."""
    if cfg.parallel.num_stages > 1 or cfg.parallel.ray_address:
        raise ValueError(f"parallel.num_stages={cfg.parallel.num_stages} needs pipeline stages: build the engine "
                         "with executor_factory=streamdiff.parallel.build_executor")
    return LocalExecutor.from_config(cfg)


__all__ = ["AsyncEngine", "local_executor"]
