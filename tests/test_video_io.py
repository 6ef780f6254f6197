"""Video files as a player shows them (client/video_io.py), from inputs a probe of `streamdiff
render` fed it: a phone's rotated clip, a stream that changes resolution, a thumbnail stream
before the video, anamorphic pixels, and an output that must not be replaced by a failed run."""

from __future__ import annotations

import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from streamdiff.client.video_io import VideoInputError, VideoWriter, probe, read_frames


def _frame(w: int, h: int) -> np.ndarray:
    """A picture whose orientation shows: a red block in the top-left corner on grey."""
    rgb = np.full((h, w, 3), 128, np.uint8)
    rgb[: h // 3, : w // 3] = (255, 0, 0)
    return rgb


def _write(path, frames, fps=15, codec="libx264", fmt=None, sar=None, **streams):
    with av.open(str(path), "w", format=fmt) as out:
        v = out.add_stream(codec, rate=fps)
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = "yuv420p"
        if sar:
            v.codec_context.sample_aspect_ratio = sar
        for rgb in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)


def _set_tkhd(path, a: int, b: int, c: int, d: int) -> None:
    """Set an mp4's track display matrix [a b; c d] (each -1, 0 or 1), as a phone does."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    matrix = at + 8 + (16 if version == 1 else 8) + 8 + (8 if version == 1 else 4) + 16
    a, b, c, d = ((v * 0x00010000) & 0xFFFFFFFF for v in (a, b, c, d))
    data[matrix:matrix + 36] = struct.pack(">9I", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))


def _rotate_tkhd(path, degrees_clockwise: int) -> None:
    """A portrait clip stored landscape, as a phone writes it."""
    _set_tkhd(path, *{90: (0, 1, -1, 0), 270: (0, -1, 1, 0), 180: (-1, 0, 0, -1)}[degrees_clockwise])


@pytest.mark.parametrize("clockwise, turns", [(90, -1), (180, 2), (270, 1)])
def test_a_rotated_clip_is_read_as_a_player_shows_it(tmp_path, clockwise, turns):
    path = tmp_path / "phone.mp4"
    stored = [_frame(64, 48)] * 3
    _write(path, stored)
    _rotate_tkhd(path, clockwise)
    info = probe(path)
    shown = np.rot90(stored[0], turns)
    assert (info.width, info.height) == (shown.shape[1], shown.shape[0])
    frames = list(read_frames(path, (info.width, info.height)))
    assert len(frames) == 3 and frames[0].shape == shown.shape
    assert np.abs(frames[1].astype(int) - shown).mean() < 6  # the red corner where a player puts it


@pytest.mark.parametrize("matrix, shown", [
    ((-1, 0, 0, 1), lambda rgb: rgb[:, ::-1]),  # mirrored left-right (a front camera's): its angle reads 180
    ((1, 0, 0, -1), lambda rgb: rgb[::-1]),  # mirrored top-bottom
    ((0, 1, 1, 0), lambda rgb: rgb.transpose(1, 0, 2)),  # turned a quarter and mirrored: the diagonal
], ids=["left-right", "top-bottom", "diagonal"])
def test_a_mirrored_clip_is_read_as_a_player_shows_it(tmp_path, matrix, shown):
    """A probe: a display matrix that mirrors the picture was read by its angle alone, and a
    left-right mirror (180 degrees by that angle) came out upside down. As FFmpeg's autorotate
    (ffplay, ffmpeg) reads it: the same frames as the unmarked file's, mirrored."""
    plain, marked = tmp_path / "plain.mp4", tmp_path / "marked.mp4"
    stored = [np.roll(_frame(64, 48), 5 * k, axis=1) for k in range(3)]
    _write(plain, stored)
    _write(marked, stored)
    _set_tkhd(marked, *matrix)
    want = [shown(rgb) for rgb in read_frames(plain)]
    info = probe(marked)
    assert (info.width, info.height) == (want[0].shape[1], want[0].shape[0])
    got = list(read_frames(marked))
    assert len(got) == 3 and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_names_with_a_colon_are_files(tmp_path, monkeypatch):
    """A probe: `12:30.mp4` was opened as the protocol `12:` (refused as input: "not a video
    PyAV can read"; as output it failed after the whole render)."""
    monkeypatch.chdir(tmp_path)
    with VideoWriter("12:30.mp4", 64, 48, 15) as writer:
        writer.write([_frame(64, 48)] * 4)
    assert (tmp_path / "12:30.mp4").is_file() and probe("12:30.mp4").frames == 4
    assert len(list(read_frames("12:30.mp4"))) == 4


