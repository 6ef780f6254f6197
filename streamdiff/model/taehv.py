"""TAEHV: the tiny autoencoder for Wan 2.1 latents, streamed chunk by chunk with per-stream memory.

Owns: the TAEHV network (layer layout and parameter names of the public `taew2_1.pth`, so that
file loads through our loader; widths from `VAEConfig`, so the demo uses a narrow instance of
the same code), its streaming encode / decode with per-stream temporal memory, and the hybrid
`vae.decoder: taehv` (Wan encoder, TAEHV decoder).
Does not own: reading files (model/loading.py `load_taehv`), batching streams (engine/vae_batch.py
stacks the caches, which follow `VAEStreamState`'s documented layout), uint8 <-> tensor.

The network (4x time, 8x space, 16 latent channels; all convolutions are 2-D, time is handled
by three kinds of blocks):
- `MemBlock`: a residual block whose first conv also sees the block's input at the previous
  time step ("memory"; zeros before the first step). The only state that crosses calls.
- `TPool(stride)`: `stride` consecutive time steps folded into channels, 1x1 conv back (encoder).
- `TGrow(stride)`: 1x1 conv to `stride` x channels, unfolded into time steps (decoder).
encoder: conv, TPool 2, strided conv, 3 MemBlocks, TPool 2, strided conv, 3 MemBlocks, TPool 1,
strided conv, 3 MemBlocks, conv -> latents. decoder: tanh clamp, conv, 3 MemBlocks, upsample,
TGrow 1, conv, 3 MemBlocks, upsample, TGrow 2, conv, 3 MemBlocks, upsample, TGrow 2, conv, conv.

Frame alignment with the Wan VAE (a decision; the public encoder pads at the end instead):
Wan's latent 0 is frame 0 alone and latent k is frames 4k-3..4k. We front-pad a stream's first
frame three times, so every encoder call sees whole groups of 4 and latent k holds the same
frames as Wan's; the decoder's first latent gives 4 frames of which the first 3 are dropped (as
the public decoder trims), later latents give 4. Latents are the Wan VAE's normalized latents
(the space the DiT works in). Frames in and out are in [-1, 1] like `StreamingVAE`.

Streaming: the whole clip runs layer by layer over all time steps, each MemBlock reading its
input shifted by one step; a chunk does the same with the previous chunk's last input as the
memory of its first step. So chunk by chunk equals the whole clip exactly (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamdiff.config import VAEConfig
from streamdiff.model.vae import StreamingVAE, VAEStreamState, compiled

TIME_RATIO = 4
SPACE_RATIO = 8


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the decoder's input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over [input, memory]; memory = this block's input one time step earlier."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, memory], 1)) + self.skip(x))


class TPool(nn.Module):
    """[B*T, C, H, W] -> [B*T/stride, C, H, W]: `stride` steps into channels, 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.stride == 1:
            return self.conv(x)
        steps = x.view(n // self.stride, self.stride, c, h, w)  # [B*T/s, s, C, H, W]
        return self.conv(torch.cat(steps.unbind(1), 1))  # [B*T/s, C, H, W] (cat keeps channels_last)


class TGrow(nn.Module):
    """[B*T, C, H, W] -> [B*T*stride, C, H, W]: 1x1 conv to stride*C channels, into time steps."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.stride
        y = self.conv(x)  # [N, s*C, H, W]
        if s == 1:
            return y
        if y.is_contiguous():  # NCHW: the channel groups are already the time steps, in order
            return y.view(n * s, c, h, w)
        # NHWC memory [N, H, W, s, C] -> [N, s, H, W, C]: one copy, and the result is channels_last
        nhwc = y.permute(0, 2, 3, 1).reshape(n, h, w, s, c).permute(0, 3, 1, 2, 4).reshape(n * s, h, w, c)
        return nhwc.permute(0, 3, 1, 2)


class TAEHV(nn.Module):
    """The network. `encoder_width` 64 and `decoder_widths` (256, 128, 64, 64) are the public
    `taew2_1.pth`; the demo uses narrower ones. Indices inside `encoder` / `decoder` (hence the
    parameter names) follow the public layout."""

    def __init__(self, latent_channels: int = 16, encoder_widths: tuple[int, int, int] = (64, 64, 64),
                 decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64), blocks: int = 3):
        super().__init__()
        if len(encoder_widths) != 3 or len(decoder_widths) != 4 or blocks < 1:
            raise ValueError(f"TAEHV needs 3 encoder and 4 decoder widths and >= 1 block per stage, got "
                             f"{list(encoder_widths)}, {list(decoder_widths)}, {blocks}")
        (c0, c1, c2), (d0, d1, d2, d3) = encoder_widths, decoder_widths
        self.latent_channels = latent_channels

        def mem(c: int) -> list[nn.Module]:
            return [MemBlock(c, c) for _ in range(blocks)]

        self.encoder = nn.Sequential(
            _conv(3, c0), nn.ReLU(inplace=True),
            TPool(c0, 2), _conv(c0, c0, stride=2, bias=False), *mem(c0),
            TPool(c0, 2), _conv(c0, c1, stride=2, bias=False), *mem(c1),
            TPool(c1, 1), _conv(c1, c2, stride=2, bias=False), *mem(c2),
            _conv(c2, latent_channels),
        )
        self.decoder = nn.Sequential(
            Clamp(), _conv(latent_channels, d0), nn.ReLU(inplace=True),
            *mem(d0), nn.Upsample(scale_factor=2), TGrow(d0, 1), _conv(d0, d1, bias=False),
            *mem(d1), nn.Upsample(scale_factor=2), TGrow(d1, 2), _conv(d1, d2, bias=False),
            *mem(d2), nn.Upsample(scale_factor=2), TGrow(d2, 2), _conv(d2, d3, bias=False),
            nn.ReLU(inplace=True), _conv(d3, 3),
        )
        self.decoder_run_order = decoder_run_order(self.decoder)  # once; the modules are shared

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> "TAEHV":
        return cls(cfg.z_dim, tuple(cfg.taehv_encoder_widths), tuple(cfg.taehv_decoder_widths), cfg.taehv_blocks)

    def channels_last_(self) -> "TAEHV":
        """NHWC weights: 2-3x faster convolutions on CPU at these small widths (activations follow)."""
        return self.to(memory_format=torch.channels_last)

    @staticmethod
    def num_memblocks(seq: nn.Sequential) -> int:
        return sum(isinstance(m, MemBlock) for m in seq)


def grow_before_upsampling(seq: nn.Sequential) -> tuple[nn.Module, ...]:
    """`seq`'s layers with each `Upsample, TGrow` pair run as `TGrow, Upsample`: nearest
    upsampling commutes with TGrow's 1x1 conv, so the conv and the time split see 4x fewer
    pixels. Same modules (and parameter names), same result."""
    layers = list(seq)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.Upsample) and isinstance(layers[i + 1], TGrow):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return tuple(layers)


class UpsampledConv:
    """A nearest 2x `Upsample` followed by a 3x3 `conv` (stride 1, padding 1), run on a CPU as
    four 2x2 convolutions of the low-resolution input, one per output phase, written
    interleaved into the full-resolution output (channels-last). Output pixel (2i + a, 2j + b)
    reads input rows i - 1..i (a = 0) or i..i + 1 (a = 1), the kernel's rows summed where two
    of them land on the same input row, and the same for columns: the same products in another
    order, 2.25x fewer multiply-adds and no upsampled copy of the input (the demo's full-size
    decoder conv: 44 -> 22 ms a chunk, one thread). Elsewhere the two layers run as they are
    (not measured on a GPU). Not a module: it only borrows `up` and `conv`."""

    def __init__(self, up: nn.Upsample, conv: nn.Conv2d):
        self.up, self.conv = up, conv
        self._kernels: list[list[torch.Tensor]] | None = None
        self._kernels_of: tuple | None = None  # (storage, version, dtype) of the weight they came from

    @staticmethod
    def phase_kernels(weight: torch.Tensor) -> list[list[torch.Tensor]]:
        """[Co, Ci, 3, 3] -> kernels[a][b] [Co, Ci, 2, 2] (channels-last) for output phase (a, b)."""

        def fold(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
            w0, w1, w2 = w.unbind(dim)  # taps at offsets -1, 0, +1 of the upsampled map
            return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)

        rows = fold(weight, 2)
        return [[fold(rows[a], 3)[b].contiguous(memory_format=torch.channels_last) for b in range(2)]
                for a in range(2)]

    def kernels(self) -> list[list[torch.Tensor]]:
        """The phase kernels of the conv's current weight: made once per weight while serving
        (about 0.3 ms each, every chunk otherwise); made every call while training, so that
        gradients reach the weight."""
        w = self.conv.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return self.phase_kernels(w)
        if torch.compiler.is_compiling():  # part of the compiled graph (Dynamo cannot trace the cache's data_ptr key)
            return self.phase_kernels(w.detach())
        key = (w.data_ptr(), w._version, w.dtype)  # an in-place load or optimizer step bumps _version
        if self._kernels_of != key:
            self._kernels, self._kernels_of = self.phase_kernels(w.detach()), key
        return self._kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.conv(self.up(x))
        n, _, h, w = x.shape
        kernels = self.kernels()
        out = x.new_empty(n, h, 2, w, 2, self.conv.out_channels)  # NHWC, the phases interleaved
        for a in range(2):
            for b in range(2):
                y = F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernels[a][b], self.conv.bias)  # [N, Co, h, w]
                out[:, :, a, :, b] = y.permute(0, 2, 3, 1)
        return out.view(n, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # [N, Co, 2h, 2w], channels-last


def decoder_run_order(seq: nn.Sequential) -> tuple:
    """How the decoder runs: `grow_before_upsampling`, then each `Upsample, 3x3 conv` pair as
    one `UpsampledConv`. Same modules and parameter names; equal up to float rounding."""
    layers = list(grow_before_upsampling(seq))
    out = []
    for layer in layers:
        prev = out[-1] if out else None
        if (isinstance(prev, nn.Upsample) and prev.scale_factor == 2 and prev.mode == "nearest"
                and isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3) and layer.stride == (1, 1)
                and layer.padding == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1):
            out[-1] = UpsampledConv(prev, layer)
        else:
            out.append(layer)
    return tuple(out)


def run_with_memory(seq, x: torch.Tensor, batch: int, memory: list) -> torch.Tensor:
    """Run the layers `seq` over x [B*T, C, H, W] (batch-major, T steps per batch row), all steps of a layer
    at once. `memory[i]` is the i-th MemBlock's input at the step before this chunk ([B, C, H, W],
    or None for a stream's first chunk: zeros); it is replaced by this chunk's last input."""
    k = 0
    x = x.contiguous(memory_format=torch.channels_last)
    for layer in seq:
        if isinstance(layer, MemBlock):
            n, c, h, w = x.shape
            steps = n // batch
            rows = x.split(steps)  # B x [T, C, H, W]
            prev = memory[k] if memory[k] is not None else x.new_zeros(batch, c, h, w)  # [B, C, H, W]
            prev = prev.to(x.dtype).contiguous(memory_format=torch.channels_last)
            # memory of step t = input of step t-1 (4-D cats keep channels_last)
            past = torch.cat([t for i, row in enumerate(rows) for t in (prev[i : i + 1], row[:-1])], 0)  # [B*T, C, H, W]
            memory[k] = torch.cat([row[-1:] for row in rows], 0).detach().clone()  # [B, C, H, W]
            x = layer(x, past)
            k += 1
        else:
            x = layer(x)
    return x


def encode_frames(net: TAEHV, frames: torch.Tensor, memory: list, first: bool) -> torch.Tensor:
    """frames [B, 3, n, H, W] in [-1, 1] (first: 1 + 4k frames, else 4k) -> latents [B, 16, F, h, w]."""
    b = frames.shape[0]
    x = frames.permute(0, 2, 1, 3, 4)  # [B, n, 3, H, W]
    if first:  # front-pad frame 0 so that latent 0 is frame 0 alone (the Wan grouping)
        x = torch.cat([x[:, :1].expand(-1, TIME_RATIO - 1, -1, -1, -1), x], 1)  # [B, n+3, 3, H, W]
    steps = x.shape[1]
    x = (x.reshape(b * steps, *x.shape[2:]) + 1) / 2  # [B*T, 3, H, W] in [0, 1]
    z = run_with_memory(net.encoder, x, b, memory)  # [B*T/4, 16, h, w]
    return z.view(b, steps // TIME_RATIO, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, 16, F, h, w]


def decode_latents(net: TAEHV, latents: torch.Tensor, memory: list, first: bool, clamp: bool = True) -> torch.Tensor:
    """latents [B, 16, m, h, w] -> frames [B, 3, n, 8h, 8w] in [-1, 1] (n = 4m, or 4m - 3 when
    the stream's first latent is among them). `clamp=False` (training) keeps the gradient of
    pixels outside the range."""
    b, _, m = latents.shape[:3]
    z = latents.permute(0, 2, 1, 3, 4).reshape(b * m, *latents.shape[1:2], *latents.shape[3:])  # [B*m, 16, h, w]
    x = run_with_memory(net.decoder_run_order, z, b, memory)  # [B*4m, 3, H, W]
    x = x.view(b, m * TIME_RATIO, *x.shape[1:])  # [B, 4m, 3, H, W]
    if first:
        x = x[:, TIME_RATIO - 1 :]
    x = x.clamp(0, 1) if clamp else x
    return (x * 2 - 1).permute(0, 2, 1, 3, 4)  # [B, 3, n, H, W]


class StreamingTAEHV(StreamingVAE):
    """`StreamingVAE`'s interface over TAEHV: the same call rules (first encode 1 + 4k frames,
    later 4k; decode any number of latents), the same `VAEStreamState` (one cache entry per
    MemBlock: its last input, batch first), so the pipeline, engine and stages use either.
    `latent_scale` (config `vae.latent_scale`): the DiT's latents are the TAEHV's times it."""

    def __init__(self, net: TAEHV, latent_scale: float = 1.0):  # noqa: D107
        # no Wan module: the fields StreamingVAE reads are set here
        self.vae = net.eval()
        self.net = net
        self.latent_scale = float(latent_scale)
        self.z_dim = net.latent_channels
        self.in_channels = 3
        self._num_encoder_convs = TAEHV.num_memblocks(net.encoder)
        self._num_decoder_convs = TAEHV.num_memblocks(net.decoder)
        self._temporal_ratio = TIME_RATIO
        self._spatial_ratio = SPACE_RATIO
        self._encode, self._decode = encode_frames, decode_latents  # compiled by `compile()`

    def compile(self) -> None:
        """`runtime.compile_vae` for TAEHV: `encode_frames` and `decode_latents` (the whole
        chunk, MemBlock memory included) through torch.compile(fullgraph=True); see
        `StreamingVAE.compile`."""
        self._encode, self._decode = compiled(encode_frames), compiled(decode_latents)

    @torch.no_grad()
    def encode_chunk(self, frames: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        x, first = self._check_encode(frames, state)
        latents = self._encode(self.net, x, state.enc_cache, first)
        if self.latent_scale != 1:
            latents = latents * self.latent_scale
        state.encoded_frames += x.shape[2]
        state.encoded_latents += latents.shape[2]
        return latents

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        z = self._check_decode(latents, state)
        first = state.decoded_latents == 0
        frames = self._decode(self.net, z / self.latent_scale if self.latent_scale != 1 else z, state.dec_cache, first)
        state.decoded_latents += z.shape[2]
        state.decoded_frames += frames.shape[2]
        return frames

    def _check_encode(self, frames: torch.Tensor, state: VAEStreamState) -> tuple[torch.Tensor, bool]:
        """StreamingVAE's rules, checked before the memory is touched: -> (frames, first call)."""
        x = self._check_tensor(frames, "frames", 3, "3 (RGB)", state)
        first = state.encoded_frames == 0
        b, _, n, h, w = x.shape
        if h % SPACE_RATIO or w % SPACE_RATIO:
            raise ValueError(f"frames height and width must be multiples of {SPACE_RATIO}, got H={h}, W={w}")
        if first and (n - 1) % TIME_RATIO:
            raise ValueError(f"the first encode_chunk call of a stream takes 1 + 4k frames (1, 5, 9, ...), got {n}")
        if not first and (n == 0 or n % TIME_RATIO):
            raise ValueError(f"encode_chunk after a stream's first call takes a multiple of 4 frames, got {n} "
                             f"(frames encoded so far: {state.encoded_frames})")
        self._check_shape(state, "enc_shape", (b, h, w), "frames (B, H, W)")
        state.device = x.device
        return x, first


class HybridVAE(StreamingVAE):
    """`vae.decoder: taehv`: the Wan VAE encodes, TAEHV decodes (StreamDiffusionV2's `--use_taehv`).
    A state holds the Wan encoder's conv caches and TAEHV's decoder memory."""

    def __init__(self, wan: StreamingVAE, taehv: StreamingTAEHV):  # noqa: D107
        if wan.z_dim != taehv.z_dim:
            raise ValueError(f"the Wan VAE has z_dim={wan.z_dim} but TAEHV {taehv.z_dim}")
        self.wan, self.taehv = wan, taehv
        self.vae = wan.vae
        self.z_dim = wan.z_dim
        self.in_channels = wan.in_channels
        self._num_encoder_convs = wan._num_encoder_convs
        self._num_decoder_convs = taehv._num_decoder_convs
        self._temporal_ratio = wan.temporal_ratio
        self._spatial_ratio = wan.spatial_ratio
        self.latents_mean, self.latents_std, self._stats = wan.latents_mean, wan.latents_std, wan._stats
        self.normalize_latents = wan.normalize_latents

    @property
    def _encoder(self):  # StreamingVAE.encode_chunk's call: the Wan half's, compiled or not
        return self.wan._encoder

    def compile(self) -> None:
        """`runtime.compile_vae`: the Wan encoder's and TAEHV's decoder calls compiled."""
        self.wan.compile()
        self.taehv.compile()

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        z = self._check_decode(latents, state)
        first = state.decoded_latents == 0
        frames = self.taehv._decode(self.taehv.net, z.to(self.taehv.dtype), state.dec_cache, first)
        state.decoded_latents += z.shape[2]
        state.decoded_frames += frames.shape[2]
        return frames.to(self.dtype)


__all__ = ["HybridVAE", "MemBlock", "StreamingTAEHV", "TAEHV", "TGrow", "TPool", "decode_latents", "encode_frames",
           "UpsampledConv", "decoder_run_order", "grow_before_upsampling", "run_with_memory"]
