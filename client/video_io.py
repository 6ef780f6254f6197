"""Video files in and out with PyAV, for `streamdiff render` and the benchmark clips.

Owns: decoding any container/codec PyAV reads into uint8 RGB frames (optionally resized on
the way in), and encoding frames to a video file. Does not own: what is done to the frames.
(Only server/ and client/ import av; the core library never does.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class VideoInputError(ValueError):
    """The input is missing, not a video, or has no video stream."""


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int  # 0 when the container does not say


def probe(path: str | Path) -> VideoInfo:
    path = Path(path)
    if path.is_dir():
        raise VideoInputError(f"{path} is a folder: give a video file (or 'synthetic')")
    if not path.is_file():
        raise VideoInputError(f"input not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoInputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            return VideoInfo(stream.codec_context.width, stream.codec_context.height, float(rate), stream.frames or 0)
    except av.FFmpegError as exc:
        raise VideoInputError(f"{path} is not a video PyAV can read ({exc.__class__.__name__})") from exc


def read_frames(path: str | Path, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield frames [H, W, 3] uint8, resized to size=(width, height) if given."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if size is not None and (frame.width, frame.height) != size:
                    frame = frame.reformat(width=size[0], height=size[1])
                yield frame.to_ndarray(format="rgb24")
    except av.FFmpegError as exc:
        raise VideoInputError(f"{path}: decoding failed ({exc.__class__.__name__}: {exc})") from exc


class VideoWriter:
    """Encode uint8 RGB frames to a file (H.264 when the build has it, MPEG-4 otherwise)."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float, codec: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        rate = Fraction(fps).limit_denominator(1001)
        codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            self.stream.bit_rate = 8_000_000
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
