"""streamdiff.bench.report (shared by both bench modes) on hand-made series."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from streamdiff.bench import report as br


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_quantiles_match_numpy_linear(n):
    samples = list(np.random.default_rng(n).exponential(50.0, size=n))
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert br.quantile(samples, q) == pytest.approx(float(np.percentile(samples, 100 * q)))
    assert math.isnan(br.quantile([], 0.5))


def test_latency_summary_counts_misses_strictly_above_the_deadline():
    lat = [10.0, 20.0, 30.0, 40.0, 50.0]
    s = br.latency_summary(lat, deadline_ms=30.0)
    assert (s["count"], s["mean"], s["p50"], s["max"]) == (5, 30.0, 30.0, 50.0)
    assert s["deadline_misses"] == 2 and s["deadline_miss_rate"] == pytest.approx(0.4)
    assert "deadline_misses" not in br.latency_summary(lat)
    empty = br.latency_summary([], deadline_ms=1.0)
    assert empty["count"] == 0 and math.isnan(empty["p99"]) and empty["deadline_miss_rate"] == 0.0


def test_bursts_merge_into_one_arrival():
    # chunks of 4 frames leaving together every 0.1 s, then every 0.2 s
    times = [t for t in (0.0, 0.1, 0.2, 0.4, 0.6) for _ in range(4)]
    assert br.arrival_gaps_s(times) == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert br.jitter_ms(times) == pytest.approx(1000 * statistics.stdev([0.1, 0.1, 0.2, 0.2]))
    regular = [t for t in np.arange(10) * 0.1 for _ in range(4)]
    assert br.jitter_ms(regular) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(br.jitter_ms([0.0, 0.1]))  # one gap: no spread to measure (a probe saw 0.00 printed)


def test_freezes_count_gaps_longer_than_three_periods():
    period = 1 / 30
    times = [i * period for i in range(10)]  # regular
    times += [times[-1] + 3.5 * period]  # a freeze (> 3 periods)
    times += [times[-1] + 2.9 * period]  # not a freeze
    times += [times[-1] + 10 * period] * 3  # a freeze, then a burst of 3 (one arrival)
    assert br.freezes(times, period) == 2
    assert br.FREEZE_PERIODS == 3.0


def test_fps_and_fps_series():
    times = [i * 0.05 for i in range(41)]  # 20 fps over 2 s
    assert br.fps(times) == pytest.approx(20.0)
    assert br.fps([1.0]) == 0.0 and br.fps([1.0, 1.0]) == 0.0
    series = br.fps_series(times, bin_s=1.0)
    assert [t for t, _ in series] == [0.0, 1.0, 2.0]
    assert [v for _, v in series] == pytest.approx([20.0, 20.0, 1.0])
    assert br.fps_series([]) == []


def test_format_table_aligns_and_shows_missing_values():
    rows = [{"a": 1.234, "b": "x"}, {"a": math.nan, "b": None}, {"a": 10.0}]
    text = br.format_table(rows, [("a", "A"), ("b", "B col")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B", "col"]
    assert lines[0] == "    A  B col"  # headers right-aligned over their numbers
    assert lines[2].split() == ["1.23", "x"] and lines[3].split() == ["-", "-"] and lines[4].split() == ["10.00", "-"]
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width


def test_write_json_is_strict(tmp_path):
    report = {"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": {"d": 0.5, 3: "k"}}
    path = br.write_json(report, tmp_path / "sub" / "r.json")

    def reject(name):
        raise AssertionError(name)

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data == {"a": None, "b": [1.0, None, [2, None]], "c": {"d": 0.5, "3": "k"}}


def test_plot_writes_a_png(tmp_path):
    series = {
        "one": {"latency_ms": [10.0, 12.0, 30.0], "times_s": [0.0, 0.5, 1.2, 2.5]},
        "empty": {"latency_ms": [], "times_s": []},
    }
    path = br.plot(series, tmp_path / "p" / "plot.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # a probe: a series of one burst (no fps line) printed matplotlib's "No artists with labels" warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        br.plot({"burst": {"latency_ms": [5.0], "times_s": [1.0, 1.0]}}, tmp_path / "burst.png")


def test_fps_over_time_is_chunk_level_not_one_second_bins():
    # 4-frame chunks every 0.6 s (a CPU): 1-second bins swing between 8 and 4 fps...
    times = [k * 0.6 + i * 1e-4 for k in range(10) for i in range(4)]
    bins = [v for _, v in br.fps_series(times)]
    assert max(bins) - min(bins) >= 4.0
    # ...the chunk-level rate is the steady 6.67 fps the viewer sees.
    rates = br.chunk_fps_series(times)
    assert len(rates) == 9 and all(abs(v - 4 / 0.6) < 1e-2 for _, v in rates)
    assert rates[0][0] == 0.6 and br.chunk_fps_series([]) == []


def test_fps_over_time_counts_each_chunks_own_frames():
    """A stream's first chunk may carry more frames than the later ones (5, then 4 in the tiny
    preset): each point is its own burst's frames over the time since the previous burst, and a
    burst is frames each less than BURST_GAP_S after the one before it."""
    times = [0.0] * 5 + [0.5 + 0.0006 * i for i in range(4)] + [1.0 + 0.0006 * i for i in range(4)]
    rates = br.chunk_fps_series(times)
    assert [t for t, _ in rates] == pytest.approx([0.5, 1.0])
    assert [v for _, v in rates] == pytest.approx([8.0, 8.0])
    assert br.arrival_gaps_s(times) == pytest.approx([0.5, 0.5 - 0.0018])


def test_plot_draws_the_deadline_and_the_default_deadline_is_the_configs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from streamdiff.cli import bench_deadline_ms

    seen = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (seen.append(fig), real_close(fig)))
    series = {"a": {"latency_ms": [100.0, 9000.0], "times_s": [0.0, 0.5, 1.0]}}
    br.plot(series, tmp_path / "plot.png", deadline_ms=8000.0)
    cdf = seen[0].axes[0]
    assert any(list(line.get_xdata()) == [8000.0, 8000.0] for line in cdf.get_lines())
    assert "deadline 8000 ms" in [t.get_text() for t in cdf.get_legend().get_texts()]
    assert bench_deadline_ms("tiny", ()) == 8000.0  # the CPU preset's service level
    assert bench_deadline_ms("tiny", ["slo.deadline_ms=500"]) == 500.0


def _record(sent_s, received):
    from streamdiff.client.bench import SessionRecord

    record = SessionRecord(0, sent_s=list(sent_s))
    record.received = list(received)
    record.arrivals_s = [t for t, _ in received]
    return record


def test_end_to_end_fps_is_not_raised_by_the_start_up_queue_draining():
    """A probe: a 4 s run at 10 fps reported 13.7 fps: the frames queued while the first chunk was
    made came out faster than they were sent, and fps counted that drain as throughput."""
    from streamdiff.client.bench import delivered_fps

    sent = [i / 10 for i in range(40)]  # 10 fps for 4 s
    # latency falls from 1.5 s to 0.6 s over the first 12 frames, then holds: every frame returns
    latency = [1.5 - 0.075 * min(i, 12) for i in range(40)]
    draining = _record(sent, [(sent[i] + latency[i], i) for i in range(40)])
    assert br.fps(draining.arrivals_s) > 11  # the arrival span alone
    assert delivered_fps(draining) == pytest.approx(10.0)
    # a server falling behind (latency growing, one frame in two returned): the arrival span
    behind = _record(sent, [(sent[i] + 0.5 + 0.05 * i, i) for i in range(0, 40, 2)])
    assert delivered_fps(behind) == pytest.approx(19 / (behind.arrivals_s[-1] - behind.arrivals_s[0]))
    assert delivered_fps(behind) < 5
    assert delivered_fps(_record(sent, [(1.0, 0)])) == 0.0


def test_end_to_end_numbers_leave_the_warm_up_out():
    """A review: a clean run (nothing dropped) said 9.46 fps at 10 in, one freeze and 67 ms of
    jitter, all of it the first chunk coming back late and the queue behind it draining; a slow
    first second inflated p90 and p99. The warm-up is sent and received, not measured; frames
    that come back without a readable id are counted apart, not as dropped."""
    from streamdiff.client.bench import session_report

    sent = [i / 10 for i in range(100)]  # 10 fps for 10 s
    # the first 20 frames come back together at 2.5 s (the first chunk, the queue behind it); then
    # every frame 0.3 s after it left
    back = [(2.5 + 0.001 * i if i < 20 else sent[i] + 0.3, i) for i in range(100)]
    record = _record(sent, [b for b in back if b[1] % 10 != 7])  # every tenth id comes back unreadable
    record.unreadable_s = [t for t, i in back if i % 10 == 7]
    record.arrivals_s = sorted(t for t, _ in back)
    end_s = 10.3
    whole = session_report(record, 10.0, 1000.0, 0.0, None, end_s)
    assert whole["latency_ms"]["p90"] > 1000 and whole["jitter_ms"] > 20  # what the start did to the numbers
    s = session_report(record, 10.0, 1000.0, 0.0, None, end_s, from_s=2.55)
    assert s["latency_ms"]["p50"] == pytest.approx(300.0) and s["latency_ms"]["max"] == pytest.approx(300.0)
    assert s["fps"] == pytest.approx(10.0, abs=0.2)  # frames arrived in the window over its length
    assert s["freezes"] == 0 and s["jitter_ms"] < 1.0
    assert s["dropped"] == 0 and s["unreadable"] == 8  # ids 27, 37, ..., 97: apart, not dropped


def test_end_to_end_ids_unwrap_past_2_pow_20_and_never_count_twice():
    """The stamp carries ids modulo 2**20 (9.7 hours at 30 fps): a read id is the newest one sent
    with those low bits, and one not after the last id read is refused (output is in order)."""
    from streamdiff.client.bench import SessionRecord
    from streamdiff.stamp import ID_MODULO

    record = SessionRecord(0, sent_s=[0.0] * (ID_MODULO + 10))  # ids 0 .. 2**20 + 9 sent
    assert record.unwrap(5) == ID_MODULO + 5
    assert record.unwrap(ID_MODULO - 1) == ID_MODULO - 1
    record.received.append((1.0, ID_MODULO + 5))
    assert record.unwrap(5) is None  # the same frame again
    assert record.unwrap(4) is None and record.unwrap(6) == ID_MODULO + 6
    assert record.unwrap(10) is None  # not sent yet


def test_end_to_end_session_numbers_on_a_hand_made_run():
    """One session at 10 fps in: time to first frame from the offer, fps over the window, the quiet
    end as a freeze, an id that never came back counted as dropped (only up to the newest id back),
    and a quiet end that is a slow server's cadence, not a stopped session."""
    from streamdiff.client.bench import session_report

    sent = [i / 10 for i in range(40)]
    back = [(sent[i] + 0.5, i) for i in range(36) if i != 24]  # id 24 lost; 36-39 still in flight
    record = _record(sent, back)
    record.offer_s = -0.25
    s = session_report(record, 10.0, 1000.0, 0.0, None, end_s=4.5, from_s=1.0)
    assert s["time_to_first_frame_ms"] == pytest.approx(750.0)  # from the offer, not the first frame sent
    assert s["fps"] == pytest.approx(len([t for t, _ in back if t >= 1.0]) / 3.5)
    assert s["freezes"] == 1  # the 0.5 s of quiet at the end (the lost id's 0.2 s gap is none)
    assert (s["ids_considered"], s["dropped"], s["in_flight"]) == (26, 1, 4)  # ids 10 .. 35
    assert s["dropped_share"] == pytest.approx(1 / 26)
    assert s["latency_ms"]["count"] == 25 and s["samples"]["ids"][0] == 10
    # a server that outputs a chunk every 2 s: 3.5 s of quiet at the end is its cadence
    slow = _record(sent, [(t, i) for t, i in back if i % 20 == 0])
    assert session_report(slow, 10.0, 1000.0, 0.0, None, end_s=slow.arrivals_s[-1] + 3.5)["stopped_after_s"] is None
    gone = session_report(slow, 10.0, 1000.0, 0.0, None, end_s=slow.arrivals_s[-1] + 6.5)
    assert gone["stopped_after_s"] == pytest.approx(slow.arrivals_s[-1])


