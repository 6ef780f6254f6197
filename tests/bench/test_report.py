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
