"""Engine metrics: plain-Python counters, histograms and rates, read as one `snapshot()` dict.

Owns: what the engine measures, per stream (output fps, time to first frame, per-frame latency
p50/p90/p99, jitter, dropped frames by cause, deadline misses) and per step (batch rows and
streams, step time, scheduler decision time), and the small `Histogram` / `RateMeter` classes
behind them. Does not own: exposition (the server turns `snapshot()` into Prometheus text with
prometheus-client; nothing here imports it) or any decision.

Definitions:
- latency_ms: from an input frame's arrival at the engine to the end of the step that output it.
- deadline miss: an output frame whose latency exceeds its stream's `deadline_ms`.
- fps: output frames per second over the last `window_s` seconds of output.
- jitter_ms: standard deviation of the time between a stream's consecutive output chunks over
  the recent window (0 = perfectly regular output cadence).
- time_to_first_frame_ms: from `add_stream` to the end of the step that output its first frame.
- frames_in: input frames handed to the engine for the stream (each counted once, on entry);
  frames_out: frames the model output for it; dropped_frames: input frames that will never be
  output, by cause: "input" (superseded by newer ones while waiting, in the engine's inbox or the
  scheduler's queue), "restart" (inside the model when a steps change or a lost executor
  re-prepared the stream), "removed" (waiting or inside the model when the stream was removed).
  So frames_in = frames_out + dropped_frames + the frames the engine holds now (none once a
  stream is removed: the totals add up exactly).
- pipeline_failures: times the executor's pipeline failed (a stage actor died, a step was not back
  within parallel.step_timeout_s); _unrecovered: of those, the ones it could not be rebuilt
  after (its streams were closed instead of restarted).
- frames_overwritten: output frames overwritten in the stream's full output queue before anyone
  read them (a reader slower than the engine). They are counted in frames_out, not in
  dropped_frames: they were output.
Thread-safety: every method takes one lock; `snapshot()` may be called from any thread.
"""

from __future__ import annotations

import math
import threading
from collections import deque

# Bucket upper bounds in ms for latency / step histograms (Prometheus `le` values).
DEFAULT_BUCKETS_MS = (5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2500, 5000, 10000)


class Histogram:
    """Count / sum / min / max over all samples, cumulative bucket counts, and quantiles over
    the last `window` samples (a ring buffer: quantiles follow the recent behaviour)."""

    def __init__(self, window: int = 2048, buckets: tuple[float, ...] = DEFAULT_BUCKETS_MS):
        self.window: deque[float] = deque(maxlen=window)
        self.buckets = tuple(buckets)
        self.bucket_counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def observe(self, value: float) -> None:
        value = float(value)
        self.window.append(value)
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.bucket_counts[i] += 1

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the recent window, linear interpolation; NaN when empty."""
        if not self.window:
            return math.nan
        data = sorted(self.window)
        pos = q * (len(data) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    def stddev(self) -> float:
        n = len(self.window)
        if n < 2:
            return 0.0
        mean = sum(self.window) / n
        return math.sqrt(sum((x - mean) ** 2 for x in self.window) / (n - 1))

    def snapshot(self) -> dict:
        return {
            "count": self.count,
            "sum": self.sum,
            "mean": self.sum / self.count if self.count else math.nan,
            "min": self.min if self.count else math.nan,
            "max": self.max if self.count else math.nan,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            "buckets": list(zip(self.buckets, self.bucket_counts)),
        }


class RateMeter:
    """Events per second over the last `window_s` seconds: add(t, n) at time t."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()

    def add(self, t: float, n: int = 1) -> None:
        self.events.append((t, n))
        self._prune(t)

    def _prune(self, now: float) -> None:
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()

    def rate(self, now: float | None = None) -> float:
        """n per second between the first and last event in the window (the first event's n
        is the start, not counted); 0 with fewer than two events. `now`: the window ends there,
        so a stream whose output stopped falls to 0 within `window_s` (pruned only on `add`, a
        stalled stream's rate on /metrics stayed at its last value for ever: a review)."""
        if now is not None:
            self._prune(now)
        if len(self.events) < 2:
            return 0.0
        span = self.events[-1][0] - self.events[0][0]
        if span <= 0:
            return 0.0
        return sum(n for _, n in list(self.events)[1:]) / span


class StreamMetrics:
    """One stream's counters (see the module docstring for definitions)."""

    def __init__(self, added_s: float, deadline_ms: float):
        self.added_s = added_s
        self.deadline_ms = deadline_ms
        self.first_output_s: float | None = None
        self.last_output_s: float | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.dropped: dict[str, int] = {"input": 0, "restart": 0, "removed": 0}
        self.frames_overwritten = 0
        self.deadline_misses = 0
        self.latency_ms = Histogram()
        self.interval_ms = Histogram(window=256)
        self.fps = RateMeter()

    def snapshot(self, now_s: float | None = None) -> dict:
        ttff = None if self.first_output_s is None else (self.first_output_s - self.added_s) * 1000.0
        lat = self.latency_ms
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "fps": self.fps.rate(now_s),
            "time_to_first_frame_ms": ttff,
            "latency_ms": {"p50": lat.quantile(0.5), "p90": lat.quantile(0.9), "p99": lat.quantile(0.99),
                           "max": lat.max if lat.count else math.nan},
            "latency_hist": lat.snapshot(),
            "jitter_ms": self.interval_ms.stddev(),
            "dropped_frames": sum(self.dropped.values()),
            "dropped_by_cause": dict(self.dropped),
            "frames_overwritten": self.frames_overwritten,
            "deadline_misses": self.deadline_misses,
            "deadline_ms": self.deadline_ms,
        }


