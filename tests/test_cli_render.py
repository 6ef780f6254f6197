"""`streamdiff render` end to end: once in a subprocess as a user runs it (its stderr as a shell
shows it), the other cases in this process (`cli_here`: a child pays 3-5 s of start-up each),
and errors that must come before the model loads in a child without the model packages."""

from __future__ import annotations

import os
import subprocess
import sys

import av
import numpy as np
import pytest

from streamdiff.client.video_io import VideoWriter
from streamdiff.pipeline.frames import synthetic_clip

SMALL = ["--config", "tiny", "--set", "runtime.device=cpu"]


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "streamdiff.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# The CLI with the model and pipeline packages made unimportable: an error about the input must
# come before they load (they take seconds to import on a small CPU).
WITHOUT_MODEL = ("import sys; sys.modules.update(dict.fromkeys(['streamdiff.model', 'streamdiff.pipeline', 'torch']));"
                 "from streamdiff.cli import main; sys.exit(main(sys.argv[1:]))")


def run_cli_without_model(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", WITHOUT_MODEL, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def read_back(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, float(stream.average_rate)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """50 frames of moving shapes at 64x48, 24 fps (50 = 5 + 11*4 + 1: a trailing partial chunk)."""
    path = tmp_path_factory.mktemp("in") / "clip.mp4"
    with VideoWriter(path, 64, 48, 24.0) as writer:
        writer.write(synthetic_clip(50, 64, 48, seed=3))
    return path


def test_render_keeps_frame_count_size_and_rate(clip_file, tmp_path):
    out = tmp_path / "out.mp4"
    result = run_cli("render", "--input", str(clip_file), "--prompt", "oil painting", "--output", str(out), "-q", *SMALL)
    assert result.returncode == 0, result.stderr
    frames, fps = read_back(out)
    assert len(frames) == 50
    assert frames[0].shape == (48, 64, 3)
    assert fps == pytest.approx(24.0)
    assert np.std(frames[10]) > 1.0
    # tiny has random weights: the user is told the picture is noise, and what to run instead
    said = [line for line in result.stderr.splitlines() if "random weights" in line]
    assert len(said) == 1 and "noise" in said[0] and "--config demo" in said[0], result.stderr


def test_render_resizes_on_the_way_in(clip_file, tmp_path, cli_here):
    out = tmp_path / "small.mp4"
    rc, said, err = cli_here("render", "--input", str(clip_file), "--prompt", "x", "--output", str(out), "--size",
                             "32x32", "--steps", "1", *SMALL)
    assert rc == 0, err
    assert "wrote 50 frames 32x32" in said
    frames, _ = read_back(out)
    assert len(frames) == 50 and frames[0].shape == (32, 32, 3)


def test_render_synthetic_input(tmp_path, cli_here):
    out = tmp_path / "syn.mp4"
    rc, _, err = cli_here("render", "--input", "synthetic", "--frames", "13", "--prompt", "x", "--output", str(out),
                          "--size", "48x32", *SMALL)
    assert rc == 0, err
    assert len(read_back(out)[0]) == 13


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d / "missing.mp4", "input not found"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "is not a video PyAV can read"),
        (lambda d: d, "is a folder: give a video file"),
    ],
)
def test_bad_inputs_fail_with_one_line(tmp_path, make_input, message):
    path = make_input(tmp_path)
    result = run_cli_without_model("render", "--input", str(path), "--prompt", "x", "--output",
                                   str(tmp_path / "o.mp4"), *SMALL)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_size_the_vae_cannot_take_fails_cleanly(tmp_path):
    odd = tmp_path / "odd.mp4"
    with VideoWriter(odd, 72, 40, 10.0) as writer:
        writer.write(synthetic_clip(6, 72, 40))
    result = run_cli_without_model("render", "--input", str(odd), "--prompt", "x", "--output",
                                   str(tmp_path / "o.mp4"), *SMALL)
    assert result.returncode == 2, result.stderr
    assert "72x40" in result.stderr and "--size 64x32" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_frame_too_wide_is_refused_in_the_words_of_the_input(tmp_path):
    """A probe: a file 8320 pixels wide was refused as "video.width=8320 is out of range", a key
    the user never set, while --size 16384x16 rendered and --size 16400x16 was refused."""
    wide = tmp_path / "wide.mkv"
    with VideoWriter(wide, 8208, 16, 10.0) as writer:
        writer.write(np.zeros((2, 16, 8208, 3), np.uint8))
    result = run_cli_without_model("render", "--input", str(wide), "--prompt", "x", "--output",
                                   str(tmp_path / "o.mp4"), *SMALL)
    assert result.returncode == 2 and "8208x16" in result.stderr and "--size" in result.stderr, result.stderr
    assert "video.width" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = run_cli_without_model("render", "--input", "synthetic", "--size", "16384x16", "--prompt", "x",
                                   "--output", str(tmp_path / "o.mp4"), *SMALL)
    assert result.returncode == 2 and "'16384x16': width and height must be at most 8192" in result.stderr, result.stderr


def test_bad_config_override_fails_cleanly(clip_file, tmp_path, cli_here):
    rc, _, err = cli_here("render", "--input", str(clip_file), "--prompt", "x", "--output", str(tmp_path / "o.mp4"),
                          "--set", "cache.windw=4")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "unknown config key 'cache.windw'" in err


@pytest.mark.parametrize("prompt, said", [("a cyberpunk city", "'a photo'"), ("Starry night over my desk", "'starry night'"),
                                          ("mosaic", None)])
def test_render_says_what_the_demo_reads_a_prompt_as(tmp_path, prompt, said, cli_here):
    """The demo knows nine prompts; any other reads as one of them (mostly `a photo`): one line
    says so, unless the prompt is one of the nine as written."""
    rc, _, err = cli_here("render", "--config", "demo", "--input", "synthetic", "--frames", "5", "--prompt", prompt,
                          "--output", str(tmp_path / "o.mp4"), "-q")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("WARNING") and "reads --prompt" in line]
    if said is None:
        assert lines == [], err
    else:
        assert len(lines) == 1 and said in lines[0] and "starry night, stained glass" in lines[0], err


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(clip_file, tmp_path):
    """Found by trying: --output equal to --input rendered over the input file."""
    same = tmp_path / "mine.mp4"
    same.write_bytes(clip_file.read_bytes())
    result = run_cli_without_model("render", "--input", str(same), "--prompt", "x", "--output",
                                   f"{tmp_path}/./mine.mp4", *SMALL)  # another spelling (pathlib drops a "." part)
    assert result.returncode == 2 and "is the --input file" in result.stderr, result.stderr
    assert same.read_bytes() == clip_file.read_bytes()


def test_an_input_cut_short_is_rendered_with_a_warning(tmp_path, cli_here):
    """Found by trying: a cut mp4 (moov first, so it still opens) rendered a third of its frames
    and said nothing."""
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for rgb in synthetic_clip(40, 64, 48, seed=3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    rc, _, err = cli_here("render", "--input", str(cut), "--prompt", "x", "--output", str(tmp_path / "o.mp4"), "-q",
                          *SMALL)
    assert rc == 0, err
    warned = [line for line in err.splitlines() if "of the 40 frames its container lists" in line]
    assert len(warned) == 1, err
    written = len(read_back(tmp_path / "o.mp4")[0])
    assert 0 < written < 40 and f"ended after {written} of the 40" in warned[0]


def test_frames_beyond_an_intact_file_without_a_frame_count_is_no_warning(tmp_path, cli_here):
    """A probe: a whole Matroska file (OBS records them; the container lists no frame count)
    rendered with --frames 50 was "cut short or damaged" at its 30 frames."""
    mkv = tmp_path / "rec.mkv"
    with VideoWriter(mkv, 64, 48, 24.0) as writer:
        writer.write(synthetic_clip(30, 64, 48, seed=3))
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0  # the case: no count in the container
    out = tmp_path / "o.mp4"
    rc, _, err = cli_here("render", "--input", str(mkv), "--frames", "50", "--prompt", "x", "--output", str(out), "-q",
                          *SMALL)
    assert rc == 0, err
    assert "cut short" not in err, err
    assert len(read_back(out)[0]) == 30


def test_more_steps_than_the_noise_allows_are_named(tmp_path, cli_here):
    """At noise 0.2 the first step is t=100, and with StreamDiffusionV2's list a second re-noises to
    t=500 (the list is made for 0.7-0.8): the picture blurs, which the user is told in one line.
    The demo's own list (every later step below its first) says nothing."""
    from streamdiff.sampling.noise_schedule import renoised_above

    assert renoised_above(1, 0.2) is None and renoised_above(2, 0.2) == 500 and renoised_above(4, 0.55) == 500
    assert renoised_above(4, 0.8) is None and renoised_above(2, 0.62) is None
    assert renoised_above(4, 0.2, (100, 30, 15, 5)) is None
    for extra, warned in ((["--set", "sampling.timesteps=[700,500,400,200]"], True), ([], False)):
        rc, _, err = cli_here("render", "--input", "synthetic", "--frames", "5", "--prompt", "a photo", "--steps", "2",
                              "--output", str(tmp_path / "o.mp4"), "-q", *extra)
        assert rc == 0, err
        said = [line for line in err.splitlines() if "re-noises" in line]
        assert len(said) == int(warned), err
        if warned:
            assert "t=100" in said[0] and "t=500" in said[0] and "--steps 1" in said[0], err


def test_a_frame_size_that_cannot_fit_is_warned_about_before_the_run():
    """Found by trying: `render --size 4096x4096` on the demo grew past 8 GB before its first frame
    (the plan says 17 GiB) with no word; a size that fits says nothing. A probe: an 8K clip was
    warned about, then killed for memory minutes later (exit 137, no line): more than the machine
    has at all is refused."""
    from streamdiff.bench.memory_plan import GiB, memory_verdict
    from streamdiff.config import load_config

    cfg = load_config("demo")
    fatal, said = memory_verdict(cfg, 4096, 4096, available=8 * GiB, total=64 * GiB)
    assert not fatal and said.startswith("4096x4096 needs about ") and "8.0 GiB is free" in said, said
    assert "--size" in said and "likely run out" in said, said
    need = float(said.split("needs about ")[1].split(" GiB")[0])
    assert 10 < need < 40, said  # the plan's count, not a guess
    assert memory_verdict(cfg, 4096, 4096, available=64 * GiB) is None
    fatal, said = memory_verdict(cfg, 4096, 4096, available=6 * GiB, total=8 * GiB)
    assert fatal and "this machine has 8.0 GiB in all" in said and "cannot fit" in said, said


def _with_audio(clip_file, path, codec: str, sample_fmt: str) -> None:
    """The clip with 0.5 s of quiet sound in `codec`."""
    with av.open(str(clip_file)) as src, av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=24)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream(codec, rate=48000, layout="mono")
        for frame in src.decode(video=0):
            for packet in video.encode(frame.reformat(format="yuv420p")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        dtype = np.int16 if sample_fmt == "s16" else np.float32
        for k in range(25):
            sound = av.AudioFrame.from_ndarray(np.full((1, 960), 3, dtype), format=sample_fmt, layout="mono")
            sound.sample_rate, sound.pts = 48000, k * 960
            for packet in audio.encode(sound):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)


