"""Video files in and out with PyAV, for `streamdiff render` and the benchmark clips.

Owns: decoding any container/codec PyAV reads into uint8 RGB frames (optionally resized on
the way in), and encoding frames to a video file. Does not own: what is done to the frames.
(Only server/ and client/ import av; the core library never does.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


log = logging.getLogger(__name__)


class VideoInputError(ValueError):
    """The input is missing, not a video, or has no video stream."""


@dataclass
class VideoInfo:
    width: int  # as displayed: a phone's portrait clip (stored landscape, rotated 90) is taller than wide
    height: int
    fps: float
    frames: int  # 0 when the container does not say
    rotation: int = 0  # degrees counter-clockwise the player turns the stored picture (0, 90, 180, 270)
    sample_aspect: Fraction | None = None  # pixels that are not square (anamorphic video)
    has_audio: bool = False


def _video_stream(container):
    """The stream a player shows: FFmpeg's best video stream (the largest, not a cover picture
    or a thumbnail that happens to come first)."""
    return container.streams.best("video") or container.streams.video[0]


def _rotation(frame) -> int:
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


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
            stream = _video_stream(container)
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            width, height = stream.codec_context.width, stream.codec_context.height
            rotation = 0
            for frame in container.decode(stream):  # the display matrix rides on the frames
                rotation = _rotation(frame)
                break
            if rotation in (90, 270):
                width, height = height, width
            sar = stream.sample_aspect_ratio
            return VideoInfo(width, height, float(rate), stream.frames or 0, rotation,
                             Fraction(sar) if sar and sar != 1 else None, bool(container.streams.audio))
    except av.FFmpegError as exc:
        raise VideoInputError(f"{path} is not a video PyAV can read ({exc.__class__.__name__})") from exc


def read_frames(path: str | Path, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield frames [H, W, 3] uint8 as a player shows them (turned by the file's display rotation),
    resized to size=(width, height) if given, else to the first frame's size (a stream that
    changes resolution midway, which H.264 allows, keeps one size, with a warning)."""
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container)
            stream.thread_type = "AUTO"
            target, first = size, None  # (width, height) as displayed; the first frame's stored size
            for n, frame in enumerate(container.decode(stream)):
                turns = _rotation(frame) // 90
                if first is None:
                    first = (frame.width, frame.height)
                    target = target or (first if turns % 2 == 0 else first[::-1])
                elif (frame.width, frame.height) != first:
                    log.warning("%s changes resolution at frame %d (%dx%d after %dx%d); every frame is scaled to "
                                "%dx%d", path, n, frame.width, frame.height, *first, *target)
                    first = (frame.width, frame.height)
                stored = target if turns % 2 == 0 else target[::-1]
                if (frame.width, frame.height) != stored:
                    frame = frame.reformat(width=stored[0], height=stored[1])
                rgb = frame.to_ndarray(format="rgb24")
                yield np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
    except av.FFmpegError as exc:
        raise VideoInputError(f"{path}: decoding failed ({exc.__class__.__name__}: {exc})") from exc


class VideoWriter:
    """Encode uint8 RGB frames to a file (H.264 when the build has it, MPEG-4 otherwise). The file
    appears only when the writer closes without an error: until then it is a hidden partial file
    beside it, removed on an error or Ctrl-C, so a render that fails never replaces a good output
    with a broken one. `sample_aspect`: the pixels' shape, for anamorphic input kept at its size."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float, codec: str | None = None,
                 sample_aspect: Fraction | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.container = av.open(str(self.partial), mode="w")
        rate = Fraction(fps).limit_denominator(1001)
        codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        if sample_aspect is not None:
            self.stream.codec_context.sample_aspect_ratio = sample_aspect
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
        """Finish the file and put it in place."""
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        self.partial.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file; an existing file at `path` stays as it was."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - a half-written file is removed either way
            pass
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
