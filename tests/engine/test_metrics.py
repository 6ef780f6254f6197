"""The metric primitives compute what their names say."""

from __future__ import annotations

import math

import pytest

from streamdiff.metrics import EngineMetrics, Histogram, RateMeter


def test_histogram_quantiles_buckets_and_window():
    h = Histogram(window=100, buckets=(10, 50, 100))
    for v in range(1, 101):  # 1..100
        h.observe(v)
    assert h.quantile(0.5) == pytest.approx(50.5)
    assert h.quantile(0.9) == pytest.approx(90.1)
    assert h.quantile(0.99) == pytest.approx(99.01)
    snap = h.snapshot()
    assert snap["count"] == 100 and snap["sum"] == 5050 and snap["min"] == 1 and snap["max"] == 100
    assert snap["buckets"] == [(10, 10), (50, 50), (100, 100)]
    for _ in range(100):  # the window forgets, the totals do not
        h.observe(1000)
    assert h.quantile(0.5) == 1000 and h.count == 200 and h.max == 1000
    assert math.isnan(Histogram().quantile(0.5))


def test_rate_meter_counts_over_its_window():
    r = RateMeter(window_s=2.0)
    for i in range(10):
        r.add(i * 0.5, 4)  # 4 frames every 0.5 s = 8 fps
    assert r.rate() == pytest.approx(8.0)
    assert len(r.events) == 5  # only the last 2 s are kept
    # output stops: the rate read at a later time falls to 0 within the window, not held for ever
    assert r.rate(now=4.6) == pytest.approx(8.0)
    assert r.rate(now=7.0) == 0.0


def test_a_stalled_streams_fps_falls_to_zero_in_the_snapshot():
    """A stream whose output stopped (a stalled pipeline, a paused camera) must not go on showing
    its last frame rate on /metrics and the page (a review: it said 16 fps a minute later)."""
    m = EngineMetrics()
    m.stream_added("s", 0.0, 1000.0)
    for i in range(20):
        m.frames_out("s", 0.25 * i, [100.0] * 4)  # a chunk of 4 every 0.25 s: 16 fps
    assert m.snapshot(now_s=4.9)["streams"]["s"]["fps"] == pytest.approx(16.0)
    assert m.snapshot(now_s=65.0)["streams"]["s"]["fps"] == 0.0


def test_stream_metrics_latency_jitter_ttff_and_drops():
    m = EngineMetrics()
    m.stream_added("s", now_s=10.0, deadline_ms=150.0)
    m.frames_out("s", 10.4, [100.0, 120.0])  # first output 400 ms after add
    m.frames_out("s", 10.6, [140.0, 160.0])  # one over the deadline
    m.frames_out("s", 10.8, [100.0])
    m.frames_dropped("s", 3, "input")
    m.frames_dropped("s", 1, "output")
    m.step(rows=5, streams=2, step_ms=40.0, decision_us=12.0, forwards=2)
    snap = m.snapshot()
    s = snap["streams"]["s"]
    assert s["time_to_first_frame_ms"] == pytest.approx(400.0)
    assert s["deadline_misses"] == 1 and s["frames_out"] == 5
    assert s["jitter_ms"] == pytest.approx(0.0, abs=1e-9)  # outputs every 200 ms exactly
    assert s["latency_ms"]["p50"] == pytest.approx(120.0)
    assert s["dropped_frames"] == 4 and s["dropped_by_cause"]["input"] == 3
    assert snap["step_rows"]["max"] == 5 and snap["forwards"] == 2 and snap["last_step"]["streams"] == 2
    m.frames_out("s", 11.3, [100.0])  # a 500 ms gap: the cadence is no longer regular
    assert m.snapshot()["streams"]["s"]["jitter_ms"] > 100
    m.stream_removed("s")
    totals = m.snapshot()["totals"]
    assert m.snapshot()["streams"] == {} and totals["frames_out"] == 6 and totals["streams_removed"] == 1


def test_totals_add_up_across_removal_failures_and_warm_up():
    """The totals the server exports: frames still on their way in when a stream is removed are
    counted, a stream removed twice once, an unrecovered pipeline failure apart from a recovered
    one, a frame exactly at its deadline is no miss, and warm-up steps are forgotten."""
    m = EngineMetrics()
    m.stream_added("s", 0.0, deadline_ms=100.0)
    m.frame_in("s", 3)
    m.frames_out("s", 1.0, [100.0, 100.5])  # at the deadline, then over it
    m.step(rows=2, streams=1, step_ms=30.0, decision_us=5.0, forwards=3)
    m.reset_steps()
    m.stream_removed("s")
    m.stream_removed("s")
    m.frame_in("s", 2)  # arrived after the removal
    for recovered in (True, True, False):
        m.pipeline_failed(recovered)
    snap = m.snapshot()
    assert (snap["steps"], snap["forwards"], snap["step_ms"]["count"], snap["last_step"]) == (0, 0, 0, {})
    totals = snap["totals"]
    assert (totals["frames_in"], totals["deadline_misses"], totals["streams_removed"]) == (5, 1, 1)
    assert (totals["pipeline_failures"], totals["pipeline_failures_unrecovered"]) == (3, 1)


def test_the_spread_of_a_histogram_is_the_samples():
    """Jitter on /metrics is the sample standard deviation (n - 1), as bench.report's."""
    intervals = Histogram()
    intervals.observe(200.0)
    intervals.observe(400.0)
    assert intervals.stddev() == pytest.approx(141.42, abs=0.01)  # 100 * sqrt(2); over n: 100