def test_frames_caps_a_file_input_and_its_audio_comes_along(clip_file, tmp_path, cli_here):
    """--frames was taken for the synthetic input only (a file rendered whole, without a word), and
    a file's audio was dropped silently. Now the audio is copied, cut where the frames end; where
    the output's container cannot hold it, the user is told."""
    talk = tmp_path / "talk.mp4"
    _with_audio(clip_file, talk, "aac", "fltp")
    out = tmp_path / "five.mp4"
    rc, _, err = cli_here("render", "--input", str(talk), "--frames", "5", "--prompt", "x", "--output", str(out), "-q",
                          *SMALL)
    assert rc == 0, err
    assert len(read_back(out)[0]) == 5
    assert "cut short" not in err and "audio" not in err, err
    with av.open(str(out)) as rendered:
        sound = rendered.streams.audio[0]
        assert sound.codec_context.name == "aac"
        end = max(float((p.pts + p.duration) * p.time_base) for p in rendered.demux(sound) if p.pts is not None)
    assert 5 / 24 - 0.05 < end < 5 / 24 + 0.05, end  # cut with the video, not the source's 0.5 s

    opus = tmp_path / "opus.mkv"
    _with_audio(clip_file, opus, "libopus", "s16")
    rc, _, err = cli_here("render", "--input", str(opus), "--prompt", "x", "--output", str(tmp_path / "o.avi"), "-q",
                          *SMALL)
    assert rc == 0, err
    said = [line for line in err.splitlines() if "has audio" in line]
    assert len(said) == 1 and "a .avi file cannot hold" in said[0] and ".mkv" in said[0], err
    with av.open(str(tmp_path / "o.avi")) as rendered:
        assert not rendered.streams.audio and rendered.streams.video[0].frames in (0, 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.mp4", "o.avi", "opus.mkv", "talk.mp4"]


def test_part_of_an_anamorphic_file_at_a_size_counts_its_frames_and_has_square_pixels(tmp_path, cli_here, monkeypatch):
    """`--frames 5 --size 32x32` of 8 frames with 4:3 pixels: the progress bar's total is the 5
    frames the render takes, and it ends full (the mutation probe found the total untested); the
    output's pixels are square, as a --size picks (4:3 ones a player would stretch)."""
    from fractions import Fraction

    import tqdm

    src = tmp_path / "anamorphic.mp4"
    with VideoWriter(src, 64, 48, 24.0, sample_aspect=Fraction(4, 3)) as writer:
        writer.write(synthetic_clip(8, 64, 48, seed=3))
    bars = []

    class Recorded(tqdm.tqdm):
        def close(self):
            bars.append((self.total, self.n))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    out = tmp_path / "o.mp4"
    rc, _, err = cli_here("render", "--input", str(src), "--frames", "5", "--size", "32x32", "--prompt", "x",
                          "--output", str(out), *SMALL)
    assert rc == 0, err
    assert set(bars) == {(5, 5)}, err  # (tqdm closes a bar twice: on exit and when it is collected)
    assert len(read_back(out)[0]) == 5
    with av.open(str(out)) as container:
        sar = container.streams.video[0].sample_aspect_ratio
    assert not sar or sar == 1, sar


def test_a_matroska_recording_gets_a_progress_bar_with_its_length(tmp_path, cli_here, monkeypatch):
    """An .mkv (OBS's recording format) or .webm lists no frame count, only its length: the bar
    had no total, so a long render showed no ETA. Its total is the length times the frame rate,
    set before the first frame, and it ends full."""
    import tqdm

    src = tmp_path / "recording.mkv"
    with VideoWriter(src, 64, 48, 24.0) as writer:
        writer.write(synthetic_clip(9, 64, 48, seed=4))
    with av.open(str(src)) as container:
        assert not container.streams.video[0].frames  # the container does not count them
    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(("start", self.total))

        def close(self):
            bars.append((self.total, self.n))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    rc, _, err = cli_here("render", "--input", str(src), "--prompt", "x", "--output", str(tmp_path / "o.mp4"), *SMALL)
    assert rc == 0, err
    assert bars[0] == ("start", 9) and set(bars[1:]) == {(9, 9)}, bars
