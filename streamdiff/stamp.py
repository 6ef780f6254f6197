"""The frame-id stamp: a frame number drawn into the pixels so it survives video coding.

Owns: `encode_id` (draw an id into a frame) and `decode_id` (read it back, or None), and the
code's geometry. Used by the end-to-end benchmark (client/bench.py draws ids into the frames
it sends and reads them from the frames it gets back) and by the gateway for sessions opened
with `stamp` (server/webrtc.py reads the id of each input frame before the engine and draws it
into the output frame made from it). Does not own: any video coding or networking (numpy
only), or the wrap-around of ids (the reader of a 20-bit id unwraps it, see client/bench.py).

The code: a strip along the top edge of 2 rows x 16 cells, each cell pure black or white
(grey levels, so chroma subsampling does not matter). Cell edges are fractions of the frame
(columns at k*W/16, rows at k*H/12), so the code survives any resize, aspect changes included:
4x4 px cells at 64x48, 16x21 px at 256x256. Row 0 starts white, black and row 1 black, white:
these 4 sync cells give the black and white levels after coding. The other 28 cells are data,
row-major, most significant first: a 20-bit id, then its CRC-8 (poly 0x07, xorout 0x55,
"CRC-8/I-432-1"). Ids are taken modulo 2**20 (about 9.7 hours of frames at 30 fps).

Reading: each cell is the mean of its middle half (block edges and ringing left out). The code
is refused (None) when the sync cells are not clearly white over black (contrast below
MIN_CONTRAST grey levels), when any data cell is not clearly on one side of the midpoint
(within a fifth of the contrast of it), or when the CRC does not match. A picture that is
not a code thus rarely passes the first two checks, and then only 1 in 256 passes the CRC.
"""

from __future__ import annotations

import numpy as np

ID_BITS = 20
ID_MODULO = 1 << ID_BITS
CRC_BITS = 8
COLS, ROWS = 16, 2
ROWS_PER_HEIGHT = 12  # a row of cells is 1/12 of the frame height
SYNC = {(0, 0): 1, (0, 1): 0, (1, 0): 0, (1, 1): 1}  # (row, col) -> white (1) / black (0)
DATA_CELLS = tuple((r, c) for r in range(ROWS) for c in range(COLS) if (r, c) not in SYNC)  # 28
MIN_CONTRAST = 96.0  # white sync minus black sync, grey levels
CLEAR_SHARE = 0.2  # a data cell must lie this share of the contrast away from the midpoint
MIN_WIDTH, MIN_HEIGHT = 32, 24  # cells of at least 2x2 px
WHITE, BLACK = 255, 0

assert len(DATA_CELLS) == ID_BITS + CRC_BITS


def crc8(value: int, nbytes: int = 3) -> int:
    """CRC-8/I-432-1 (poly 0x07, init 0, xorout 0x55) of `value` as `nbytes` big-endian bytes."""
    crc = 0
    for byte in value.to_bytes(nbytes, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


def _edges(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell boundaries: x edges [COLS + 1], y edges [ROWS + 1] (pixels, rounded)."""
    xs = np.round(np.arange(COLS + 1) * width / COLS).astype(int)
    ys = np.round(np.arange(ROWS + 1) * height / ROWS_PER_HEIGHT).astype(int)
    return xs, ys


def stamp_height(height: int) -> int:
    """Rows of pixels (from the top) the code covers in a frame of this height."""
    return int(_edges(MIN_WIDTH, height)[1][-1])


def _bits(frame_id: int) -> list[int]:
    value = int(frame_id) % ID_MODULO
    word = (value << CRC_BITS) | crc8(value)
    n = ID_BITS + CRC_BITS
    return [(word >> (n - 1 - i)) & 1 for i in range(n)]


def _check(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        got = f"{frame.dtype} {list(frame.shape)}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"a frame must be uint8 [H, W, 3], got {got}")


def encode_id(frame: np.ndarray, frame_id: int) -> np.ndarray:
    """A copy of `frame` ([H, W, 3] uint8, at least 32x24) with `frame_id` (taken modulo
    2**20) drawn into its top strip; `frame` itself is not modified."""
    _check(frame)
    height, width = frame.shape[:2]
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"the frame-id code needs a frame of at least {MIN_WIDTH}x{MIN_HEIGHT}, got {width}x{height}")
    out = frame.copy()  # [H, W, 3]
    xs, ys = _edges(width, height)
    cells = dict(SYNC)
    cells.update(zip(DATA_CELLS, _bits(frame_id)))
    for (r, c), bit in cells.items():
        out[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = WHITE if bit else BLACK
    return out


def cell_levels(frame: np.ndarray) -> np.ndarray:
    """Mean grey level of the middle half of every cell: [ROWS, COLS] float."""
    height, width = frame.shape[:2]
    xs, ys = _edges(width, height)
    grey = frame[: ys[-1]].astype(np.float32).mean(axis=2)  # [strip, W]
    levels = np.empty((ROWS, COLS), np.float32)
    for r in range(ROWS):
        y0, y1 = ys[r], ys[r + 1]
        dy = (y1 - y0) // 4
        for c in range(COLS):
            x0, x1 = xs[c], xs[c + 1]
            dx = (x1 - x0) // 4
            levels[r, c] = grey[y0 + dy : y1 - dy, x0 + dx : x1 - dx].mean()
    return levels


def decode_id(frame: np.ndarray) -> int | None:
    """The id (0 .. 2**20 - 1) drawn by `encode_id`, read from a frame that may have been
    coded, resized or blurred; None when the frame carries no valid code."""
    _check(frame)
    height, width = frame.shape[:2]
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        return None
    # 1. Black and white levels from the sync cells.
    levels = cell_levels(frame)  # [ROWS, COLS]
    white = np.mean([levels[rc] for rc, bit in SYNC.items() if bit])
    black = np.mean([levels[rc] for rc, bit in SYNC.items() if not bit])
    contrast = white - black
    if contrast < MIN_CONTRAST:
        return None
    # 2. Every data cell must be clearly white or clearly black.
    mid = (white + black) / 2
    data = np.array([levels[rc] for rc in DATA_CELLS])  # [28]
    if np.any(np.abs(data - mid) < CLEAR_SHARE * contrast):
        return None
    # 3. Bits -> id and CRC.
    word = 0
    for bit in data > mid:
        word = (word << 1) | int(bit)
    value, crc = word >> CRC_BITS, word & 0xFF
    return value if crc8(value) == crc else None


__all__ = ["ID_BITS", "ID_MODULO", "cell_levels", "crc8", "decode_id", "encode_id", "stamp_height"]
