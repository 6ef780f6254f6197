"""Video files in and out with PyAV, for `streamdiff render` and the benchmark clips.

Owns: decoding any container/codec PyAV reads into uint8 RGB frames (optionally resized on
the way in), and encoding frames to a video file. Does not own: what is done to the frames.
(Only server/ and client/ import av; the core library never does.)
"""

from __future__ import annotations

import collections
import heapq
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


log = logging.getLogger(__name__)
TIME_BASE = Fraction(1, 90_000)  # frame times of a written file that keeps its input's timing
TIMED_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm")  # containers with per-frame times (AVI: a fixed rate)
DTS_LENGTH_SUFFIXES = (".mp4", ".m4v", ".mov")  # their length is the last dts + its duration (Matroska: pts)


class VideoInputError(ValueError):
    """The input is missing, not a video, or has no video stream."""


@dataclass
class VideoInfo:
    width: int  # as displayed: a phone's portrait clip (stored landscape, rotated 90) is taller than wide
    height: int
    fps: float
    frames: int  # 0 when the container does not say
    sample_aspect: Fraction | None = None  # pixels that are not square (anamorphic video)
    has_audio: bool = False
    seconds: float = 0.0  # how long the container says the video lasts (0: it does not say)


def _local(path: str | Path) -> str:
    """A file's name as FFmpeg opens it as a file: absolute, so that a name with a colon
    (`12:30.mp4`, `take2:final.mkv`) is not read as a protocol (`12:` refused, a probe)."""
    return str(Path(path).absolute())


def _video_stream(container):
    """The stream a player shows: FFmpeg's best video stream, as ffplay picks it (a default one
    first; an attached cover picture or thumbnail last, even when it comes first). Of two
    ordinary streams that is not the larger one: the file's own choice wins, as in a player."""
    return container.streams.best("video") or container.streams.video[0]


def _rotation(frame) -> int:
    """The display matrix's angle: degrees counter-clockwise (0-359; 180 for a mirrored picture too)."""
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def _display_matrix(frame) -> np.ndarray | None:
    side = frame.side_data
    for entry in side:  # PyAV up to 18.1.0 iterates the side data itself, 18.1.1 its types (a Mapping's keys)
        data = entry if hasattr(entry, "type") else side[entry]
        if getattr(data.type, "name", "") == "DISPLAYMATRIX" and len(raw := bytes(data)) == 36:
            return np.frombuffer(raw, dtype=np.int32)
    return None


# How a picture is turned and flipped as stored, to be shown (FFmpeg's names, its transpose filter's)
_SHOWN = {
    "clock": lambda rgb: np.rot90(rgb, -1),
    "cclock": lambda rgb: np.rot90(rgb, 1),
    "cclock_flip": lambda rgb: rgb.transpose(1, 0, 2),  # the main diagonal
    "clock_flip": lambda rgb: np.rot90(rgb, -1)[::-1],  # the other diagonal
    "hflip": lambda rgb: rgb[:, ::-1],
    "vflip": lambda rgb: rgb[::-1],
}


def _orientation(frame) -> tuple[str, ...]:
    """What a player does to the stored picture to show it, as FFmpeg's autorotate reads the
    display matrix (ffplay, ffmpeg): its angle, to the nearest quarter turn, and its mirroring,
    which the angle alone does not say (a left-right mirrored clip reads as 180 degrees: a probe
    got it upside down)."""
    if (m := _display_matrix(frame)) is None:
        return ()
    quarter = round(((-_rotation(frame)) % 360) / 90) % 4  # clockwise, as FFmpeg turns it
    if quarter == 1:
        return ("cclock_flip",) if m[3] > 0 else ("clock",)
    if quarter == 2:
        return tuple(op for op, flipped in (("hflip", m[0] < 0), ("vflip", m[4] < 0)) if flipped)
    if quarter == 3:
        return ("clock_flip",) if m[3] < 0 else ("cclock",)
    return ("vflip",) if m[4] < 0 else ()


def _turned(ops: tuple[str, ...]) -> bool:
    """The shown picture is the stored one's height wide."""
    return any(op in ("clock", "cclock", "cclock_flip", "clock_flip") for op in ops)


