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


def _serve_streams(cfg) -> dict[str, list[np.ndarray]]:
    """Warm up, then streams of 2, 1 and 4 steps joining and leaving: every captured graph
    replayed between others (buckets 1 and 4, first chunks and later ones)."""
    from streamdiff.pipeline.frames import synthetic_clip

    core = EngineCore(cfg, LocalExecutor(ModelRunner(build_components(cfg))))
    core.warmup()
    clips = {sid: synthetic_clip(5 + 4 * 8, 32, 32, seed=i) for i, sid in enumerate("abc")}
    steps = {"a": 2, "b": 1, "c": 4}
    pos = dict.fromkeys(clips, 0)
    out: dict[str, list[np.ndarray]] = {sid: [] for sid in clips}
    for round_ in range(9):
        if round_ in (0, 2, 4):  # a joins, then b, then c in a's place
            sid = "abc"[round_ // 2]
            if sid == "c":
                core.remove_stream("a")
            assert core.add_stream(sid, StreamParams.defaults(cfg, sid).with_changes({"steps": steps[sid]}), RELAXED)
        for sid in [s for s in "abc" if s in core.stream_ids]:
            n = 5 if pos[sid] == 0 else 4
            for frame in clips[sid][pos[sid]:pos[sid] + n]:
                core.push_frame(sid, frame)
            pos[sid] += n
        while (report := core.step()) is not None:
            for sid in report.plan.stream_ids:
                out[sid] += [o.frame for o in core.pop_outputs(sid)]
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(900)
@torch.no_grad()
def test_graphs_captured_at_warm_up_share_one_memory_pool_and_give_eagers_frames(monkeypatch):
    """runtime.cuda_graphs: the warm-up captures every bucket's graph into one memory pool (a pool
    each kept every graph's intermediates); replays between other graphs must still give eager's
    frames (fp32: padded rows pick other kernels, so within a few grey levels, not equal). cuDNN's
    TF32 off: the patch embedding's Conv3d may pick another algorithm for a padded batch, and TF32's
    10-bit products could flip a sink refresh (a yes/no decision) one way in eager, the other in a graph."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    base = ["video.width=32", "video.height=32", "runtime.device=cuda", "model.dtype=float32",
            "model.attention_backend=torch", "runtime.row_buckets=[1, 4]", "cache.max_streams=2", "cache.pool_lanes=8"]
    eager = _serve_streams(load_config("tiny", base))
    graphs = _serve_streams(load_config("tiny", base + ["runtime.cuda_graphs=true"]))
    for sid in eager:
        assert len(graphs[sid]) == len(eager[sid]) > 0, sid
        diff = np.abs(np.stack(graphs[sid]).astype(int) - np.stack(eager[sid]).astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 8, (sid, diff.mean(), diff.max())