class EngineMetrics:
    """Per-stream and per-step metrics of one engine (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.streams: dict[str, StreamMetrics] = {}
        self.steps = 0
        self.forwards = 0
        self.step_ms = Histogram()
        self.step_rows = Histogram(buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step_streams = Histogram(buckets=(1, 2, 4, 8, 16, 32, 64))
        self.decision_us = Histogram(buckets=(10, 25, 50, 100, 250, 500, 1000, 2500))
        self.totals = {"streams_added": 0, "streams_removed": 0, "frames_in": 0, "frames_out": 0,
                       "dropped_frames": 0, "frames_overwritten": 0, "deadline_misses": 0,
                       "pipeline_failures": 0, "pipeline_failures_unrecovered": 0}
        self.warmup_ms: float | None = None
        self.last_step: dict = {}

    # -- streams -------------------------------------------------------------------------

    def stream_added(self, stream_id: str, now_s: float, deadline_ms: float) -> None:
        with self._lock:
            self.streams[stream_id] = StreamMetrics(now_s, deadline_ms)
            self.totals["streams_added"] += 1

    def stream_removed(self, stream_id: str) -> None:
        with self._lock:
            if self.streams.pop(stream_id, None) is not None:
                self.totals["streams_removed"] += 1

    def pipeline_failed(self, recovered: bool) -> None:
        """The executor's pipeline failed (a stage died or stopped answering); `recovered`: it
        was rebuilt and its streams restart, else they were closed."""
        with self._lock:
            self.totals["pipeline_failures"] += 1
            self.totals["pipeline_failures_unrecovered"] += not recovered

    def set_deadline(self, stream_id: str, deadline_ms: float) -> None:
        with self._lock:
            if stream_id in self.streams:
                self.streams[stream_id].deadline_ms = deadline_ms

    def frame_in(self, stream_id: str, n: int = 1) -> None:
        """`n` input frames of the stream entered the engine (the totals count them also for a
        stream already removed: frames that were still on their way in)."""
        with self._lock:
            if (s := self.streams.get(stream_id)) is not None:
                s.frames_in += n
            self.totals["frames_in"] += n

    def frames_dropped(self, stream_id: str, n: int, cause: str = "input") -> None:
        """`n` input frames of the stream will never be output; cause: 'input', 'restart' or
        'removed' (module docstring)."""
        if n <= 0:
            return
        with self._lock:
            s = self.streams.get(stream_id)
            if s is not None:
                s.dropped[cause] = s.dropped.get(cause, 0) + n
            self.totals["dropped_frames"] += n

    def frames_overwritten(self, stream_id: str, n: int) -> None:
        """`n` output frames of the stream were overwritten unread (its output queue was full)."""
        if n <= 0:
            return
        with self._lock:
            s = self.streams.get(stream_id)
            if s is not None:
                s.frames_overwritten += n
            self.totals["frames_overwritten"] += n

    def frames_out(self, stream_id: str, output_s: float, latencies_ms: list[float]) -> None:
        """A step ended at `output_s` and output these frames of the stream."""
        if not latencies_ms:
            return
        with self._lock:
            s = self.streams.get(stream_id)
            if s is None:
                return
            if s.first_output_s is None:
                s.first_output_s = output_s
            elif s.last_output_s is not None:
                s.interval_ms.observe((output_s - s.last_output_s) * 1000.0)
            s.last_output_s = output_s
            s.frames_out += len(latencies_ms)
            s.fps.add(output_s, len(latencies_ms))
            misses = 0
            for ms in latencies_ms:
                s.latency_ms.observe(ms)
                misses += ms > s.deadline_ms
            s.deadline_misses += misses
            self.totals["frames_out"] += len(latencies_ms)
            self.totals["deadline_misses"] += misses

    # -- steps ---------------------------------------------------------------------------

    def step(self, rows: int, streams: int, step_ms: float, decision_us: float, forwards: int = 1) -> None:
        with self._lock:
            self.steps += 1
            self.forwards += forwards
            self.step_ms.observe(step_ms)
            self.step_rows.observe(rows)
            self.step_streams.observe(streams)
            self.decision_us.observe(decision_us)
            self.last_step = {"rows": rows, "streams": streams, "step_ms": step_ms, "decision_us": decision_us,
                              "forwards": forwards}

    def reset_steps(self) -> None:
        """Forget step statistics (after warm-up)."""
        with self._lock:
            self.steps = self.forwards = 0
            self.step_ms = Histogram()
            self.step_rows = Histogram(buckets=self.step_rows.buckets)
            self.step_streams = Histogram(buckets=self.step_streams.buckets)
            self.decision_us = Histogram(buckets=self.decision_us.buckets)
            self.last_step = {}

    # -- reading -------------------------------------------------------------------------

    def snapshot(self, now_s: float | None = None) -> dict:
        """`now_s`: the engine clock's now (the streams' fps end there)."""
        with self._lock:
            return {
                "streams": {sid: s.snapshot(now_s) for sid, s in self.streams.items()},
                "steps": self.steps,
                "forwards": self.forwards,
                "step_ms": self.step_ms.snapshot(),
                "step_rows": self.step_rows.snapshot(),
                "step_streams": self.step_streams.snapshot(),
                "decision_us": self.decision_us.snapshot(),
                "last_step": dict(self.last_step),
                "totals": dict(self.totals),
                "warmup_ms": self.warmup_ms,
            }


__all__ = ["DEFAULT_BUCKETS_MS", "EngineMetrics", "Histogram", "RateMeter", "StreamMetrics"]