def _shown(rgb: np.ndarray, ops: tuple[str, ...]) -> np.ndarray:
    for op in ops:
        rgb = _SHOWN[op](rgb)
    return np.ascontiguousarray(rgb) if ops else rgb


def probe(path: str | Path) -> VideoInfo:
    given = str(path)  # as typed: Path makes "" the folder "." and drops a URL's second slash (a probe)
    path = Path(path)
    if not given.strip():
        raise VideoInputError("--input is empty (an unset variable?): give a video file (or 'synthetic')")
    if path.is_dir():
        raise VideoInputError(f"{path} is a folder: give a video file (or 'synthetic')")
    if not path.is_file():
        if "://" in given:
            raise VideoInputError(f"{given} is a URL: render reads local files; download it first")
        raise VideoInputError(f"input not found: {path}")
    try:
        with av.open(_local(path)) as container:
            if not container.streams.video:
                raise VideoInputError(f"{path} has no video stream")
            stream = _video_stream(container)
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            width, height = stream.codec_context.width, stream.codec_context.height
            first = next(container.decode(stream), None)  # the display matrix rides on the frames
            if first is not None and _turned(_orientation(first)):
                width, height = height, width
            sar = stream.sample_aspect_ratio
            return VideoInfo(width, height, float(rate), stream.frames or 0,
                             Fraction(sar) if sar and sar != 1 else None, bool(container.streams.audio),
                             _listed_seconds(container, stream))
    except av.FFmpegError as exc:
        raise VideoInputError(f"{path} is not a video PyAV can read ({exc.__class__.__name__})") from exc


def read_frames(path: str | Path, size: tuple[int, int] | None = None,
                times: list | None = None, sample_aspect: Fraction | None = None) -> Iterator[np.ndarray]:
    """Yield frames [H, W, 3] uint8 as a player shows them (turned by the file's display rotation),
    resized to size=(width, height) if given, else to the first frame's size (a stream that
    changes resolution midway, which H.264 allows, keeps one size, with a warning). A frame whose
    shown shape differs from the size's is centre-cropped to it first, never stretched (as the
    server crops a camera): `sample_aspect` is the pixel shape the frames are for (None: square;
    a file's own, to keep its anamorphic pixels). `times`: each frame's presentation time (seconds
    after the first frame; None if the file gives none) is appended to it as the frame is yielded,
    for a writer that keeps a variable frame rate."""
    try:
        with av.open(_local(path)) as container:
            stream = _video_stream(container)
            stream.thread_type = "AUTO"
            pixel_in = Fraction(stream.sample_aspect_ratio or 1) or Fraction(1)
            pixel_out = Fraction(sample_aspect or 1)
            target, first = size, None  # (width, height) as displayed; the first frame's stored size
            start = end = None  # the first frame's time, the end of the last one's (s)
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            n = -1
            for n, frame in enumerate(_decode_skipping_damage(container, stream, path)):
                ops = _orientation(frame)
                turned = _turned(ops)
                if first is None:
                    first = (frame.width, frame.height)
                    target = target or (first[::-1] if turned else first)
                elif (frame.width, frame.height) != first:
                    log.warning("%s changes resolution at frame %d (%dx%d after %dx%d); every frame is scaled to "
                                "%dx%d", path, n, frame.width, frame.height, *first, *target)
                    first = (frame.width, frame.height)
                stored = target[::-1] if turned else target
                if (frame.width, frame.height) == stored:
                    rgb = frame.to_ndarray(format="rgb24")
                else:  # the output's pixels as stored: a turned frame's are turned too
                    rgb = to_model_frame(frame, *stored, pixel_in / (1 / pixel_out if turned else pixel_out))
                t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                start = t if start is None else start
                end = None if t is None else t + float((frame.duration or 0) * frame.time_base or 1 / rate)
                if times is not None:
                    times.append(None if t is None or start is None else t - start)
                yield _shown(rgb, ops)
            else:  # read to its end (not stopped by --frames): did the file hold what it says?
                _say_if_cut_short(path, container, stream, n + 1, None if start is None or end is None else end - start)
    except av.FFmpegError as exc:
        raise VideoInputError(f"{path}: decoding failed ({exc.__class__.__name__}: {exc})") from exc