def test_end_to_end_sessions_add_up_in_the_aggregate_and_the_table():
    """Sessions' fps add up (one window for all), the first frame is the slowest session's, the
    server's mean latency is weighted by its frames, and the table shows dropped frames in %."""
    from streamdiff.client.bench import TABLE_COLUMNS, aggregate_report, format_report, session_report

    sessions = []
    for k, (lost, late_s, offer_s, server) in enumerate([(10, 0.3, -0.1, (100.0, 30)), (20, 0.45, -0.6, (400.0, 10))]):
        sent = [i / 10 for i in range(30)]
        record = _record(sent, [(sent[i] + late_s, i) for i in range(30) if i != lost])
        record.index, record.offer_s = k, offer_s
        sessions.append(session_report(record, 10.0, 1000.0, 0.0,
                                        {"latency_mean_ms": server[0], "frames_out": server[1]}, 3.2, 1.0))
    agg = aggregate_report(sessions, 10.0, 1000.0)
    assert agg["fps"] == pytest.approx(sessions[0]["fps"] + sessions[1]["fps"]) and sessions[1]["fps"] > 0
    assert agg["time_to_first_frame_ms"] == pytest.approx(1050.0)  # session 2: offer 0.6 s before its first send
    assert agg["server_latency_mean_ms"] == pytest.approx((100.0 * 30 + 400.0 * 10) / 40)
    assert agg["dropped"] == 2 and agg["dropped_share"] == pytest.approx(2 / 40)
    report = {"url": "http://h:1", "sessions": sessions, "aggregate": agg, "width": 64, "height": 48,
              "fps_in": 10.0, "duration_s": 2.2, "deadline_ms": 1000.0}
    column = [key for key, _ in TABLE_COLUMNS].index("dropped_pct")
    rows = format_report(report).splitlines()[-3:]
    assert [row.split()[column] for row in rows] == ["5.00", "5.00", "5.00"]


