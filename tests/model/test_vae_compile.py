"""runtime.compile_vae: the VAE's streaming encoder and decoder calls through
torch.compile(fullgraph=True) give eager's frames, with no graph break and nothing compiled once
a stream is steady; grouped calls of several streams (engine/vae_batch.py) stay within Dynamo's
raised recompile limit. Tolerance: 1 grey level on frames, 1e-4 on latents (inductor fuses and
reorders fp32 arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff.config import load_config
from streamdiff.engine.vae_batch import decode_many, encode_many
from streamdiff.model.build import build_components, build_streaming_vae
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline

SIZE = ["video.width=32", "video.height=32", "runtime.device=cpu"]


def push_all(pipe, clip, pushes):
    outs = [pipe.push(clip[:5])]
    for i in range(pushes):
        outs.append(pipe.push(clip[5 + 4 * i : 9 + 4 * i]))
    return outs


def counts(dynamo) -> tuple[int, int]:
    return sum(dynamo["graph_break"].values()), dynamo["stats"]["unique_graphs"]


# A cold inductor compile of the VAE's first-call and steady graphs takes minutes on a 2-CPU
# machine (the DiT's compile test took 5.4 min once, cold, with the other core busy).
@pytest.mark.timeout(900)
@torch.no_grad()
def test_compiled_wan_vae_equals_eager_without_breaks_or_steady_recompiles(dynamo):
    clip = synthetic_clip(5 + 4 * 8, 32, 32, seed=3)
    eager = push_all(StreamPipeline(build_components(load_config("tiny", SIZE)), "a fox"), clip, 8)
    comps = build_components(load_config("tiny", SIZE + ["runtime.compile_vae=true"]))
    assert comps.step.mode == "eager"  # the DiT as configured; only the VAE calls are compiled
    pipe = StreamPipeline(comps, "a fox")
    got = push_all(pipe, clip, 5)  # a stream's first calls: one graph per cache state
    breaks, warm = counts(dynamo)
    got += [pipe.push(clip[5 + 4 * i : 9 + 4 * i]) for i in range(5, 8)]  # steady: nothing new is compiled
    assert breaks == 0 and counts(dynamo) == (0, warm), dict(dynamo["graph_break"])
    assert warm >= 2  # the encoder and the decoder each became a graph
    assert [a.shape for a in eager] == [b.shape for b in got] and sum(map(len, got)) > 0
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(eager, got) if len(a)) <= 1


@pytest.mark.timeout(900)
@torch.no_grad()
def test_compiled_taehv_groups_of_streams_equal_eager_and_stay_under_the_limit(dynamo):
    """The demo's TAEHV, compiled, through the grouped calls: one stream, then two, then three
    streams at the same point share one call each (batch 1, 2, 3); every stream's latents and
    frames are those of its own eager calls."""
    cfg = load_config("demo", ["runtime.device=cpu"])
    eager = build_streaming_vae(cfg, torch.device("cpu"), torch.float32)
    comp = build_streaming_vae(load_config("demo", ["runtime.device=cpu", "runtime.compile_vae=true"]),
                               torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    for streams in (1, 2, 3):
        clips = [torch.rand(1, 3, 13, 32, 32, generator=gen) * 2 - 1 for _ in range(streams)]
        ref_states = [eager.new_state() for _ in range(streams)]
        states = [comp.new_state() for _ in range(streams)]
        for lo, hi in ((0, 1), (1, 5), (5, 9), (9, 13)):  # the first call, then 4 frames a call
            chunk = [c[:, :, lo:hi] for c in clips]
            want = [eager.encode_chunk(x, s) for x, s in zip(chunk, ref_states)]
            got = encode_many(comp, list(zip(chunk, states)))
            for w, g in zip(want, got):
                assert torch.allclose(w, g, atol=1e-4), (streams, lo, (w - g).abs().max())
            frames_want = [eager.decode_chunk(z, s) for z, s in zip(want, ref_states)]
            frames_got = decode_many(comp, list(zip(got, states)))
            for w, g in zip(frames_want, frames_got):
                assert (w - g).abs().max() <= 2 / 255, (streams, lo, (w - g).abs().max())
    breaks, graphs = counts(dynamo)
    assert breaks == 0, dict(dynamo["graph_break"])
    assert 0 < graphs <= 2 * 32  # both calls stayed compiled: none reached the limit (it would raise)


@pytest.mark.timeout(900)
@torch.no_grad()
def test_after_the_engine_warm_up_a_compiled_vae_compiles_nothing_for_streams(dynamo):
    """The warm-up runs the dummy stream until its VAE calls are steady: the streams that come
    after (two at once, each with its own calls) meet only graphs it compiled."""
    from streamdiff.engine.core import EngineCore
    from streamdiff.engine.executor import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner
    from streamdiff.engine.types import StreamParams

    comps = build_components(load_config("tiny", SIZE + ["runtime.compile_vae=true"]))
    core = EngineCore(comps.cfg, LocalExecutor(ModelRunner(comps)))
    core.warmup()
    warm = counts(dynamo)
    assert warm[0] == 0 and warm[1] >= 2
    clip = synthetic_clip(5 + 4 * 6, 32, 32, seed=5)
    for sid in ("a", "b"):
        assert core.add_stream(sid, StreamParams.defaults(comps.cfg, "a fox"))
    sent = 0
    for n in [5] + [4] * 6:
        for sid in ("a", "b"):
            for frame in clip[sent : sent + n]:
                core.push_frame(sid, frame)
        sent += n
        while core.step() is not None:
            pass
    assert all(len(core.pop_outputs(sid)) > 0 for sid in ("a", "b"))
    assert counts(dynamo) == warm


def test_a_compiled_vae_serves_each_stream_with_its_own_calls():
    """Grouped calls of a new size would compile new graphs while serving (tens of seconds on a
    CPU, stalling every stream); with runtime.compile_vae the runner calls the VAE per stream,
    so only a stream's first-call and steady graphs exist, compiled during the warm-up."""
    from streamdiff.engine.model_runner import ModelRunner

    assert ModelRunner(build_components(load_config("tiny", SIZE))).batch_vae
    assert not ModelRunner(build_components(load_config("tiny", SIZE + ["runtime.compile_vae=true"]))).batch_vae
