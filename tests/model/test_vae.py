"""StreamingVAE against diffusers' whole-clip AutoencoderKLWan on the same random weights.

Tolerance: fp32 on CPU, atol 1e-5 (encode is bit-identical in practice; decode differs by a few
1e-6 because the latents go through normalize / un-normalize and post_quant_conv runs per frame).
"""

from __future__ import annotations

import pytest
import torch

from streamdiff.config import load_config
from streamdiff.model.vae import StreamingVAE, VAEStreamState, build_vae

ATOL = 1e-5
H, W = 32, 48


@pytest.fixture(scope="module")
def svae() -> StreamingVAE:
    return StreamingVAE(build_vae(load_config("tiny").vae, seed=0), normalize_latents=True)


def _clip(n: int, seed: int, b: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, n, H, W, generator=g) * 2 - 1  # [B, 3, n, H, W]


def _normalize(sv: StreamingVAE, mu: torch.Tensor) -> torch.Tensor:
    return (mu - sv.latents_mean.view(1, -1, 1, 1, 1)) / sv.latents_std.view(1, -1, 1, 1, 1)


def _reference_encode(sv: StreamingVAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _normalize(sv, sv.vae.encode(x).latent_dist.mean)  # [B, 16, F, h, w]


def _reference_decode(sv: StreamingVAE, z_norm: torch.Tensor) -> torch.Tensor:
    z = z_norm * sv.latents_std.view(1, -1, 1, 1, 1) + sv.latents_mean.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return sv.vae.decode(z).sample  # [B, 3, n, H, W]


def _encode_in(sv: StreamingVAE, x: torch.Tensor, sizes: list[int], state: VAEStreamState | None = None):
    state = state or sv.new_state()
    outs, start = [], 0
    for n in sizes:
        outs.append(sv.encode_chunk(x[:, :, start : start + n], state))
        start += n
    assert start == x.shape[2]
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("sizes", [[1, 4, 4, 4], [5, 8], [13]])
def test_streaming_encode_matches_whole_clip(svae, sizes):
    x = _clip(13, seed=1)
    ref = _reference_encode(svae, x)
    got, state = _encode_in(svae, x, sizes)
    assert ref.shape == (1, 16, 4, H // svae.spatial_ratio, W // svae.spatial_ratio)
    assert ref.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert (state.encoded_frames, state.encoded_latents) == (13, 4)


def test_chunk_latent_counts_follow_the_temporal_ratio(svae):
    assert (svae.temporal_ratio, svae.spatial_ratio) == (4, 8)
    state = svae.new_state()
    x = _clip(9, seed=2)
    first = svae.encode_chunk(x[:, :, :1], state)
    later = svae.encode_chunk(x[:, :, 1:9], state)
    assert (first.shape[2], later.shape[2]) == (svae.latent_frames_for(1, True), svae.latent_frames_for(8, False))
    assert (first.shape[2], later.shape[2]) == (1, 2)
    torch.testing.assert_close(torch.cat([first, later], 2), _reference_encode(svae, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [2, 2], [4]])
def test_streaming_decode_matches_whole_clip(svae, sizes):
    z = _reference_encode(svae, _clip(13, seed=3))  # [1, 16, 4, 4, 6] normalized
    ref = _reference_decode(svae, z)
    state = svae.new_state()
    outs, start = [], 0
    for m in sizes:
        outs.append(svae.decode_chunk(z[:, :, start : start + m], state))
        start += m
    assert [o.shape[2] for o in outs][0] == 1 + 4 * (sizes[0] - 1)  # first latent -> 1 frame
    got = torch.cat(outs, dim=2)
    assert ref.shape == (1, 3, 13, H, W)
    assert ref.std() > 0.05 and (ref.abs() < 1).float().mean() > 0.9  # not a saturated, clamped picture
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert (state.decoded_latents, state.decoded_frames) == (4, 13)
    assert got.abs().max() <= 1.0


def test_batch_of_streams_in_one_state_matches_each_alone(svae):
    x = torch.cat([_clip(9, seed=4), _clip(9, seed=5)], dim=0)  # [2, 3, 9, H, W]
    both, state = _encode_in(svae, x, [1, 4, 4])
    for i in range(2):
        alone, _ = _encode_in(svae, x[i : i + 1], [1, 4, 4])
        torch.testing.assert_close(both[i : i + 1], alone, atol=ATOL, rtol=0)
    dec_state = svae.new_state()
    frames = torch.cat([svae.decode_chunk(both[:, :, i : i + 1], dec_state) for i in range(3)], dim=2)
    torch.testing.assert_close(frames, _reference_decode(svae, both), atol=ATOL, rtol=0)


def test_interleaved_streams_do_not_share_caches(svae):
    xa, xb = _clip(13, seed=6), _clip(13, seed=7)
    sa, sb = svae.new_state(), svae.new_state()
    lat_a, lat_b, pix_a, pix_b = [], [], [], []
    # 1. Encode and decode both streams chunk by chunk, alternating between them.
    for lo, hi in ((0, 1), (1, 5), (5, 9), (9, 13)):
        lat_a.append(svae.encode_chunk(xa[:, :, lo:hi], sa))
        lat_b.append(svae.encode_chunk(xb[:, :, lo:hi], sb))
        pix_a.append(svae.decode_chunk(lat_a[-1], sa))
        pix_b.append(svae.decode_chunk(lat_b[-1], sb))
    # 2. Each equals its stream run alone through the whole-clip reference.
    za, zb = torch.cat(lat_a, 2), torch.cat(lat_b, 2)
    torch.testing.assert_close(za, _reference_encode(svae, xa), atol=ATOL, rtol=0)
    torch.testing.assert_close(zb, _reference_encode(svae, xb), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(pix_a, 2), _reference_decode(svae, za), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(pix_b, 2), _reference_decode(svae, zb), atol=ATOL, rtol=0)
    assert (za - zb).abs().max() > 0.01  # the streams really differ


def test_reset_starts_a_new_stream_and_releases_the_cache(svae):
    x = _clip(5, seed=8)
    state = svae.new_state()
    assert state.cache_bytes() == 0
    first, _ = _encode_in(svae, x, [1, 4], state)
    svae.decode_chunk(first, state)
    assert state.cache_bytes() > 0
    state.reset()
    assert state.cache_bytes() == 0 and state.encoded_frames == 0 and state.decoded_latents == 0
    assert all(c is None for c in state.enc_cache + state.dec_cache)
    again, _ = _encode_in(svae, x, [1, 4], state)  # a first call is allowed again and gives the same latents
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    decoding = svae.new_state()  # the decoder's caches count too (the memory plan, the engine's stats)
    svae.decode_chunk(first, decoding)
    assert decoding.cache_bytes() == sum(t.nbytes for t in decoding.dec_cache if isinstance(t, torch.Tensor)) > 0


def test_reset_forgets_the_device_so_a_state_refused_on_another_device_is_accepted_again(svae):
    """A state used on another device is refused with "reset() the state"; reset() must forget
    the device its caches were on, or that state would be refused forever after the VAE moved."""
    state = svae.new_state()
    svae.encode_chunk(_clip(1, seed=11), state)
    state.device = torch.device("meta")  # as if its caches were made on another device
    state.reset()
    assert state.device is None
    svae.encode_chunk(_clip(1, seed=11), state)  # a first chunk again, accepted


def test_other_float_dtypes_are_cast_to_the_module_dtype(svae):
    x = _clip(5, seed=9)
    z32, _ = _encode_in(svae, x, [5])
    z64, _ = _encode_in(svae, x.double(), [5])
    assert z64.dtype == torch.float32
    torch.testing.assert_close(z64, z32, atol=ATOL, rtol=0)


def test_bad_inputs_raise_and_leave_the_state_intact(svae):
    x = _clip(9, seed=10)
    state = svae.new_state()
    with pytest.raises(ValueError, match="first encode_chunk call .* 1 \\+ 4k frames.*got 4"):
        svae.encode_chunk(x[:, :, :4], state)
    svae.encode_chunk(x[:, :, :1], state)
    with pytest.raises(ValueError, match="multiple of 4 frames.*got 5"):
        svae.encode_chunk(x[:, :, 1:6], state)
    with pytest.raises(ValueError, match="multiple of 4 frames.*got 0"):
        svae.encode_chunk(x[:, :, 1:1], state)
    with pytest.raises(ValueError, match="multiples of 8.*H=36"):
        svae.encode_chunk(torch.zeros(1, 3, 4, 36, W), state)
    with pytest.raises(ValueError, match="differ from this stream's earlier calls"):
        svae.encode_chunk(torch.zeros(1, 3, 4, 40, W), state)  # another frame size mid-stream
    with pytest.raises(ValueError, match="differ from this stream's earlier calls"):
        svae.encode_chunk(torch.zeros(2, 3, 4, H, W), state)  # another batch size mid-stream
    with pytest.raises(ValueError, match="floating-point"):
        svae.encode_chunk(torch.zeros(1, 3, 4, H, W, dtype=torch.uint8), state)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        svae.encode_chunk(torch.zeros(1, 4, 4, H, W), state)
    with pytest.raises(ValueError, match="5-D"):
        svae.encode_chunk(torch.zeros(3, 4, H, W), state)
    with pytest.raises(ValueError, match="VAEStreamState"):
        svae.encode_chunk(x[:, :, 1:5], object())
    with pytest.raises(ValueError, match="z_dim=16 channels"):
        svae.decode_chunk(torch.zeros(1, 8, 1, 4, 6), state)
    with pytest.raises(ValueError, match="at least 1 latent frame"):
        svae.decode_chunk(torch.zeros(1, 16, 0, 4, 6), state)
    svae.decode_chunk(torch.zeros(1, 16, 1, 4, 6), state)
    with pytest.raises(ValueError, match="latents .* differ from this stream's earlier calls"):
        svae.decode_chunk(torch.zeros(2, 16, 1, 4, 6), state)  # another batch size mid-stream
    # The refused calls changed nothing: finishing the stream still matches the reference.
    rest = svae.encode_chunk(x[:, :, 1:9], state)
    ref = _reference_encode(svae, x)
    torch.testing.assert_close(rest, ref[:, :, 1:], atol=ATOL, rtol=0)


def test_build_vae_seed_is_repeatable_and_leaves_global_rng_alone():
    cfg = load_config("tiny").vae
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_vae(cfg, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_vae(cfg, seed=7)
    c = build_vae(cfg, seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    assert a.config.base_dim == cfg.base_dim and a.config.num_res_blocks == cfg.num_res_blocks


def test_default_latent_scaling_is_the_references_raw_encode_and_unnormalizing_decode(svae):
    """vae.normalize_latents=false (StreamDiffusionV2's default): encode gives the raw posterior
    mean, decode still applies z * std + mean; true normalizes both ways."""
    raw = StreamingVAE(svae.vae, normalize_latents=False)
    assert (svae.latents_std != 1).any()  # the real Wan statistics, so the two modes differ
    x = _clip(5, seed=4)
    got = raw.encode_chunk(x, raw.new_state())
    with torch.no_grad():
        mu = svae.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(got, mu, atol=ATOL, rtol=0)
    normalized = svae.encode_chunk(x, svae.new_state())
    torch.testing.assert_close(normalized, _normalize(svae, mu), atol=ATOL, rtol=0)
    # decode is the same in both modes: it un-normalizes what it is given
    torch.testing.assert_close(raw.decode_chunk(normalized, raw.new_state()),
                               svae.decode_chunk(normalized, svae.new_state()), atol=ATOL, rtol=0)


def test_a_bf16_build_prints_no_diffusers_warning_about_float32_modules(caplog):
    """The Wan VAE names no module to keep in float32, yet diffusers warned on every cast
    ("... should be kept in float32: []"), in every GPU build's output."""
    import logging

    from streamdiff.model.build import build_components

    with caplog.at_level(logging.WARNING):
        comps = build_components(load_config("tiny", ["runtime.device=cpu", "model.dtype=bfloat16"]))
    assert next(comps.vae.vae.parameters()).dtype == torch.bfloat16
    assert not [r for r in caplog.records if "float32" in r.getMessage()]
