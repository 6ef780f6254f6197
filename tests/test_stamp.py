"""The frame-id stamp (streamdiff.stamp): exact without coding, survives real VP8 (libvpx) and
H.264 (libx264) encode/decode round trips at low bitrates and resizes, and refuses pictures
that carry no code."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from streamdiff.pipeline.frames import resize_frame, synthetic_clip
from streamdiff.stamp import DATA_CELLS, ID_MODULO, SYNC, _edges, crc8, decode_id, encode_id, stamp_height

SIZES = [(64, 48), (256, 256)]


def spread_ids(n: int, seed: int = 0) -> list[int]:
    """Edge values plus random ids over the whole 20-bit range."""
    rng = np.random.default_rng(seed)
    edges = [0, 1, 2, 255, 256, 2**16 - 1, 2**16, 2**16 + 1, ID_MODULO - 2, ID_MODULO - 1]
    return (edges + rng.integers(0, ID_MODULO, n).tolist())[:n]


def test_crc_is_crc8_i432_1():
    # the catalogued check value of CRC-8/I-432-1 over b"123456789" is 0xA1
    assert crc8(int.from_bytes(b"123456789", "big"), 9) == 0xA1


@pytest.mark.parametrize("width,height", [(32, 24), (64, 48), (256, 256), (640, 480), (832, 480)])
def test_exact_round_trip_without_coding(width, height):
    clip = synthetic_clip(4, width, height, seed=3)
    for k, frame_id in enumerate(spread_ids(200)):
        background = clip[k % len(clip)]
        before = background.copy()
        stamped = encode_id(background, frame_id)
        assert np.array_equal(background, before), "encode_id must draw into a copy"
        assert decode_id(stamped) == frame_id
        # only the top strip changed
        assert np.array_equal(stamped[stamp_height(height):], background[stamp_height(height):])


def test_ids_wrap_modulo_2_pow_20():
    frame = synthetic_clip(1, 64, 48)[0]
    assert decode_id(encode_id(frame, ID_MODULO + 5)) == 5
    assert decode_id(encode_id(frame, 3 * ID_MODULO - 1)) == ID_MODULO - 1


def _codec_round_trip(codec: str, frames: list[np.ndarray], bitrate_bps: int, fps: int = 15) -> dict[int, np.ndarray]:
    """Encode `frames` with a real-time configuration like aiortc's, decode them again;
    returns decoded RGB frames by pts (= index)."""
    height, width = frames[0].shape[:2]
    enc = av.CodecContext.create(codec, "w")
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.bit_rate = bitrate_bps
    enc.time_base, enc.framerate = fractions.Fraction(1, fps), fractions.Fraction(fps, 1)
    if codec == "libx264":
        enc.options = {"tune": "zerolatency", "preset": "ultrafast", "level": "31"}
        enc.profile = "Baseline"
    else:  # libvpx VP8: CBR real time, aiortc's quantizer range
        enc.qmin, enc.qmax = 2, 56
        enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "end-usage": "cbr",
                       "minrate": str(bitrate_bps), "maxrate": str(bitrate_bps)}
    dec = av.CodecContext.create("h264" if codec == "libx264" else "vp8", "r")
    packets = []
    for i, pixels in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = i
        packets += enc.encode(frame)
    packets += enc.encode(None)
    coded_bytes = sum(p.size for p in packets)
    out = {}
    for packet in packets:
        for frame in dec.decode(packet):
            out[frame.pts if frame.pts is not None else len(out)] = frame.to_ndarray(format="rgb24")
    assert coded_bytes * 8 * fps / len(frames) < 2.5 * bitrate_bps, "the encoder ignored the bitrate"
    return out


@pytest.mark.parametrize("codec", ["libvpx", "libx264"])
@pytest.mark.parametrize("width,height,bitrate_bps", [(64, 48, 50_000), (256, 256, 250_000)])
def test_survives_real_encode_decode(codec, width, height, bitrate_bps):
    """60 frames of the moving synthetic clip, each with a different id, through a real codec at
    a low bitrate (aiortc's floor is 250 kbit/s for VP8): every decoded frame reads back exactly."""
    ids = spread_ids(60, seed=width)
    clip = synthetic_clip(60, width, height, seed=1)
    decoded = _codec_round_trip(codec, [encode_id(f, i) for f, i in zip(clip, ids)], bitrate_bps)
    assert sorted(decoded) == list(range(60))
    got = [decode_id(decoded[k]) for k in range(60)]
    assert got == ids
    # the coding was lossy (the test is not passing on untouched pixels)
    assert max(np.abs(decoded[k].astype(int) - clip[k]).max() for k in range(60)) > 20


@pytest.mark.parametrize("src,dst", [((256, 256), (64, 48)), ((640, 480), (256, 256)), ((64, 48), (256, 256))])
def test_survives_resizing(src, dst):
    """The server resizes input to the engine's size; cell edges are fractions of the frame."""
    clip = synthetic_clip(3, *src, seed=2)
    for k, frame_id in enumerate(spread_ids(30, seed=5)):
        small = resize_frame(encode_id(clip[k % 3], frame_id), *dst)
        assert decode_id(small) == frame_id


def test_pictures_without_a_code_are_refused():
    rng = np.random.default_rng(0)
    # 1. The moving clip, uniform frames, noise, and blocky binary noise.
    for frame in synthetic_clip(120, 256, 256, seed=4):
        assert decode_id(frame) is None
    for level in (0, 128, 255):
        assert decode_id(np.full((48, 64, 3), level, np.uint8)) is None
    for _ in range(300):
        assert decode_id(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) is None
        assert decode_id(np.kron(rng.integers(0, 2, (12, 16, 1)), np.ones((4, 4, 3))).astype(np.uint8) * 255) is None
    # 2. A code with its sync pattern inverted is no code.
    stamped = encode_id(synthetic_clip(1, 64, 48)[0], 12345)
    assert decode_id(255 - stamped) is None
    # 3. Too small to hold the code.
    assert decode_id(np.zeros((20, 30, 3), np.uint8)) is None
    with pytest.raises(ValueError, match="at least 32x24"):
        encode_id(np.zeros((20, 30, 3), np.uint8), 1)


def _draw_cells(frame: np.ndarray, bits: dict) -> np.ndarray:
    out = frame.copy()
    xs, ys = _edges(frame.shape[1], frame.shape[0])
    for (r, c), bit in bits.items():
        out[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 255 if bit else 0
    return out


def test_checksum_refuses_flipped_bits_and_random_words():
    background = synthetic_clip(1, 64, 48)[0]
    stamped = encode_id(background, 0x5A5A5)
    xs, ys = _edges(64, 48)
    # 1. Every single data cell flipped: CRC-8 catches every one-bit error.
    for r, c in DATA_CELLS:
        flipped = stamped.copy()
        cell = flipped[ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
        cell[...] = 255 - cell
        assert decode_id(flipped) is None, (r, c)
    # 2. Valid sync with random data cells: only about 1 word in 256 passes the CRC.
    rng = np.random.default_rng(1)
    trials = 2000
    accepted = sum(
        decode_id(_draw_cells(background, {**SYNC, **dict(zip(DATA_CELLS, rng.integers(0, 2, len(DATA_CELLS))))}))
        is not None
        for _ in range(trials)
    )
    assert accepted < 4 * trials / 256  # expected ~7.8; without a checksum every one would pass


def test_only_the_middle_of_each_cell_is_read():
    """Cell edges are where coding blurs and rings: each cell is read from its middle half, so
    a code whose every cell has its outer rows turned the other way still reads."""
    frame = synthetic_clip(1, 256, 256)[0]
    stamped = encode_id(frame, 0x5A5A5)
    xs, ys = _edges(256, 256)
    for r, c in [*SYNC, *DATA_CELLS]:
        cell = stamped[ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
        rows = (ys[r + 1] - ys[r]) // 4
        cell[:rows] = 255 - cell[:rows]
        cell[-rows:] = 255 - cell[-rows:]
    assert decode_id(stamped) == 0x5A5A5


def test_a_code_that_is_not_clear_is_refused_not_guessed():
    """Two checks come before the CRC: the sync cells must differ by MIN_CONTRAST grey levels, and
    every data cell must lie clearly on one side of the midpoint."""
    background = synthetic_clip(1, 64, 48)[0]
    stamped = encode_id(background, 12345)
    faint = (stamped[:stamp_height(48)].astype(np.float32) / 255 * 60 + 100).astype(np.uint8)  # 100 / 160
    faded = stamped.copy()
    faded[:stamp_height(48)] = faint
    assert decode_id(faded) is None
    xs, ys = _edges(64, 48)
    bits = {rc: int(stamped[ys[rc[0]], xs[rc[1]], 0] > 127) for rc in DATA_CELLS}
    r, c = next(rc for rc, bit in bits.items() if bit == 0)
    grey = stamped.copy()
    grey[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 120  # nearer black than white, but not clearly
    assert decode_id(grey) is None
    grey[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 40  # clearly black: read
    assert decode_id(grey) == 12345
