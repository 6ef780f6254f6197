"""Prometheus exposition of the engine's metrics snapshot and the gateway's session counts.

Owns: a prometheus-client Collector that reads `engine.metrics()` (streamdiff.metrics) and
`SessionManager.snapshot()` at scrape time. Does not own: measuring anything.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "streamdiff"


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _histogram(name: str, doc: str, snap: dict, labels: dict[str, str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    buckets = [(str(le), float(n)) for le, n in snap["buckets"]] + [("+Inf", float(snap["count"]))]
    family.add_metric(list(labels.values()), buckets, float(snap["sum"]))
    return family


class EngineCollector:
    """per_stream: include the per-stream families (labelled with session ids: only for an
    authorised scrape)."""

    def __init__(self, engine, sessions, per_stream: bool = True):
        self.engine = engine
        self.sessions = sessions
        self.per_stream = per_stream

    def collect(self):
        snap = self.engine.metrics() or {}
        # 1. Gateway.
        gw = self.sessions.snapshot()
        for key in ("sessions", "streams", "max_sessions", "viewers", "max_viewers"):
            g = GaugeMetricFamily(f"{PREFIX}_gateway_{key}", f"gateway {key}")
            g.add_metric([], gw[key])
            yield g
        if not snap:
            return
        # 2. Engine totals and steps.
        for key, value in snap.get("totals", {}).items():
            c = CounterMetricFamily(f"{PREFIX}_{key}", f"engine total {key}")
            c.add_metric([], float(value))
            yield c
        for key in ("steps", "forwards"):
            c = CounterMetricFamily(f"{PREFIX}_{key}", f"engine {key}")
            c.add_metric([], float(snap.get(key, 0)))
            yield c
        for key, unit in (("step_ms", "step time (ms)"), ("step_rows", "rows per step"),
                          ("step_streams", "streams per step"), ("decision_us", "scheduler decision (us)")):
            if key in snap:
                yield _histogram(f"{PREFIX}_{key}", unit, snap[key], {})
        # 3. Per stream (their labels are session ids: authorised scrapes only).
        if not self.per_stream:
            return
        # `key`: the stream key (a WHIP key, or the page's own `page-...` key; "" for a session
        # with none), so an OBS user finds their stream without /sessions; the session id
        # changes with every reconnect, the key does not. A stream still being admitted has no
        # session yet: its key is the one it is admitted under (not "" for its first scrape).
        streams = snap.get("streams", {})
        labels = ["stream", "key"]
        gauges = {key: GaugeMetricFamily(f"{PREFIX}_stream_{key}", f"per-stream {key}", labels=labels)
                  for key in ("fps", "jitter_ms", "time_to_first_frame_ms", "frames_in", "frames_out",
                              "dropped_frames", "frames_overwritten", "deadline_misses")}
        by_cause = GaugeMetricFamily(f"{PREFIX}_stream_dropped_frames_by_cause",
                                     "per-stream input frames that will never be output, by cause",
                                     labels=[*labels, "cause"])
        latency = HistogramMetricFamily(f"{PREFIX}_stream_latency_ms", "input arrival to output (ms)",
                                        labels=labels)
        for sid, s in streams.items():
            session = self.sessions.sessions.get(sid)
            key = session.stream_key if session is not None else self.sessions.admitting_key(sid)
            values = [sid, "" if key in (None, sid) else key]
            for key, family in gauges.items():
                value = _num(s.get(key))
                if value is not None:
                    family.add_metric(values, value)
            for cause, n in s.get("dropped_by_cause", {}).items():
                by_cause.add_metric([*values, cause], float(n))
            hist = s.get("latency_hist")
            if hist:
                buckets = [(str(le), float(n)) for le, n in hist["buckets"]] + [("+Inf", float(hist["count"]))]
                latency.add_metric(values, buckets, float(hist["sum"]))
        yield from gauges.values()
        yield by_cause
        yield latency


def exposition(engine, sessions, per_stream: bool = True) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, sessions, per_stream))
    return generate_latest(registry)