def _listed_seconds(container, stream) -> float:
    """How long the container says the video stream lasts (0: it does not say): the stream's
    duration, a Matroska track's DURATION tag (OBS's and FFmpeg's recordings), or the file's
    where it holds nothing else."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if m := re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", stream.metadata.get("DURATION", "").strip()):
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    return container.duration / av.time_base if container.duration and len(container.streams) == 1 else 0.0


def _say_if_cut_short(path, container, stream, frames: int, seconds: float | None) -> None:
    """One warning when the video ended well before its container says it lasts (a cut or
    damaged file). Its length decides where it is known: a Matroska file lists no frame count
    (one with damage inside rendered 1 of 40 frames without a word) and a trimmed MP4 lists the
    frames its edit list hides (31 shown of 40 was a false alarm); else the frame count."""
    listed_s, listed = _listed_seconds(container, stream), stream.frames or 0
    rate = float(stream.average_rate or stream.guessed_rate or 30)
    if listed_s and seconds is not None:
        short = seconds < listed_s - max(2 / rate, 0.02 * listed_s)
    else:
        short = bool(listed) and frames < listed
    if not short:
        return
    if listed and frames < listed:
        log.warning("%s ended after %d of the %d frames its container lists (cut short or damaged?)",
                    path, frames, listed)
    else:
        log.warning("%s ended after %.2f s (%d frame%s) of the %.2f s its container lists (cut short or damaged?)",
                    path, seconds, frames, "" if frames == 1 else "s", listed_s)


def _decode_skipping_damage(container, stream, path) -> Iterator[av.VideoFrame]:
    """The stream's frames, packet by packet: a packet the decoder calls invalid (a damaged
    stretch of a camera's or a download's file, which players step over) is skipped, with one
    warning at the end, instead of ending the render and discarding what it had done."""
    damaged = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                damaged += 1
                continue
            yield from frames
    finally:  # said also when the reader stops early (--frames, an interrupted render)
        if damaged:
            log.warning("%s: %d damaged packet(s) could not be decoded and were skipped (their frames are missing)",
                        path, damaged)


def same_aspect(frame: av.VideoFrame, width: int, height: int, pixel: Fraction | int = 1) -> bool:
    """The frame, its pixels `pixel` times as wide as high, shows the shape width:height."""
    return frame.width * pixel * height == frame.height * width


def to_model_frame(frame: av.VideoFrame, width: int, height: int, pixel: Fraction | int = 1) -> np.ndarray:
    """A frame as the model takes it: centre-cropped to width:height (a 4:3 webcam or a 16:9 OBS
    scene into a square model loses its sides instead of being squashed), then scaled: uint8
    [height, width, 3]. `pixel`: how much wider than high the frame's pixels are against the
    result's (anamorphic video). One swscale pass at the size that keeps the frame's shape,
    then a slice. The server takes camera frames with it (square pixels: integer arithmetic per
    frame), `streamdiff render` file frames."""
    if same_aspect(frame, width, height, pixel):
        return frame.to_ndarray(format="rgb24", width=width, height=height)
    shown_w, fh = frame.width * pixel, frame.height
    scale = max(width / shown_w, height / fh)
    sw, sh = max(width, round(shown_w * scale)), max(height, round(fh * scale))
    pixels = frame.to_ndarray(format="rgb24", width=sw, height=sh)  # [sh, sw, 3]
    x0, y0 = (sw - width) // 2, (sh - height) // 2
    return np.ascontiguousarray(pixels[y0 : y0 + height, x0 : x0 + width])


def add_audio(video: str | Path, source: str | Path, out: str | Path, until_s: float | None = None,
              rate: Fraction | None = None) -> bool:
    """Write `out`: `video`'s video stream and `source`'s first audio stream, both copied as they
    are (no re-encoding), interleaved by time; the audio is shifted by the source video's start,
    so that it stays in sync with frames that now start at 0, and ends at `until_s` (the video's
    length, when fewer frames than the source's were rendered). False (and no `out`) when the
    output's container cannot hold that audio codec (Opus in an .avi, for one). `rate`: the
    video's frame rate (default: its stream's average rate), which a copied stream does not keep
    by itself (a probe: an .mkv with audio said 30000 fps, from the writer's 1/90000 time base)."""
    try:
        with av.open(_local(source)) as src, av.open(_local(video)) as vid, av.open(_local(out), "w") as dst:
            a_in, v_in = src.streams.audio[0], vid.streams.video[0]
            v_out, a_out = dst.add_stream_from_template(v_in), dst.add_stream_from_template(a_in)
            if rate or v_in.average_rate:
                v_out.codec_context.framerate = rate or v_in.average_rate
            src_video = _video_stream(src)
            shift = float(src_video.start_time * src_video.time_base) if src_video.start_time else 0.0
            lag = round(shift / a_in.time_base) if shift else 0

            def timed(packets, stream, offset):
                before = None  # the audio packet just before the first frame
                for packet in packets:
                    if packet.size == 0 or (packet.dts is None and packet.pts is None):  # end-of-stream marker
                        continue
                    if packet.pts is not None:
                        packet.pts -= offset
                    if packet.dts is not None:  # Matroska stores no dts: the muxer derives it
                        packet.dts -= offset
                    at = packet.dts if packet.dts is not None else packet.pts
                    if stream is a_out and until_s is not None and at * packet.time_base >= until_s:
                        return  # audio after the last frame: not read at all (30 minutes took a second)
                    if stream is a_out and at < 0:  # audio from before the first frame: only the
                        before = packet  # last packet stays, which the decoder needs to start (AAC's
                        continue  # priming, Opus's pre-skip: dropped, a probe heard the start faded)
                    for out in (before, packet) if before is not None else (packet,):
                        out.stream = stream
                        at = out.dts if out.dts is not None else out.pts
                        yield float(at * out.time_base), stream is a_out, out
                    before = None

            for _, _, packet in heapq.merge(timed(vid.demux(v_in), v_out, 0), timed(src.demux(a_in), a_out, lag),
                                            key=lambda item: item[:2]):
                dst.mux(packet)
    except (av.FFmpegError, ValueError) as exc:
        log.debug("copying the audio into %s failed: %s", out, exc)
        Path(out).unlink(missing_ok=True)
        return False
    except BaseException:  # Ctrl-C, SIGTERM: no half-copied file left behind
        Path(out).unlink(missing_ok=True)
        raise
    return True


class VideoWriter:
    """Encode uint8 RGB frames to a file (H.264 when the build has it, MPEG-4 otherwise and in an
    .avi). The file appears only when the writer closes without an error: until then it is a hidden partial file
    beside it, removed on an error or Ctrl-C, so a render that fails never replaces a good output
    with a broken one. `sample_aspect`: the pixels' shape, for anamorphic input kept at its size.
    `audio_from`: a file whose audio goes into the output as it is (`audio_kept` says if it could).
    `times`: a deque the reader fills with input frame times; each frame written takes the next,
    so a variable frame rate keeps its timing (and its audio its sync); a missing or non-increasing
    time falls back to one frame period after the last. Only where the container has per-frame
    times (`TIMED_SUFFIXES`); an AVI runs at the average rate."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float, codec: str | None = None,
                 sample_aspect: Fraction | None = None, audio_from: str | Path | None = None,
                 times: collections.deque | None = None):
        self.audio_from = audio_from
        self.times = times if Path(path).suffix.lower() in TIMED_SUFFIXES else None
        self._last_pts: int | None = None
        self._held = None  # the latest timed MP4/MOV packet: the last one's duration is set at close
        self._first_dts: int | None = None
        self.audio_kept = False
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.with_audio = self.path.with_name(f".{self.path.stem}.audio{self.path.suffix}")  # close() copies audio in
        # the folders this writer makes, deepest first: an error or Ctrl-C takes them away again
        # (a probe: a render that failed, or was stopped, left `out/new/deep` behind, empty)
        self.made = [folder for folder in self.path.absolute().parents if not folder.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.container = av.open(_local(self.partial), mode="w")
        except BaseException:
            self._remove_made_folders()
            raise
        rate = self.rate = Fraction(fps).limit_denominator(1001)
        # H.264 in an AVI is read back one frame period late (FFmpeg's guess without presentation
        # times): an AVI gets MPEG-4 Part 2, the codec the container was made for
        suffix = self.path.suffix.lower()
        avi = suffix == ".avi"
        if codec is None and suffix == ".webm":  # WebM holds VP8, VP9 or AV1 only
            codec = "libvpx-vp9" if "libvpx-vp9" in av.codecs_available else "libvpx"
        codec = codec or ("libx264" if "libx264" in av.codecs_available and not avi else "mpeg4")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        if self.times is not None:
            self.stream.codec_context.time_base = TIME_BASE
        if sample_aspect is not None:
            self.stream.codec_context.sample_aspect_ratio = sample_aspect
        if codec == "libx264":
            # AVI keeps no presentation times: with B-frames its frames were read back with their
            # times out of order (a probe: 0.126, 0.502, 0.377, ...)
            self.stream.options = {"crf": "18", "preset": "veryfast", **({"bf": "0"} if avi else {})}
        elif codec in ("libvpx-vp9", "libvpx"):  # constant quality near x264's crf 18; cpu-used 4: a 640x480
            self.stream.options = {"crf": "20", "b": "0", "cpu-used": "4",  # render keeps pace
                                   **({"row-mt": "1"} if codec == "libvpx-vp9" else {})}
        else:
            self.stream.bit_rate = 8_000_000
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if self.times is not None:
                frame.pts, frame.time_base = self._next_pts(), TIME_BASE
            for packet in self.stream.encode(frame):
                self._mux(packet)
            self.frames_written += 1

    def _mux(self, packet) -> None:
        """Mux; a timed stream's packets one late, so that the last can be given the duration that
        makes the video end where its last frame does. An MP4 takes its length from the last dts
        plus that packet's duration; with B-frames and uneven gaps the dts run behind the times
        (an animated GIF's MP4 said 0.98 s, its last frame starting at 1.2 s)."""
        if self.times is None or self.path.suffix.lower() not in DTS_LENGTH_SUFFIXES:
            self.container.mux(packet)
            return
        if self._first_dts is None and packet.dts is not None:
            self._first_dts = packet.dts
        if self._held is not None:
            self.container.mux(self._held)
        self._held = packet

    def _next_pts(self) -> int:
        t = self.times.popleft() if self.times else None
        step = round(1 / (self.rate * TIME_BASE))
        pts = round(t / TIME_BASE) if t is not None else None
        if self._last_pts is not None and (pts is None or pts <= self._last_pts):
            pts = self._last_pts + step
        self._last_pts = pts if pts is not None else 0
        return self._last_pts

    def close(self) -> None:
        """Finish the file and put it in place."""
        for packet in self.stream.encode(None):
            self._mux(packet)
        if self._held is not None:  # the last frame lasts one frame period after its time
            last, ends = self._held, self._last_pts + round(1 / (self.rate * TIME_BASE))
            if last.dts is not None and self._first_dts is not None:
                last.duration = max(last.duration or 0, ends - (last.dts - self._first_dts))
            self.container.mux(last)
            self._held = None
        self.container.close()
        if self.audio_from is not None:
            end_s = (float(self._last_pts * TIME_BASE + 1 / self.rate) if self._last_pts is not None
                     else float(self.frames_written / self.rate))
            self.audio_kept = add_audio(self.partial, self.audio_from, self.with_audio, end_s, self.rate)
            if self.audio_kept:
                self.with_audio.replace(self.partial)
        self.partial.replace(self.path)

    def abort(self) -> None:
        """Drop the partial files; an existing file at `path` stays as it was."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - a half-written file is removed either way
            pass
        self.partial.unlink(missing_ok=True)
        self.with_audio.unlink(missing_ok=True)
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        for folder in self.made:
            try:
                folder.rmdir()  # only while empty: something else put there stays, with its folders
            except OSError:
                return

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # an error or Ctrl-C while finishing (the audio copy): nothing half-done stays
            self.abort()
            raise
