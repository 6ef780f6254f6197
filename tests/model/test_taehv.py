"""TAEHV: streaming equals one whole-clip pass; the public file layout loads; wrong files are refused.

The oracle runs the network the way the public description does, over the whole clip at once in
[T, C, H, W] layout: a MemBlock's memory is its input shifted by one step (zeros first), TPool
reshapes `stride` steps into channels, TGrow reshapes channels into steps; the clip is front-
padded with 3 copies of frame 0 and the decoder's first 3 frames are dropped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from streamdiff.config import VAEConfig, load_config
from streamdiff.engine.vae_batch import decode_many, encode_many
from streamdiff.model.loading import WeightsMismatchError, load_taehv
from streamdiff.model.taehv import TAEHV, Clamp, MemBlock, StreamingTAEHV, TGrow, TPool
from streamdiff.model.vae import build_vae

NARROW = VAEConfig(kind="taehv", taehv_encoder_widths=(8, 8, 16), taehv_decoder_widths=(16, 8, 8, 8))
H, W = 32, 48


def _seeded(cfg: VAEConfig, seed: int = 0) -> TAEHV:
    torch.manual_seed(seed)
    net = TAEHV.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so every layer moves the output
        for p in net.parameters():
            p.mul_(1.5)
        last = net.decoder[-1]  # outputs around mid-grey, so the final clamp keeps the signal
        last.weight.mul_(0.02 / last.weight.abs().mean())
        last.bias.fill_(0.5)
    return net


def _reference(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """x [T, C, H, W] through `seq` over the whole clip (one stream)."""
    for layer in seq:
        if isinstance(layer, MemBlock):
            x = layer(x, torch.cat([torch.zeros_like(x[:1]), x[:-1]]))
        elif isinstance(layer, TPool):
            t, c, h, w = x.shape
            x = layer.conv(x.reshape(-1, layer.stride * c, h, w))
        elif isinstance(layer, TGrow):
            t, c, h, w = x.shape
            x = layer.conv(x).reshape(-1, c, h, w)
        else:
            x = layer(x)
    return x


@torch.no_grad()
def _ref_encode(net: TAEHV, frames: torch.Tensor) -> torch.Tensor:
    x = (frames[0].transpose(0, 1) + 1) / 2  # [n, 3, H, W]
    x = torch.cat([x[:1]] * 3 + [x])
    return _reference(net.encoder, x).transpose(0, 1)[None]  # [1, 16, F, h, w]


@torch.no_grad()
def _ref_decode(net: TAEHV, latents: torch.Tensor) -> torch.Tensor:
    y = _reference(net.decoder, latents[0].transpose(0, 1))[3:]  # [n, 3, H, W]
    return (y.clamp(0, 1) * 2 - 1).transpose(0, 1)[None]


def _clip(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, n, H, W, generator=g) * 2 - 1


@pytest.mark.parametrize("sizes", [[1, 4, 4, 4], [5, 8], [13]])
def test_streaming_encode_and_decode_equal_the_whole_clip(sizes):
    net = _seeded(NARROW)
    sv = StreamingTAEHV(net.channels_last_())
    x = _clip(13, seed=1)
    state = sv.new_state()
    got, start = [], 0
    for n in sizes:
        got.append(sv.encode_chunk(x[:, :, start : start + n], state))
        start += n
    got = torch.cat(got, dim=2)
    ref = _ref_encode(net, x)
    assert ref.shape == (1, 16, 4, H // 8, W // 8) and ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (state.encoded_frames, state.encoded_latents) == (13, 4)  # as StreamingVAE counts them
    # decode latent by latent (and two at once) = the whole clip, frame counts 1 then 4 per latent
    state = sv.new_state()
    parts = [sv.decode_chunk(ref[:, :, :1], state), sv.decode_chunk(ref[:, :, 1:3], state),
             sv.decode_chunk(ref[:, :, 3:], state)]
    assert [p.shape[2] for p in parts] == [1, 8, 4]
    assert (state.decoded_latents, state.decoded_frames) == (4, 13)
    expected = _ref_decode(net, ref)
    assert expected.shape == x.shape and expected.std() > 0.02 and expected.abs().max() < 1
    torch.testing.assert_close(torch.cat(parts, dim=2), expected, atol=1e-5, rtol=0)


def test_two_streams_batched_equal_separate_calls():
    sv = StreamingTAEHV(_seeded(NARROW).channels_last_())
    clips = [_clip(9, seed=s) for s in (2, 3)]
    sep = [sv.encode_chunk(c, sv.new_state()) for c in clips]
    states = [sv.new_state(), sv.new_state()]
    together = encode_many(sv, [(c[:, :, :5], s) for c, s in zip(clips, states)])
    together = [torch.cat([a, b], 2) for a, b in zip(together, encode_many(sv, [(c[:, :, 5:], s) for c, s in zip(clips, states)]))]
    for a, b in zip(sep, together):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    dec_states = [sv.new_state(), sv.new_state()]
    frames = decode_many(sv, [(z, s) for z, s in zip(sep, dec_states)])
    for z, f in zip(sep, frames):
        torch.testing.assert_close(f, sv.decode_chunk(z, sv.new_state()), atol=1e-5, rtol=0)


def test_latent_scale_is_what_the_dit_gets_and_decoding_takes_it_off():
    """`vae.latent_scale` (diffusers' scaling_factor): a stream's latents are the TAEHV's times
    the scale, and decoding those gives the frames the unscaled wrapper gives, chunk by chunk."""
    from streamdiff.model.build import build_streaming_vae

    cfgs = [load_config("tiny", ["vae.kind=taehv", f"vae.latent_scale={k}", "vae.taehv_encoder_widths=[8,8,16]",
                                 "vae.taehv_decoder_widths=[16,8,8,8]", "vae.taehv_blocks=1"]) for k in (1, 2.5)]
    plain, scaled = (build_streaming_vae(c, torch.device("cpu"), torch.float32) for c in cfgs)
    assert scaled.latent_scale == 2.5
    x = _clip(9, 4)
    enc_plain, enc_scaled, dec_plain, dec_scaled = (v.new_state() for v in (plain, scaled, plain, scaled))
    for part in (x[:, :, :5], x[:, :, 5:]):
        z, z_scaled = plain.encode_chunk(part, enc_plain), scaled.encode_chunk(part, enc_scaled)
        assert z.abs().mean() > 1e-3
        torch.testing.assert_close(z_scaled, 2.5 * z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scaled.decode_chunk(z_scaled, dec_scaled), plain.decode_chunk(z, dec_plain),
                                   atol=1e-5, rtol=0)


def test_chunk_rules_are_checked_before_the_memory_changes():
    sv = StreamingTAEHV(_seeded(NARROW))
    x = _clip(9, 0)
    state = sv.new_state()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        sv.encode_chunk(x[:, :, :4], state)
    first = sv.encode_chunk(x[:, :, :5], state)
    with pytest.raises(ValueError, match="multiple of 4"):
        sv.encode_chunk(x[:, :, 5:8], state)
    with pytest.raises(ValueError, match="multiples of 8"):
        sv.encode_chunk(torch.zeros(1, 3, 4, 20, 48), state)
    with pytest.raises(ValueError, match="multiple of 4 frames, got 0"):  # was a traceback that emptied the memory
        sv.encode_chunk(x[:, :, 5:5], state)
    with pytest.raises(ValueError, match="differ from this stream's earlier calls"):  # another batch of streams
        sv.encode_chunk(torch.zeros(2, 3, 4, H, W), state)
    # the refused calls left the memory as it was: the stream still equals one whole-clip pass
    rest = sv.encode_chunk(x[:, :, 5:], state)
    torch.testing.assert_close(torch.cat([first, rest], 2), _ref_encode(sv.net, x), atol=1e-5, rtol=0)


def test_the_decoders_input_clamp_is_the_public_soft_clamp():
    """The public TAEHV squashes latents with tanh(x / 3) * 3 before decoding; the streaming
    oracle above runs the module's own Clamp, so only this pins the formula the real
    taew2_1.pth weights were trained with."""
    x = torch.tensor([-6.0, -1.0, 0.0, 0.5, 3.0, 9.0])
    torch.testing.assert_close(Clamp()(x), torch.tanh(x / 3) * 3)


def test_a_memblock_convolves_its_input_before_its_memory():
    """The public TAEHV's MemBlock convolves cat([x, past]): the first half of its first conv's
    input channels sees this step, the second half the step before. The oracles above call the
    block itself, and random weights fit either order, so only this pins the order the real
    taew2_1.pth weights were trained with."""
    torch.manual_seed(5)
    block = MemBlock(3, 3)
    with torch.no_grad():
        block.conv[0].weight[:, 3:] = 0  # what the memory is convolved with
    x, memory = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    out = block(x, memory)
    assert torch.equal(out, block(x, torch.randn_like(memory)))
    assert not torch.equal(out, block(torch.randn_like(x), memory))


OFFICIAL_KEYS = [  # names in the public taew2_1.pth (encoder/decoder nn.Sequential indices)
    "encoder.0.weight", "encoder.2.conv.weight", "encoder.3.weight", "encoder.4.conv.0.weight",
    "encoder.4.conv.4.bias", "encoder.12.conv.weight", "encoder.17.weight", "decoder.1.weight",
    "decoder.3.conv.2.weight", "decoder.7.conv.weight", "decoder.13.conv.weight", "decoder.19.conv.weight",
    "decoder.20.weight", "decoder.22.weight",
]


def test_official_layout_state_dict_loads_completely(tmp_path, caplog):
    net = _seeded(VAEConfig())  # the public widths
    sd = net.state_dict()
    assert all(k in sd for k in OFFICIAL_KEYS)
    assert tuple(sd["encoder.2.conv.weight"].shape) == (64, 128, 1, 1)  # TPool(64, 2)
    assert tuple(sd["decoder.1.weight"].shape) == (256, 16, 3, 3)
    assert tuple(sd["decoder.13.conv.weight"].shape) == (256, 128, 1, 1)  # TGrow(128, 2)
    path = tmp_path / "taew2_1.pth"
    torch.save(sd, path)
    with caplog.at_level("INFO"):
        loaded = load_taehv(path, VAEConfig())
    assert "100.0%" in caplog.text
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # an older file whose first decoder TGrow also grows time keeps its last output channels
    sd2 = dict(sd)
    sd2["decoder.7.conv.weight"] = torch.cat([torch.zeros_like(sd["decoder.7.conv.weight"]), sd["decoder.7.conv.weight"]])
    torch.save(sd2, tmp_path / "old.pth")
    assert torch.equal(load_taehv(tmp_path / "old.pth", VAEConfig()).state_dict()["decoder.7.conv.weight"],
                       sd["decoder.7.conv.weight"])


def test_wrong_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    wan = build_vae(load_config("tiny").vae, seed=0).state_dict()
    torch.save(wan, tmp_path / "wan_vae.pth")
    with pytest.raises(WeightsMismatchError, match="below min_match"):
        load_taehv(tmp_path / "wan_vae.pth", VAEConfig())
    narrow = {k: v.contiguous() for k, v in _seeded(NARROW).state_dict().items()}
    save_file(narrow, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(WeightsMismatchError, match="shape mismatch"):
        load_taehv(tmp_path / "narrow.safetensors", VAEConfig())
    extra = {**narrow, **{f"head.{i}.weight": torch.zeros(1) for i in range(len(narrow))}}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        load_taehv(tmp_path / "extra.safetensors", NARROW)
    with pytest.raises(FileNotFoundError):
        load_taehv(tmp_path / "missing.pth", VAEConfig())
    # one tensor of 128 missing passed the 99% rule and was left at its init (garbled frames)
    lacking = {k: v for k, v in narrow.items() if k != "decoder.7.conv.weight"}
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"lacks 1 of the 128 tensors \(decoder.\*.conv.weight \(1 key\)"):
        load_taehv(tmp_path / "lacking.safetensors", NARROW)


def test_wan_encoder_with_taehv_decoder_streams_through_the_pipeline():
    """vae.decoder=taehv: Wan latents in, TAEHV frames out, same frame counts as the Wan VAE."""
    import numpy as np

    from streamdiff.model.build import build_components
    from streamdiff.pipeline.stream_pipeline import StreamPipeline

    cfg = load_config("tiny", ["vae.decoder=taehv", "vae.taehv_encoder_widths=[8,8,8]",
                               "vae.taehv_decoder_widths=[16,8,8,8]", "video.width=32", "video.height=32"])
    comps = build_components(cfg, "cpu")
    assert type(comps.vae).__name__ == "HybridVAE"
    pipe = StreamPipeline(comps, "a cat", width=32, height=32)
    frames = np.random.default_rng(0).integers(0, 255, (13, 32, 32, 3), dtype=np.uint8)
    out = [pipe.push(f[None]) for f in frames]
    out.append(pipe.flush())
    total = sum(len(o) for o in out)
    assert total == 13


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_tgrow_splits_channels_into_time_steps_in_either_memory_format(fmt):
    """TGrow's output n*s + j is channel group j of input n's conv, whether the conv's output is
    NCHW (a view) or channels-last (one copy, and the result stays channels-last)."""
    torch.manual_seed(3)
    grow = TGrow(5, 2)
    x = torch.randn(3, 5, 4, 7).contiguous(memory_format=fmt)
    y = grow.conv(x)
    want = torch.stack(y.chunk(2, 1), 1).reshape(6, 5, 4, 7)
    got = grow(x)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_upsampled_conv_equals_upsampling_then_the_conv(bias, fmt):
    """The decoder's `Upsample, 3x3 conv` pairs run on a CPU as four 2x2 phase convolutions of
    the small input: the same output (and gradients, the trainer runs it) on odd sizes."""
    from streamdiff.model.taehv import UpsampledConv, decoder_run_order

    torch.manual_seed(4)
    up, conv = nn.Upsample(scale_factor=2), nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    x = torch.randn(3, 5, 5, 9).contiguous(memory_format=fmt).requires_grad_(True)
    want = conv(up(x))
    got = UpsampledConv(up, conv)(x)
    assert got.shape == want.shape == (3, 7, 10, 18) and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, [x, conv.weight], g)
    grads_got = torch.autograd.grad(got, [x, conv.weight], g)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    # serving (no grad) keeps the kernels of a weight, and follows the weight when it is replaced
    fused_pair = UpsampledConv(up, conv)
    with torch.no_grad():
        torch.testing.assert_close(fused_pair(x), conv(up(x)), atol=1e-5, rtol=1e-5)
        assert fused_pair.kernels() is fused_pair.kernels()
        conv.weight.mul_(-2.0)  # an in-place load, as load_state_dict does
        torch.testing.assert_close(fused_pair(x), conv(up(x)), atol=1e-5, rtol=1e-5)
    # every upsampling of the decoder is fused with its conv; the modules themselves are unchanged
    net = TAEHV.from_config(NARROW)
    order = decoder_run_order(net.decoder)
    fused = [layer for layer in order if isinstance(layer, UpsampledConv)]
    assert len(fused) == 3 and not any(isinstance(layer, nn.Upsample) for layer in order)
    assert [f.conv for f in fused] == [net.decoder[i] for i in (8, 14, 20)]  # the public layout's convs