def test_a_url_or_an_empty_name_is_said_as_typed():
    """A CLI probe: `--input http://host/clip.mp4` was "input not found: http:/host/clip.mp4" (one
    slash dropped) and `--input ""` (an unset variable) ". is a folder"."""
    with pytest.raises(VideoInputError, match=r"^http://127\.0\.0\.1:9/x\.mp4 is a URL: render reads local files"):
        probe("http://127.0.0.1:9/x.mp4")
    with pytest.raises(VideoInputError, match=r"^--input is empty"):
        probe("")


def test_a_writer_that_fails_takes_away_the_folders_it_made(tmp_path):
    """A probe: a render that failed (an input with no frames) or was stopped left the folders
    of its --output behind, empty. A folder something else was put in meanwhile stays."""
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "new" / "deep" / "o.mp4", 64, 48, 15) as writer:
            writer.write([_frame(64, 48)] * 2)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "new" / "deep" / "o.mp4", 64, 48, 15) as writer:
            (tmp_path / "new" / "notes.txt").write_text("mine")
            raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["notes.txt"]


def test_a_stream_that_changes_resolution_keeps_one_size_with_a_warning(tmp_path, caplog):
    def raw(w, h, n):
        cc = av.CodecContext.create("libx264", "w")
        cc.width, cc.height, cc.pix_fmt, cc.time_base = w, h, "yuv420p", Fraction(1, 15)
        data = b""
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_frame(w, h), format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            data += b"".join(bytes(p) for p in cc.encode(frame))
        return data + b"".join(bytes(p) for p in cc.encode(None))

    path = tmp_path / "change.h264"
    path.write_bytes(raw(64, 48, 4) + raw(96, 80, 4))
    info = probe(path)
    frames = list(read_frames(path, (info.width, info.height)))
    assert [f.shape for f in frames] == [(48, 64, 3)] * 8
    said = [r.getMessage() for r in caplog.records if "changes resolution" in r.getMessage()]
    assert len(said) == 1 and "at frame 4 (96x80 after 64x48)" in said[0]


def test_the_main_video_stream_is_read_not_a_thumbnail_before_it(tmp_path):
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as out:
        thumb = out.add_stream("mjpeg", rate=1)
        thumb.width, thumb.height, thumb.pix_fmt = 32, 32, "yuvj420p"
        main = out.add_stream("libx264", rate=15)
        main.width, main.height, main.pix_fmt = 64, 48, "yuv420p"
        for p in thumb.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
            out.mux(p)
        for _ in range(6):
            for p in main.encode(av.VideoFrame.from_ndarray(_frame(64, 48), format="rgb24")):
                out.mux(p)
        for stream in (thumb, main):
            for p in stream.encode(None):
                out.mux(p)
    info = probe(path)
    assert (info.width, info.height) == (64, 48)
    assert len(list(read_frames(path, (64, 48)))) == 6


def test_probe_reports_anamorphic_pixels_and_audio(tmp_path):
    path = tmp_path / "sar.mp4"
    _write(path, [_frame(64, 48)] * 2, sar=Fraction(4, 3))
    assert probe(path).sample_aspect == Fraction(4, 3) and not probe(path).has_audio
    out = tmp_path / "kept.mp4"
    with VideoWriter(out, 64, 48, 15, sample_aspect=Fraction(4, 3)) as writer:
        writer.write([_frame(64, 48)] * 2)
    assert probe(out).sample_aspect == Fraction(4, 3)


