"""Batched streaming-VAE calls over several streams equal one call per stream."""

from __future__ import annotations

import torch

from streamdiff.engine.vae_batch import decode_many, encode_many
from streamdiff.pipeline.frames import frames_to_tensor, synthetic_clip


def test_grouped_calls_equal_per_stream_calls(comps, monkeypatch):
    vae = comps.vae
    clips = [frames_to_tensor(synthetic_clip(13, 64, 48, seed=s)) for s in range(3)]  # [1, 3, 13, H, W]
    alone = [vae.new_state() for _ in clips]
    batched = [vae.new_state() for _ in clips]
    calls = {"encode": 0, "decode": 0}
    real_encode, real_decode = vae.encode_chunk, vae.decode_chunk

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    # 1. Streams 0 and 1 start together, stream 2 one chunk later: the first round has one group
    #    of two first chunks; the second a group of two steady chunks and stream 2's first alone.
    rounds = [[(0, 0, 5), (1, 0, 5)], [(0, 5, 9), (1, 5, 9), (2, 0, 5)], [(0, 9, 13), (1, 9, 13), (2, 5, 9)]]
    expected_calls = [1, 2, 1]
    for chunks, want in zip(rounds, expected_calls):
        want_lat = [real_encode(clips[i][:, :, a:b], alone[i]) for i, a, b in chunks]
        monkeypatch.setattr(vae, "encode_chunk", count("encode", real_encode))
        calls["encode"] = 0
        got_lat = encode_many(vae, [(clips[i][:, :, a:b], batched[i]) for i, a, b in chunks])
        monkeypatch.setattr(vae, "encode_chunk", real_encode)
        assert calls["encode"] == want
        for w, g in zip(want_lat, got_lat):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        # 2. Decode what was encoded, the same way.
        want_px = [real_decode(lat, alone[i]) for (i, _, _), lat in zip(chunks, want_lat)]
        monkeypatch.setattr(vae, "decode_chunk", count("decode", real_decode))
        calls["decode"] = 0
        got_px = decode_many(vae, [(lat, batched[i]) for (i, _, _), lat in zip(chunks, want_lat)])
        monkeypatch.setattr(vae, "decode_chunk", real_decode)
        assert calls["decode"] == want
        for w, g in zip(want_px, got_px):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # 3. The split states carry on exactly like the per-stream ones (counters and cache sizes).
    for a, b in zip(alone, batched):
        assert (a.encoded_frames, a.encoded_latents, a.decoded_latents, a.decoded_frames) == (
            b.encoded_frames, b.encoded_latents, b.decoded_latents, b.decoded_frames)
        assert a.cache_bytes() == b.cache_bytes()
