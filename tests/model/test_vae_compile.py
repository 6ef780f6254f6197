"""runtime.compile_vae: the VAE's streaming encoder and decoder calls through
torch.compile(fullgraph=True) give eager's frames, with no graph break and nothing compiled once
a stream is steady, and a server compiles them all during its warm-up. Tolerance: 1 grey level
on frames, 1e-4 on latents (inductor fuses and reorders fp32 arithmetic).

The demo's TAEHV goes through inductor, as a server compiles it. The tiny Wan VAE's tests are of
Dynamo's part (its graphs, breaks and recompiles, the traced calls' results) and trace with the
"aot_eager" backend: inductor's C++ compile of the Wan VAE's 113 CPU kernels took 80-110 s of a
cold suite, for a lowering that `streamdiff gpu-check`'s compiled-VAE part runs on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamdiff.config import load_config
from streamdiff.model.build import build_components, build_streaming_vae
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline

SIZE = ["video.width=32", "video.height=32", "runtime.device=cpu"]


@pytest.fixture
def traced(dynamo, monkeypatch):
    """`dynamo`, with the VAE's calls traced by aot_eager instead of compiled by inductor."""
    import streamdiff.model.vae as vae

    monkeypatch.setattr(vae, "VAE_COMPILE_BACKEND", "aot_eager")
    return dynamo


def push_all(pipe, clip, pushes):
    outs = [pipe.push(clip[:5])]
    for i in range(pushes):
        outs.append(pipe.push(clip[5 + 4 * i : 9 + 4 * i]))
    return outs


def counts(dynamo) -> tuple[int, int]:
    return sum(dynamo["graph_break"].values()), dynamo["stats"]["unique_graphs"]


@torch.no_grad()
def test_compiled_wan_vae_equals_eager_without_breaks_or_steady_recompiles(traced):
    clip = synthetic_clip(5 + 4 * 8, 32, 32, seed=3)
    eager = push_all(StreamPipeline(build_components(load_config("tiny", SIZE)), "a fox"), clip, 8)
    comps = build_components(load_config("tiny", SIZE + ["runtime.compile_vae=true"]))
    assert comps.step.mode == "eager"  # the DiT as configured; only the VAE calls are compiled
    pipe = StreamPipeline(comps, "a fox")
    got = push_all(pipe, clip, 5)  # a stream's first calls: one graph per cache state
    breaks, warm = counts(traced)
    got += [pipe.push(clip[5 + 4 * i : 9 + 4 * i]) for i in range(5, 8)]  # steady: nothing new is compiled
    assert breaks == 0 and counts(traced) == (0, warm), dict(traced["graph_break"])
    assert warm >= 2  # the encoder and the decoder each became a graph
    assert [a.shape for a in eager] == [b.shape for b in got] and sum(map(len, got)) > 0
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(eager, got) if len(a)) <= 1


@pytest.mark.timeout(900)
@torch.no_grad()
def test_compiled_taehv_equals_eager_without_breaks_or_steady_recompiles(dynamo):
    """The demo's TAEHV, compiled (its CPU `UpsampledConv` cached kernels by `data_ptr`, which
    Dynamo cannot trace: a graph break before): a stream's latents and frames are its eager
    calls', and once its memory is full nothing new is compiled."""
    cfg = load_config("demo", ["runtime.device=cpu"])
    eager = build_streaming_vae(cfg, torch.device("cpu"), torch.float32)
    comp = build_streaming_vae(load_config("demo", ["runtime.device=cpu", "runtime.compile_vae=true"]),
                               torch.device("cpu"), torch.float32)
    clip = torch.rand(1, 3, 17, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_state, state = eager.new_state(), comp.new_state()
    for lo, hi in ((0, 1), (1, 5), (5, 9), (9, 13), (13, 17)):  # the first call, then 4 frames a call
        if lo == 9:
            warm = counts(dynamo)
        want, got = eager.encode_chunk(clip[:, :, lo:hi], ref_state), comp.encode_chunk(clip[:, :, lo:hi], state)
        assert torch.allclose(want, got, atol=1e-4), (lo, (want - got).abs().max())
        frames_want, frames_got = eager.decode_chunk(want, ref_state), comp.decode_chunk(got, state)
        assert (frames_want - frames_got).abs().max() <= 2 / 255, (lo, (frames_want - frames_got).abs().max())
    assert warm[0] == 0 and warm[1] >= 2 and counts(dynamo) == warm, dict(dynamo["graph_break"])


@torch.no_grad()
def test_after_the_engine_warm_up_a_compiled_vae_compiles_nothing_for_streams(traced):
    """The warm-up runs the dummy stream until its VAE calls are steady: the streams that come
    after (two at once, each with its own calls) meet only graphs it compiled."""
    from streamdiff.engine.core import EngineCore
    from streamdiff.engine.executor import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner
    from streamdiff.engine.types import StreamParams
    from streamdiff.scheduler import StreamSLO

    comps = build_components(load_config("tiny", SIZE + ["runtime.compile_vae=true"]))
    core = EngineCore(comps.cfg, LocalExecutor(ModelRunner(comps)))
    core.warmup()
    warm = counts(traced)
    assert warm[0] == 0 and warm[1] >= 2
    clip = synthetic_clip(5 + 4 * 6, 32, 32, seed=5)
    for sid in ("a", "b"):  # admitted whatever the warm-up measured (a loaded machine: its SLO refused "b")
        assert core.add_stream(sid, StreamParams.defaults(comps.cfg, "a fox"), StreamSLO(1e-3, 1e12))
    sent = 0
    for n in [5] + [4] * 6:
        for sid in ("a", "b"):
            for frame in clip[sent : sent + n]:
                core.push_frame(sid, frame)
        sent += n
        while core.step() is not None:
            pass
    assert all(len(core.pop_outputs(sid)) > 0 for sid in ("a", "b"))
    assert counts(traced) == warm


def test_a_compiled_vae_serves_each_stream_with_its_own_calls():
    """Grouped calls of a new size would compile new graphs while serving (tens of seconds on a
    CPU, stalling every stream); with runtime.compile_vae the runner calls the VAE per stream,
    so only a stream's first-call and steady graphs exist, compiled during the warm-up."""
    from streamdiff.engine.model_runner import ModelRunner

    assert ModelRunner(build_components(load_config("tiny", SIZE))).batch_vae
    assert not ModelRunner(build_components(load_config("tiny", SIZE + ["runtime.compile_vae=true"]))).batch_vae
