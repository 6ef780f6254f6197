"""The engine's warm-up builds every graph a compiled DiT meets while serving: a batch shape
first met while streams ran was compiled then, and every stream stalled for it (a probe: 11-31 s
on the tiny preset when a second stream joined, a new rows bucket each time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff.config import load_config
from streamdiff.engine import EngineCore, LocalExecutor, StreamParams
from streamdiff.engine.model_runner import ModelRunner
from streamdiff.model.build import build_components
from streamdiff.scheduler import StreamSLO

RELAXED = StreamSLO(1e-3, 1e12)
# Two streams of up to 4 lanes in a pool of 4: steady forwards of 1-4 rows (buckets 1 and 4),
# first chunks of 1 or 2 streams joining together (buckets 1 and 4): four graphs in all.
CFG = ["video.width=32", "video.height=32", "runtime.device=cpu", "runtime.compile=true",
       "runtime.row_buckets=[1, 4]", "cache.max_streams=2", "cache.pool_lanes=4"]


@pytest.mark.timeout(900)  # inductor's first compile on a cold cache (tests/model/test_dit_step.py)
@torch.no_grad()
def test_streams_joining_leaving_and_changing_steps_meet_only_graphs_the_warm_up_built(dynamo):
    cfg = load_config("tiny", CFG)
    core = EngineCore(cfg, LocalExecutor(ModelRunner(build_components(cfg))))
    core.warmup()
    built = dynamo["stats"]["unique_graphs"]
    assert built == 4, built
    frame = np.zeros((32, 32, 3), np.uint8)

    streams: list[str] = []
    fed: set[str] = set()

    def add(sid: str, steps: int) -> None:
        assert core.add_stream(sid, StreamParams.defaults(cfg, sid).with_changes({"steps": steps}), RELAXED)
        streams.append(sid)

    def run(chunks: int) -> None:
        for _ in range(chunks):
            for sid in streams:
                for _ in range(4 if sid in fed else 5):
                    core.push_frame(sid, frame)
                fed.add(sid)
            while core.step() is not None:
                pass

    add("a", 2)
    run(3)
    add("b", 2)
    run(3)  # 4 rows
    core.update_params("b", steps=1)
    run(3)  # 3 rows
    for sid in streams:
        core.remove_stream(sid)
    streams.clear()
    add("c", 1), add("d", 1)  # two first chunks in one forward
    run(3)
    assert sum(dynamo["graph_break"].values()) == 0, dict(dynamo["graph_break"])
    assert dynamo["stats"]["unique_graphs"] == built
