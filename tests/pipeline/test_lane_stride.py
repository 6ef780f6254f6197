"""Lane stride D (a stream's lane j holds the chunk that entered j*D forwards earlier): the same
frames as stride 1 — each KV lane still sees its chunks in order and each chunk keeps the noise,
prompt and seed it entered with — emitted (steps - 1)(D - 1) chunks later."""

from __future__ import annotations

import numpy as np
import pytest

from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline

CHUNKS = 14


@pytest.fixture(scope="module")
def comps():
    from streamdiff.config import load_config
    from streamdiff.model.build import build_components

    return build_components(load_config("tiny", ["video.width=64", "video.height=48", "runtime.device=cpu"]))


def stream(comps, clip, steps, stride):
    """Push chunk by chunk with a prompt change before chunk 5 and a seed change before chunk 9;
    returns (frames out after each push, everything incl. the flush)."""
    pipe = StreamPipeline(comps, "a red fox", steps=steps, stride=stride)
    counts, outs = [], []
    for c in range(CHUNKS):
        if c == 5:
            pipe.set_prompt("a blue whale")
        if c == 9:
            pipe.state.seed = 1234
        chunk = clip[:5] if c == 0 else clip[5 + 4 * (c - 1) : 9 + 4 * (c - 1)]
        outs.append(pipe.push(chunk))
        counts.append(sum(len(o) for o in outs))
    outs.append(pipe.flush())
    return counts, np.concatenate(outs)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_stride_d_equals_stride_one_later(comps, steps):
    clip = synthetic_clip(5 + 4 * (CHUNKS - 1), 64, 48, seed=11)
    counts1, frames1 = stream(comps, clip, steps, 1)
    for stride in (3,):
        counts, frames = stream(comps, clip, steps, stride)
        assert frames.shape == frames1.shape == clip.shape
        assert np.abs(frames.astype(int) - frames1.astype(int)).max() <= 1
        lag = (steps - 1) * (stride - 1)
        # frames out after c chunks with stride D == frames out after c - lag chunks with stride 1
        assert counts[lag:] == counts1[: CHUNKS - lag]
        assert counts[:lag] == [counts1[0]] * lag  # only the prepared first chunk meanwhile


def test_chunks_keep_the_prompt_they_entered_with(comps):
    """A prompt change reaches new chunks only: the chunk already in lane 1 finishes with the
    prompt it entered with, so its frames do not depend on the change."""
    clip = synthetic_clip(5 + 4 * 6, 64, 48, seed=12)
    a = StreamPipeline(comps, "a red fox", steps=2)
    b = StreamPipeline(comps, "a red fox", steps=2)
    a.push(clip[:25])
    b.push(clip[:25])
    b.set_prompt("a blue whale")
    out_a, out_b = a.push(clip[25:29]), b.push(clip[25:29])
    # the 4 frames out now are the previous chunk's (entered before the change): identical
    assert len(out_a) == 4 and np.array_equal(out_a, out_b)
    assert not np.array_equal(a.flush(), b.flush())  # the new chunk did change


def test_lag_chunks_counts_the_stride(comps):
    """A chunk leaves (steps - 1)·D chunks after it entered (stride 1: steps - 1; no stream batch: 0)."""
    lags = [StreamPipeline(comps, "x", steps=s, stride=d).lag_chunks for s, d in ((1, 3), (2, 1), (2, 3), (4, 2))]
    assert lags == [0, 1, 3, 6]
    assert StreamPipeline(comps, "x", steps=4, stride=2, stream_batch=False).lag_chunks == 0
