"""The scaling projection behind `streamdiff bench --simulate` (on a hand-made measurement)."""

from __future__ import annotations

import pytest

from streamdiff.config import load_config
from streamdiff.bench.simulate import kv_bytes_per_layer, project

MEASURED = {"streams": 1, "encode_ms": 6.0, "dit_ms": 30.0, "decode_ms": 9.0, "rows": 4, "frames_per_step": 4,
            "block_params": 1000, "bytes_per_param": 2}


@pytest.fixture
def cfg():
    return load_config("tiny", ["model.num_layers=30"])


def test_one_stage_is_the_measured_step(cfg):
    one = project(MEASURED, cfg, 1, hop_ms=5.0)
    assert one["step_ms"] == pytest.approx(45.0) and one["partition"] == [30]
    assert one["fps"] == pytest.approx(4 / 0.045)


def test_stages_balance_the_vae_ends_and_pay_hops(cfg):
    two = project(MEASURED, cfg, 2, hop_ms=0.0)
    # 1 ms per block; encode 6 on stage 0, decode 9 on stage 1 -> 17 + 6 = 23 vs 13 + 9 = 22
    assert two["partition"] == [17, 13] and two["stage_ms"] == [23.0, 22.0]
    assert two["step_ms"] == pytest.approx((23 + 22 + 23) / 2)  # 2 micro-batches
    assert project(MEASURED, cfg, 2, hop_ms=4.0)["step_ms"] == pytest.approx(two["step_ms"] + 4.0)
    # plans in flight (lane stride D = stages): one plan per slowest stage + hop
    assert project(MEASURED, cfg, 2, hop_ms=4.0)["period_ms"] == pytest.approx(23.0 + 4.0)
    assert two["fps_overlapped"] == pytest.approx(4 / 0.023) and two["plan_latency_ms"] == pytest.approx(45.0)
    four = project(MEASURED, cfg, 4, hop_ms=0.0)
    assert sum(four["partition"]) == 30 and four["fps"] > two["fps"] > project(MEASURED, cfg, 1, 0.0)["fps"]
    assert four["max_block_weights_gb_per_gpu"] == pytest.approx(max(four["partition"]) * 1000 * 2 / 1e9)


def test_kv_per_layer_counts_lanes_window_tokens(cfg):
    m = cfg.model
    tokens = (cfg.video.height // 16) * (cfg.video.width // 16)
    assert kv_bytes_per_layer(cfg, 2) == 2 * 2 * 4 * cfg.cache.window * tokens * m.num_heads * m.head_dim * 4


def test_cli_simulate_writes_the_projection(tmp_path):
    import json

    from streamdiff.cli import main

    out = tmp_path / "sim.json"
    rc = main(["bench", "--simulate", "--config", "tiny", "--set", "video.width=64", "--set", "video.height=48",
               "--set", "model.num_layers=4", "--set", "runtime.device=cpu", "--stages", "1,2,4", "--hop-ms", "2",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    m = report["measured"]
    rows = {r["stages"]: r for r in report["projection"]}
    assert sorted(rows) == [1, 2, 4] and all(sum(r["partition"]) == 4 for r in rows.values())
    assert rows[1]["step_ms"] == pytest.approx(m["encode_ms"] + m["dit_ms"] + m["decode_ms"], rel=1e-6)
    assert rows[1]["speedup"] == pytest.approx(1.0) and report["hop"] == {"hop_ms": 2.0, "source": "given"}
    assert rows[4]["step_ms"] >= 3 * 2.0  # three hops paid


def test_cli_simulate_refuses_lists_it_cannot_use():
    from streamdiff.cli import main

    assert main(["bench", "--simulate", "--streams", "1,2"]) == 2
    assert main(["bench", "--simulate", "--url", "http://127.0.0.1:9"]) == 2


def test_the_measured_step_attends_to_full_kv_windows(monkeypatch):
    """The projection is built on one measured engine step; it must be the steady step, every lane
    attending to a whole window. Two warm-up rounds left the lanes 4 and 3 of 6 full, and a DiT
    whose attention grows with the cache then read a short step (a review)."""
    import streamdiff.bench.engine as bench_engine
    from streamdiff.model.build import build_components

    filled_at_step = []

    class Core(bench_engine.EngineCore):
        def step(self, *args, **kwargs):
            lanes = [lane for s in self.executor.runner.slots.streams.values() for lane in s.lanes]
            filled = {lane.filled for lane in lanes}
            report = super().step(*args, **kwargs)
            filled_at_step.append((filled, report is None))  # a round ends with a step that has nothing to do
            return report

    monkeypatch.setattr(bench_engine, "EngineCore", Core)
    cfg = load_config("tiny", ["sampling.steps=2", "video.width=32", "video.height=32"])
    result = bench_engine.engine_fps(build_components(cfg), 2, 1)  # one measured round: the last steps
    ends = [i for i, (_, idle) in enumerate(filled_at_step) if idle]
    measured = filled_at_step[ends[-2] + 1 : ends[-1]]  # every step of it, the first included
    assert measured and all(filled == {cfg.cache.window} for filled, _ in measured), filled_at_step
    assert result["per_stream_fps"] * 2 == pytest.approx(result["aggregate_fps"])