def test_a_writer_that_fails_leaves_the_existing_output_as_it_was(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"a good render from yesterday")
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, 64, 48, 15) as writer:
            writer.write([_frame(64, 48)] * 3)
            raise KeyboardInterrupt  # Ctrl-C, or a decode error, mid-render
    assert out.read_bytes() == b"a good render from yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no partial file left
    with VideoWriter(out, 64, 48, 15) as writer:
        writer.write([_frame(64, 48)] * 3)
    assert probe(out).width == 64 and len(list(read_frames(out, (64, 48)))) == 3


def _vfr(path, times, with_audio=False):
    """A variable-frame-rate Matroska file: frames at `times` (seconds), optional 1 s of AAC."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=15)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        v.codec_context.time_base = Fraction(1, 1000)
        a = out.add_stream("aac", rate=48000, layout="mono") if with_audio else None  # before any packet
        for t in times:
            frame = av.VideoFrame.from_ndarray(_frame(64, 48), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        if a is not None:
            for k in range(50):
                sound = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
                sound.sample_rate, sound.pts = 48000, k * 960
                for p in a.encode(sound):
                    out.mux(p)
            for p in a.encode(None):
                out.mux(p)


def _with_tone(path, codec: str) -> None:
    """Six frames and half a second of a 440 Hz tone from t = 0 (its encoder's first packet
    starts before 0: AAC's priming, Opus's pre-skip)."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libvpx-vp9" if str(path).endswith(".webm") else "libx264", rate=15)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream(codec, rate=48000, layout="mono")
        size = a.codec_context.frame_size or 960
        for k in range(6):
            for p in v.encode(av.VideoFrame.from_ndarray(_frame(64, 48), format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        for k in range(24000 // size):
            t = np.arange(k * size, (k + 1) * size) / 48000
            sound = av.AudioFrame.from_ndarray((0.1 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32),
                                               format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 48000, k * size
            for p in a.encode(sound):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)


def _first_samples(path, n: int = 2048) -> np.ndarray:
    with av.open(str(path)) as c:
        got = np.concatenate([f.to_ndarray()[0] for f in c.decode(c.streams.audio[0])])
    return got[:n]


@pytest.mark.parametrize("codec, suffix", [("aac", ".mp4"), ("libopus", ".mkv"), ("libopus", ".webm")])
def test_copied_audio_keeps_the_packet_its_decoder_starts_with(tmp_path, codec, suffix):
    """A probe: the packet before t = 0 (AAC's priming, Opus's pre-skip) was dropped as audio
    from before the first frame, and the output's first 20 ms decoded faded (AAC) or began 21 ms
    late (Opus). The output's sound is the input's from its first sample."""
    src, out = tmp_path / f"talk{suffix}", tmp_path / f"out{suffix}"
    _with_tone(src, codec)
    with VideoWriter(out, 64, 48, 15, audio_from=src) as writer:
        writer.write([_frame(64, 48)] * 6)
    assert writer.audio_kept
    want, got = _first_samples(src), _first_samples(out)
    assert np.sqrt(np.mean(want ** 2)) > 0.05  # the tone is there from the start
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


def _shown_times(path) -> list[float]:
    with av.open(str(path)) as c:
        return [round(float(f.pts * f.time_base), 3) for f in c.decode(c.streams.video[0])]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_variable_frame_rate_keeps_its_timing_and_its_audio(tmp_path, suffix):
    """A screen recording or a phone clip with gaps: the output ran at the average rate (a 4 s clip
    came out 0.8 s long), which puts copied audio out of sync. The Matroska output also lost its
    frames once audio was copied into it (its packets carry no dts)."""
    import collections

    src = tmp_path / "vfr.mkv"
    shown = [0.0, 0.067, 0.133, 0.5, 0.567, 0.9, 0.933]
    _vfr(src, shown, with_audio=True)
    times = collections.deque()
    out = tmp_path / f"out{suffix}"
    with VideoWriter(out, 64, 48, probe(src).fps, times=times, audio_from=src) as writer:
        for rgb in read_frames(src, (64, 48), times):
            writer.write([rgb])
    assert writer.audio_kept
    assert _shown_times(out) == shown
    # a probe: with audio copied in, the Matroska file said 30000 fps (its track's default
    # duration from the writer's 1/90000 time base), and rendering it again into an .avi failed
    if suffix == ".mkv":  # (an MP4's average rate is its frames over its length: 7 fps here)
        with av.open(str(out)) as c:
            assert c.streams.video[0].average_rate == probe(src).fps, c.streams.video[0].average_rate
    with av.open(str(out)) as c:
        ends = [float((p.pts + p.duration) * p.time_base) for p in c.demux(c.streams.audio[0]) if p.pts is not None]
    assert 0.9 < max(ends) < 1.05  # cut where the last frame ends (0.933 + one average period)


def test_a_webm_output_is_vp9_keeps_the_timing_and_leaves_out_audio_it_cannot_hold(tmp_path):
    """`render --output x.webm` (what a browser plays and records) was refused: the writer asked
    for H.264, which WebM cannot hold. It gets VP9, per-frame times like Matroska, and an AAC
    track, which WebM cannot hold either, is left out (the CLI then says to use .mkv)."""
    import collections

    src = tmp_path / "vfr.mkv"
    shown = [0.0, 0.067, 0.133, 0.5, 0.567, 0.9, 0.933]
    _vfr(src, shown, with_audio=True)  # AAC
    times = collections.deque()
    out = tmp_path / "out.webm"
    with VideoWriter(out, 64, 48, probe(src).fps, times=times, audio_from=src) as writer:
        for rgb in read_frames(src, (64, 48), times):
            writer.write([rgb])
    assert not writer.audio_kept
    assert _shown_times(out) == shown
    with av.open(str(out)) as c:
        assert c.format.name.startswith("matroska") and c.streams.video[0].codec_context.name == "vp9"
        assert not c.streams.audio
    got = np.stack(list(read_frames(out)))
    want = np.stack(list(read_frames(src, (64, 48))))
    assert 10 * np.log10(255**2 / np.mean((got.astype(float) - want) ** 2)) > 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.webm", "vfr.mkv"]


def test_an_interrupt_while_the_audio_is_copied_leaves_no_file(tmp_path, monkeypatch):
    """A probe: Ctrl-C (or SIGTERM) while `close()` copied the source's audio in left the hidden
    partial file and the half-copied `.audio` file behind, the second one looking complete."""
    from streamdiff.client import video_io

    src = tmp_path / "vfr.mkv"
    _vfr(src, [0.0, 0.067, 0.133, 0.2], with_audio=True)
    out = tmp_path / "out.mkv"
    out.write_bytes(b"a good render from yesterday")
    real_merge = video_io.heapq.merge

    def interrupted(*args, **kwargs):
        for k, item in enumerate(real_merge(*args, **kwargs)):
            if k == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(video_io.heapq, "merge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, 64, 48, 15, audio_from=src) as writer:
            writer.write([_frame(64, 48)] * 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mkv", "vfr.mkv"]
    assert out.read_bytes() == b"a good render from yesterday"


def _bands(w: int, h: int, side: int) -> np.ndarray:
    """Red columns `side` pixels wide at the left and right edges, green between."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :, 1] = 255
    rgb[:, :side], rgb[:, w - side:] = (255, 0, 0), (255, 0, 0)
    return rgb


def test_another_shape_is_centre_cropped_not_stretched(tmp_path):
    """A probe: `render --size 256x256` of a 640x480 clip squashed a circle to 0.74 of its height
    (the server crops a camera to the model's shape). The 64x48 clip's 8-pixel red sides fall
    outside its centre 48x48 square; scaled instead, they would be a quarter of the frame. Square
    pixels asked of a 4:3-pixel file (a 64x48 frame shown 85x48) cut more: still nothing red."""
    path = tmp_path / "wide.mp4"
    _write(path, [_bands(64, 48, 8)] * 3)
    for frame in read_frames(path, (32, 32)):
        assert frame.shape == (32, 32, 3)
        assert frame[..., 0].mean() < 20 and frame[..., 1].mean() > 230, frame[..., 0].mean()
    wide = tmp_path / "anamorphic.mp4"
    _write(wide, [_bands(64, 48, 14)] * 3, sar=Fraction(4, 3))
    for frame in read_frames(wide, (32, 32)):
        assert frame[..., 0].mean() < 20, frame[..., 0].mean()
    kept = list(read_frames(wide, (64, 48), sample_aspect=Fraction(4, 3)))  # its own shape: as it is
    assert kept[0][:, :8, 0].mean() > 200


def test_a_damaged_matroska_file_is_said_to_end_early_and_a_trimmed_mp4_is_not(tmp_path, caplog):
    """Probes: a Matroska file (no frame count in it) with damage inside rendered 1 of its 40
    frames without a word; an MP4 trimmed without re-encoding (an edit list hides its first
    frames, which it still counts) was "cut short or damaged?" with every frame there. The
    length the container gives decides: the first is said, the second is not."""
    from streamdiff.pipeline.frames import synthetic_clip

    whole, bad = tmp_path / "rec.mkv", tmp_path / "bad.mkv"
    with VideoWriter(whole, 64, 48, 24.0) as writer:
        writer.write(synthetic_clip(40, 64, 48, seed=3))
    data = bytearray(whole.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    bad.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="streamdiff.client.video_io"):
        assert len(list(read_frames(whole))) == 40 and not caplog.records
        shown = len(list(read_frames(bad)))
    assert 0 < shown < 40 and len(caplog.records) == 1, caplog.text
    assert f"({shown} frames) of the 1.67 s its container lists (cut short or damaged?)" in caplog.text

    caplog.clear()
    mp4, trimmed = tmp_path / "whole.mp4", tmp_path / "trimmed.mp4"
    with VideoWriter(mp4, 64, 48, 24.0) as writer:
        writer.write(synthetic_clip(40, 64, 48, seed=3))
    with av.open(str(mp4)) as src, av.open(str(trimmed), "w") as dst:  # `ffmpeg -ss ... -c copy`
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        cut = 9 * round(1 / (stream.average_rate * stream.time_base))  # nine frames before t = 0
        for packet in src.demux(stream):
            if packet.size:
                packet.pts, packet.dts, packet.stream = packet.pts - cut, packet.dts - cut, out
                dst.mux(packet)
    with av.open(str(trimmed)) as c:
        assert c.streams.video[0].frames == 40  # the case: it counts the hidden frames
    with caplog.at_level("WARNING", logger="streamdiff.client.video_io"):
        assert len(list(read_frames(trimmed))) == 31
    assert not caplog.records, caplog.text


def test_a_damaged_packet_is_skipped_not_fatal(tmp_path, caplog):
    """A probe: one bad packet in a 40-frame clip (players step over it; 35 frames decode) ended
    `render` with 'decoding failed' after 13 frames, the work thrown away. The frames around it
    still come, in order, with their times; one warning says what was skipped."""
    import collections

    clean, bad = tmp_path / "clean.ts", tmp_path / "bad.ts"  # MPEG-TS: parameter sets in-band, remuxed as they are
    _write(clean, [np.roll(_frame(64, 48), 3 * k, axis=1) for k in range(20)])
    with av.open(str(clean)) as src, av.open(str(bad), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        for n, packet in enumerate(p for p in src.demux(stream) if p.dts is not None):
            if n == 10:  # garbage where a P-frame was, at that frame's time
                damaged = av.Packet(b"\x00\x00\x00\x01\x65" + bytes(range(7, 250)) * 2)
                damaged.pts, damaged.dts, damaged.time_base = packet.pts, packet.dts, packet.time_base
                packet = damaged
            packet.stream = out
            dst.mux(packet)
    with pytest.raises(av.InvalidDataError), av.open(str(bad)) as c:  # what a plain decode does
        list(c.decode(c.streams.video[0]))
    times = collections.deque()
    with caplog.at_level("WARNING", logger="streamdiff.client.video_io"):
        frames = list(read_frames(bad, (64, 48), times))
    assert len(frames) == 19 and frames[0].shape == (48, 64, 3)
    assert list(times) == sorted(times) and len(times) == len(frames)
    assert "damaged packet" in caplog.text


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
def test_uneven_times_give_the_length_the_frames_take(tmp_path, suffix):
    """A probe: an animated GIF (frames at 0 .. 1.2 s) rendered to an MP4 that said it was 0.98 s
    long (its length came from the last dts, which B-frames put behind the times), so a player
    that keeps to the length cuts the last frames. The length is the last frame's time plus one
    average period (as the audio is cut), in every container."""
    import collections

    shown = [0.0, 0.1, 0.2, 0.5, 0.6, 0.7, 1.2]
    rate = Fraction(50, 9)
    out = tmp_path / f"out{suffix}"
    with VideoWriter(out, 64, 48, float(rate), times=collections.deque(shown)) as writer:
        writer.write(np.stack([np.roll(_frame(64, 48), 5 * k, axis=1) for k in range(len(shown))]))
    assert _shown_times(out) == shown
    with av.open(str(out)) as c:
        assert c.duration / 1e6 == pytest.approx(1.2 + 1 / rate, abs=0.01)


def test_an_avi_is_read_back_with_its_frames_times_in_order(tmp_path):
    """A probe: libx264's B-frames in an .avi (a container without presentation times) came back
    with their times out of order (0.126, 0.502, 0.377, ...); without B-frames every H.264 frame
    still came back one period late (0.125, 0.25, ...: FFmpeg's guess for H.264 in AVI), a frame
    out of sync with copied audio. An .avi gets MPEG-4 Part 2, the codec AVI was made for."""
    rng = np.random.default_rng(0)
    writer = VideoWriter(tmp_path / "o.avi", 64, 48, 8)
    writer.write(rng.integers(0, 255, (24, 48, 64, 3), dtype=np.uint8))
    writer.close()
    with av.open(str(tmp_path / "o.avi")) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert times == pytest.approx([k / 8 for k in range(24)]), times


def test_frame_times_count_from_the_first_frame(tmp_path):
    """A clip cut from a longer recording starts at its cut (1 s here): the times the writer takes
    count from the first frame, so the output starts with a frame, not a second of nothing."""
    src = tmp_path / "cut.mkv"
    shown = [1.0, 1.067, 1.133, 1.5, 1.567]
    _vfr(src, shown)
    times = []
    assert len(list(read_frames(src, (64, 48), times))) == 5
    assert times == pytest.approx([t - 1.0 for t in shown], abs=1e-3)


def test_a_repeated_or_missing_time_takes_one_period_after_the_last(tmp_path):
    """The writer's fallback: a frame whose time is missing or not after the last one's is shown
    one frame period after it (two frames at one time would be one the muxer refuses)."""
    import collections

    out = tmp_path / "o.mkv"
    with VideoWriter(out, 64, 48, 10.0, times=collections.deque([0.0, 0.1, 0.1, None, 0.5])) as writer:
        writer.write(np.stack([np.roll(_frame(64, 48), 5 * k, axis=1) for k in range(5)]))
    assert _shown_times(out) == [0.0, 0.1, 0.2, 0.3, 0.5]