def test_end_to_end_sender_paces_like_a_camera_and_skips_instead_of_bursting(monkeypatch):
    """Frame n leaves at start + n / fps, stamped with its id; a sender more than a period late
    restarts its schedule from now (the frames it missed are skipped, not sent in a burst)."""
    import asyncio
    import types

    from streamdiff.client import bench
    from streamdiff.pipeline.frames import synthetic_clip
    from streamdiff.stamp import decode_id

    clock = [100.0]

    async def sleep(seconds):
        clock[0] += seconds

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(bench, "asyncio", types.SimpleNamespace(sleep=sleep))
    record = bench.SessionRecord(0)
    track = bench.StampedClip(synthetic_clip(2, 64, 48), 10.0, record)

    async def send(n):
        return [await track.recv() for _ in range(n)]

    frames = asyncio.run(send(3))
    clock[0] += 0.35  # the sender stalled for more than a period
    frames += asyncio.run(send(2))
    assert record.sent_s == pytest.approx([100.0, 100.1, 100.2, 100.55, 100.65])
    assert [decode_id(f.to_ndarray(format="rgb24")) for f in frames] == [0, 1, 2, 3, 4]
    assert [f.pts for f in frames] == [round(t * bench.VIDEO_CLOCK_HZ) for t in record.sent_s]
