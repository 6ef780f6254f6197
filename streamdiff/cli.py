"""The `streamdiff` command line: render (offline, one stream through StreamPipeline), serve
(the WebRTC gateway), control (change a live stream's parameters) and bench (model mode:
the engine on synthetic clips, bench/model.py; end-to-end mode with --url: a running
server, client/bench.py), plan (memory plan, bench/memory_plan.py) and gpu-check (every GPU
measurement in one budget, bench/gpu_check.py).

Owns: argument parsing, turning known failures into one-line errors (exit 2, no traceback),
and the progress display. Does not own: any model or serving logic.
"""

from __future__ import annotations

import os
import re

# Nothing is ever downloaded: Hugging Face libraries stay offline in this process, whatever a
# weights folder's config says (set before any of them is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import collections
import itertools
import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from streamdiff.config import MAX_BLEND_CHUNKS, MAX_FRAME_SIDE, MAX_SEED, ConfigError, load_config, parse_size
from streamdiff.preflight import (
    allowed_hosts,
    check_device,
    check_folder,
    check_listen,
    check_output_path,
    check_reachable,
    check_weight_paths,
    check_writable,
    host_name_arg,
    number_in,
    on_off,
    port_number,
)

SYNTHETIC = "synthetic"  # --input synthetic: the built-in clip of moving shapes
# The preset a command uses without --config: the demo, a small model trained in this repo that
# restyles on a CPU. `tiny` (random weights, the tests' preset) would give a new user noise.
DEFAULT_PRESET = "demo"
TOKEN_ENV = "STREAMDIFF_TOKEN"  # the token's default for serve, control and bench --url
CONFIG_HELP = f"preset name ({DEFAULT_PRESET}, tiny, wan-1.3b, wan-14b, ...) or a YAML file (default {DEFAULT_PRESET})"
log = logging.getLogger("streamdiff")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _parse_size(text: str | None, flag: str = "--size") -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(f"{flag} {exc}") from None


def _say_if_random(cfg) -> None:
    """One line before a random-weight model is built for a user: its picture is noise."""
    if cfg.weights.format == "random":
        log.warning("config %r has random weights (weights.format: random): the picture will be noise; "
                    "--config %s is a small model trained to restyle, wan-1.3b / wan-14b need their checkpoints",
                    cfg.name, DEFAULT_PRESET)


def cmd_render(args: argparse.Namespace) -> int:
    # 0. Errors that need no model come first, before torch is imported: output type, paths,
    #    then the device.
    if args.input != SYNTHETIC and Path(args.input).resolve() == Path(args.output).resolve():
        raise CliError(f"--output {args.output} is the --input file: writing it would destroy the input; "
                       f"name another output file")
    check_output_path(args.output)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"sampling.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    check_weight_paths(cfg)
    check_device(cfg)

    import av

    from streamdiff.client.video_io import VideoInputError, VideoWriter, probe, read_frames  # PyAV, no torch

    size = _parse_size(args.size)

    # 1. Open the input and settle the processing size, still before the model code is imported
    #    (seconds on a small CPU): a bad file is reported at once.
    sample_aspect = None
    if args.input == SYNTHETIC:
        width, height = size or (cfg.video.width, cfg.video.height)
        fps, total = cfg.video.fps, args.frames or 96
    else:
        try:
            info = probe(args.input)
        except VideoInputError as exc:
            raise CliError(str(exc)) from None
        width, height = size or (info.width, info.height)
        # 0: the container does not say; a Matroska file (OBS's recordings) says its length only
        fps, total = info.fps, info.frames or round(info.seconds * info.fps)
        if args.frames:
            total = min(total, args.frames) if total else args.frames
        sample_aspect = None if size else info.sample_aspect  # a --size picks square pixels
    if max(width, height) > MAX_FRAME_SIDE:  # (a --size was checked as it was read)
        raise CliError(f"{args.input}'s frames are {width}x{height}: at most {MAX_FRAME_SIDE} pixels a side "
                       f"are taken (resize on the way in with --size)")
    if width % 16 or height % 16:
        hint = f"{max(16, width // 16 * 16)}x{max(16, height // 16 * 16)}"
        if size:
            raise CliError(f"--size {width}x{height}: width and height must be multiples of 16 (the VAE and "
                           f"patching), e.g. --size {hint}")
        raise CliError(
            f"frame size {width}x{height} cannot go through the VAE and patching: width and height must be "
            f"multiples of 16 (resize on the way in with --size, e.g. --size {hint})"
        )

    from tqdm import tqdm

    from streamdiff.model.build import build_components
    from streamdiff.pipeline.frames import synthetic_frames
    from streamdiff.pipeline.stream_pipeline import StreamPipeline

    times = None
    if args.input == SYNTHETIC:
        frames_iter = synthetic_frames(total, width, height, seed=cfg.sampling.seed)
    else:
        times = collections.deque()  # input frame times, for the writer (a variable frame rate stays so)
        frames_iter = itertools.islice(read_frames(args.input, (width, height), times, sample_aspect), args.frames)

    # 2. Build the model and the pipeline, after a word on anything that will disappoint.
    _warn_before_render(cfg, args.prompt, width, height)
    t_build = time.perf_counter()
    comps = build_components(cfg)
    pipe = StreamPipeline(comps, args.prompt, width=width, height=height)
    build_s = time.perf_counter() - t_build

    # 3. Stream the frames through, chunk by chunk, writing outputs as they come.
    frames_in = 0
    t_run = time.perf_counter()
    audio = args.input if args.input != SYNTHETIC and info.has_audio else None
    try:
        with VideoWriter(args.output, width, height, fps, sample_aspect=sample_aspect, audio_from=audio,
                         times=times) as writer, tqdm(
            total=total or None, unit="frame", desc="render", disable=args.quiet
        ) as bar:
            try:
                for frame in frames_iter:
                    writer.write(pipe.push(frame[None]))
                    frames_in += 1
                    bar.update(1)
            except VideoInputError as exc:
                raise CliError(str(exc)) from None
            if frames_in == 0:
                raise CliError(f"{args.input} has no frames")
            if bar.total != frames_in:  # the length was the container's estimate (a variable frame rate)
                bar.total = frames_in
                bar.refresh()
            writer.write(pipe.flush())
    except av.FFmpegError as exc:  # the encoder or muxer refused (a probe: 30000 fps into an .avi); nothing is left
        raise CliError(f"writing {args.output} failed: {exc} (the input's frame rate: {fps:g} fps)") from None
    if audio is not None and not writer.audio_kept:
        log.warning("%s has audio that a %s file cannot hold as it is: the output has the video only (try --output "
                    "with .mkv)", args.input, Path(args.output).suffix or "this")
    run_s = time.perf_counter() - t_run
    if not args.quiet:
        print(
            f"wrote {writer.frames_written} frame{'s' if writer.frames_written != 1 else ''} {width}x{height} @ {fps:g} fps to {args.output} "
            f"({frames_in / run_s:.2f} frames/s; model build {build_s:.1f} s)"
        )
    if writer.frames_written != frames_in:
        raise CliError(f"internal: wrote {writer.frames_written} frames for {frames_in} in")
    return 0


def _warn_before_render(cfg, prompt: str, width: int, height: int) -> None:
    """One warning line each: a frame far larger than the preset's that will not fit in memory
    (planned: a CPU run that cannot fit grows for minutes, then is killed; refused when it needs
    more than the machine has), random weights, a
    prompt the demo reads as another, more steps than the noise strength allows."""
    if width * height > 4 * cfg.video.width * cfg.video.height:
        from streamdiff.bench.memory_plan import memory_verdict

        if verdict := memory_verdict(cfg, width, height):
            fatal, said = verdict
            if fatal:
                raise CliError(said)
            log.warning("%s", said)
    _say_if_random(cfg)
    if cfg.text.kind == "styles":  # the demo knows nine prompts: say which one this is, if not literally
        from streamdiff.model.style_prompts import PROMPT_NAMES, clean_prompt, prompt_style

        if (means := prompt_style(prompt)) != clean_prompt(prompt):
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            log.warning("the model reads --prompt %r as %r (it knows: %s)", shown, means, ", ".join(PROMPT_NAMES))
    from streamdiff.sampling.noise_schedule import renoised_above, strength_to_timestep

    s = cfg.sampling
    if (above := renoised_above(s.steps, s.noise_strength, s.timesteps)) is not None:
        log.warning("%d steps at noise %g: the first step is told t=%d and a later one re-noises to t=%d "
                    "(sampling.timesteps %s; StreamDiffusionV2's list is made for noise 0.7-0.8), which blurs "
                    "the picture; at this noise keep --steps 1", s.steps, s.noise_strength,
                    strength_to_timestep(s.noise_strength), above, list(s.timesteps))


def _config_with_stages(name: str, overrides: list[str], stages: int | None):
    """The config with `--stages N` as parallel.num_stages; its errors said in the flag's words."""
    if stages is None:
        return load_config(name, overrides)
    said = f"parallel.num_stages={stages}"
    try:
        return load_config(name, [*overrides, said])
    except ConfigError as exc:
        if not str(exc).startswith(said):
            raise
        raise ConfigError(f"--stages {stages}{str(exc)[len(said):]}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.token is not None and not args.token.strip():
        raise CliError("--token is empty (an unset variable?): it would turn authentication off; give a token, "
                       "or leave --token out to serve without one")
    overrides = list(args.set or [])
    if args.stages is not None:  # Ray actors, as the flag says (a preset may use threads)
        overrides += ["parallel.backend=ray"]
    if args.ray_address:
        overrides += [f"parallel.ray_address={args.ray_address}", "parallel.backend=ray"]
    cfg = _config_with_stages(args.config, overrides, args.stages)
    if args.max_sessions is not None and args.max_sessions > cfg.cache.max_streams:  # (a probe: the pool said no)
        raise CliError(f"--max-sessions {args.max_sessions}: the KV cache holds cache.max_streams="
                       f"{cfg.cache.max_streams} streams; add --set cache.max_streams={args.max_sessions} (more "
                       f"memory: streamdiff plan) or give --max-sessions {cfg.cache.max_streams} or fewer")
    check_weight_paths(cfg)  # before torch
    check_listen(args.host, args.port)  # before the engine's warm-up, not after it
    if cfg.parallel.ray_address not in ("", "auto"):
        check_reachable(cfg.parallel.ray_address)
    check_device(cfg)
    _say_if_random(cfg)

    from streamdiff.server.app import ServerSettings, serve

    settings = ServerSettings(
        token=args.token, allowed_hosts=allowed_hosts(args.host, args.allow_host), max_sessions=args.max_sessions, max_viewers=args.max_viewers, target_fps=args.target_fps,
        deadline_ms=args.deadline_ms, bitrate_bps=None if args.bitrate_kbps is None else int(args.bitrate_kbps * 1000), ice_loopback=args.ice_loopback,
    )
    return serve(cfg, host=args.host, port=args.port, settings=settings)


def cmd_control(args: argparse.Namespace) -> int:
    from streamdiff.client.control import ControlError, run

    params = {k: v for k, v in (("prompt", args.prompt), ("steps", args.steps), ("noise", args.noise),
                                ("seed", args.seed), ("motion", args.motion), ("blend", args.blend)) if v is not None}
    if not params:
        raise CliError("nothing to change: give --prompt, --steps, --noise, --seed, --motion or --blend")
    try:
        return run(args.url, args.session, params, args.token)
    except ControlError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot reach {args.url}: {exc}") from None


def _refuse_empty(args: argparse.Namespace, *names: str) -> None:
    """A flag given an empty value, as an unset variable gives one (`--url "$SERVER"`), is refused,
    not taken as left out (a probe: bench --url "" measured the demo model, --json "" wrote nothing)."""
    for name in names:
        if (value := getattr(args, name)) is not None and not value.strip():
            flag = "--" + name.replace("_", "-")
            raise CliError(f"{flag} is empty (an unset variable?): give it a value, or leave the flag out")


def _parse_int_list(flag: str, text: str, lo: int, hi: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        example = f"{lo},{min(lo + 1, hi)}"
        raise CliError(f"{flag} {text!r} must be a comma-separated list of integers, e.g. {flag} {example}") from None
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise CliError(f"{flag} {text!r}: {bad[0]} is out of range [{lo}, {hi}]")
    return tuple(dict.fromkeys(values))  # a value given twice is measured once


def _parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in text.split(","):
        if not item.strip():
            raise CliError(f"--resolution {text!r} has an empty entry (a stray comma?), e.g. --resolution 512x512,832x480")
        size = _parse_size(item.strip(), "--resolution")
        if size is None or min(size) < 16 or size[0] % 16 or size[1] % 16:
            raise CliError(f"--resolution {item!r}: width and height must be multiples of 16 "
                           f"(VAE 8x, patch 2x), e.g. --resolution 512x512,832x480")
        out.append(size)
    return tuple(dict.fromkeys(out))  # a size given twice is measured once


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # what matplotlib writes without extra packages
# Flags of one bench mode only (default None / False: not given).
BENCH_MODEL_ONLY = ("config", "set", "steps", "resolution", "streams", "random_weights", "dtype", "peak_tflops",
                    "simulate", "hop_ms", "compile", "cuda_graphs", "stages", "ray")
BENCH_E2E_ONLY = ("token", "fps", "size", "sessions", "warmup")
# --simulate times one step of each part and projects stage counts: these would do nothing there
BENCH_NOT_SIMULATED = ("duration", "deadline_ms", "prompt", "plot", "peak_tflops")
BENCH_DURATION_S = 10.0
BENCH_PROMPT = "a watercolor painting"


def _refuse_writing_over_inputs(args: argparse.Namespace) -> None:
    """--json and --plot write files: not one over the other, nor over the --config file (a probe:
    `--config my.yaml --json my.yaml` replaced the config with the report and exited 0)."""
    def same(a: str, b: str) -> bool:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    if args.json and args.plot and same(args.json, args.plot):
        raise CliError(f"--json and --plot both name {args.plot}: give each its own file")
    config = args.config if args.config and Path(args.config).expanduser().is_file() else None
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and config and same(path, config):
            raise CliError(f"{flag} {path} is the --config file: the report would replace it; name another file")


def cmd_bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet torch.profiler (host_ms_per_step); before torch loads
    _refuse_empty(args, "url", "config", "json", "plot")
    _refuse_writing_over_inputs(args)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:  # before minutes of measuring, not after
            check_writable(path, flag)
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise CliError(f"--plot {args.plot}: the plot is an image: end the name with one of {', '.join(PLOT_SUFFIXES)}")

    def given(names: tuple[str, ...]) -> list[str]:
        return [name for name in names if getattr(args, name) not in (None, False)]

    # flags the chosen mode would ignore are refused (a CLI probe found five taken and dropped)
    if args.simulate and (extra := given(BENCH_NOT_SIMULATED)):
        raise CliError(f"--{extra[0].replace('_', '-')} does not apply to --simulate, which times one step of each "
                       f"part and projects the stage counts (docs/scaling.md)")
    if args.hop_ms is not None and not args.simulate:
        raise CliError("--hop-ms is the per-hop latency --simulate projects with: add --simulate")
    if args.stages and args.plot and not args.simulate:
        raise CliError("--plot draws one-process model mode (latency CDF, fps over time); --stages reports a table")
    if args.stages and args.peak_tflops is not None and not args.simulate:
        raise CliError("--peak-tflops gives one-process model mode its MFU column; --stages reports no MFU")
    args.duration = BENCH_DURATION_S if args.duration is None else args.duration
    args.prompt = BENCH_PROMPT if args.prompt is None else args.prompt

    # 1. End-to-end mode: a running server, measured by the client load generator.
    if args.url:
        if extra := given(BENCH_MODEL_ONLY):
            # (a probe: `--url ... --streams 3` from model mode, and no word of the flag that opens 3 streams)
            raise CliError(f"--{extra[0].replace('_', '-')} is a model-mode flag; end-to-end mode (--url) "
                           f"measures whatever the server runs"
                           + ("; --sessions N opens N streams on it" if extra[0] == "streams" else ""))
        _check_server_url(args.url)
        args.token = args.token or os.environ.get(TOKEN_ENV) or None  # (model mode ignores the variable)
        from streamdiff.client import bench as e2e

        try:
            return e2e.run_from_args(args)
        except getattr(e2e, "BenchError", ()) as exc:  # server unreachable, session refused, ...
            raise CliError(str(exc)) from None

    if extra := given(BENCH_E2E_ONLY):
        hint = " (model mode takes --resolution)" if extra[0] == "size" else ""
        raise CliError(f"--{extra[0]} applies to end-to-end mode only (with --url){hint}")
    # the lists before torch loads (a mistyped one failed after 1.5-4.7 s of imports)
    steps = _parse_int_list("--steps", args.steps, 1, 4) if args.steps is not None else None
    resolutions = _parse_resolutions(args.resolution) if args.resolution is not None else None
    streams = _parse_int_list("--streams", "1" if args.streams is None else args.streams, 1, 64)
    # the checkpoints (unless --random-weights), then the device, before any warm-up
    from streamdiff.bench.model import ModelBenchSettings, bench_config

    check_device(bench_config(ModelBenchSettings(config=args.config or DEFAULT_PRESET, overrides=tuple(args.set or ()),
                                                 random_weights=args.random_weights, dtype=args.dtype)))
    if args.simulate:
        if args.compile or args.cuda_graphs:
            raise CliError("--simulate measures eager steps; --compile / --cuda-graphs apply to model mode")
        if args.ray:
            raise CliError("--ray runs real stages (--stages without --simulate)")
        return _bench_simulate(args)
    if args.ray and not args.stages:
        raise CliError("--ray needs --stages LIST (the stage counts to run over Ray actors)")
    # 2. Model mode: check the flags, run every combination in this process, report.
    if args.deadline_ms is None:  # the config's service level, so the miss rate means something there
        args.deadline_ms = bench_deadline_ms(args.config or DEFAULT_PRESET, args.set or ())
    from streamdiff.bench import report as benchreport
    from streamdiff.bench.modes import modes_from_flags
    from streamdiff.bench.model import (
        TABLE_COLUMNS, plot_series, report_rows, run_model_bench,
    )

    settings = ModelBenchSettings(
        config=args.config or DEFAULT_PRESET, overrides=tuple(args.set or ()), steps=steps, resolutions=resolutions,
        streams=streams, random_weights=args.random_weights, dtype=args.dtype, duration_s=args.duration,
        deadline_ms=args.deadline_ms, peak_tflops=args.peak_tflops, prompt=args.prompt, quiet=args.quiet,
        command=args.command_line, modes=modes_from_flags(args.compile, args.cuda_graphs),
    )
    if args.stages:
        return _bench_stages(args, settings)
    try:
        report = run_model_bench(settings)
    except ValueError as exc:  # e.g. --cuda-graphs without CUDA
        raise CliError(str(exc)) from None
    print(f"streamdiff bench, model mode: {report['config']} ({report['weights']} weights, {report['dtype']}, "
          f"attention {report['attention_backend']}{', VAE compiled' if report.get('vae_compiled') else ''}) "
          f"on {report['device']}, torch {report['torch_version']}; "
          f"{settings.duration_s:g} s per combination, deadline {settings.deadline_ms:g} ms")
    print(benchreport.format_table(report_rows(report), TABLE_COLUMNS))
    served_cut = False
    if not report["interrupted"]:
        try:
            served_cut = report["interrupted"] = _bench_as_served(settings, report)
        except KeyboardInterrupt:  # what was measured (the one-process table) is still written below
            served_cut = report["interrupted"] = True
            report.pop("served", None)
    if args.json:
        print(f"wrote {benchreport.write_json(report, args.json)}")
    if args.plot:
        print(f"wrote {benchreport.plot(plot_series(report), args.plot, title=report['command'], deadline_ms=settings.deadline_ms)}")
    if served_cut:
        served = report.get("served")
        part = (f"{len(served['results'])} of {served['combinations']} as-served ones" if served else "the as-served ones not")
        print(f"streamdiff: interrupted during the as-served run: all {report['combinations']} one-process "
              f"combinations measured (above), {part}", file=sys.stderr)
        return _interrupted_code()
    if report["interrupted"]:
        last = report["results"][-1]
        cut = f", the last for {last['window_s']:.1f} of {settings.duration_s:g} s" if last["cut_short"] else ""
        print(f"streamdiff: interrupted: {len(report['results'])} of {report['combinations']} combinations measured "
              f"(above{cut})", file=sys.stderr)
        return _interrupted_code()
    return 0


def _check_server_url(url: str) -> None:
    """`--url` names a server, http(s)://HOST[:PORT] ("notaurl" was tried, and said "cannot reach
    notaurl: notaurl/healthz")."""
    from streamdiff.client.control import ControlError, server_address

    try:
        server_address(url, schemes=("http", "https"))
    except ControlError as exc:
        raise CliError(str(exc)) from None


def _bench_as_served(settings, report: dict) -> bool:
    """A config that serves on threaded stages (the demo: VAE encode, DiT and VAE decode each on
    a thread) is also measured that way, so the bench reports the rate `serve` gets as well as
    the one-process step above; the run goes into the report as `served`. True: it was
    interrupted after some of its combinations."""
    from streamdiff.bench.model import bench_config
    from streamdiff.parallel import serves_on_threads

    cfg = bench_config(settings)
    if not serves_on_threads(cfg.parallel):
        return False
    if settings.modes != ("eager",):
        print("this config serves on threaded stages; they run eager, so they are measured only without "
              "--compile / --cuda-graphs")
        return False
    from streamdiff.bench import report as benchreport
    from streamdiff.bench.stages import TABLE_COLUMNS, report_rows, run_stages_bench

    served = run_stages_bench(settings, [cfg.parallel.num_stages])
    report["served"] = served
    layout = f"{cfg.parallel.num_stages} DiT stage(s)" + (" between a VAE encode and a VAE decode stage"
                                                           if cfg.parallel.vae_stages else "")
    print(f"as served (parallel.backend threads: {layout}, a thread each; "
          f"--set parallel.vae_stages=false serves on one thread):")
    columns = tuple(c for c in TABLE_COLUMNS if c[0] != "speedup")  # one layout: nothing to compare
    print(benchreport.format_table(report_rows(served), columns))
    return served["interrupted"]


def _bench_stages(args: argparse.Namespace, settings) -> int:
    """Model mode over real pipeline stages (threads here, or Ray actors with --ray)."""
    from streamdiff.bench import report as benchreport
    from streamdiff.bench.stages import TABLE_COLUMNS, report_rows, run_stages_bench

    if args.compile or args.cuda_graphs:
        raise CliError("--stages runs eager stages; --compile / --cuda-graphs apply to one-process model mode")
    stages = list(_parse_int_list("--stages", args.stages, 1, 64))
    try:
        report = run_stages_bench(settings, stages, args.ray)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"streamdiff bench, model mode over pipeline stages ({report['transport']}): {report['config']}; "
          f"{settings.duration_s:g} s per combination, git {report['git_commit']}")
    print(benchreport.format_table(report_rows(report), TABLE_COLUMNS))
    if args.json:
        print(f"wrote {benchreport.write_json(report, args.json)}")
    if report["interrupted"]:
        print(f"streamdiff: interrupted: {len(report['results'])} of {report['combinations']} combinations "
              f"measured (above)", file=sys.stderr)
        return _interrupted_code()
    return 0


def bench_deadline_ms(config: str, overrides) -> float:
    """The default deadline of `streamdiff bench`: the config's service level."""
    return load_config(config, list(overrides)).slo.deadline_ms


def _bench_simulate(args: argparse.Namespace) -> int:
    """3. Scaling projection: measure one device, project 1..N pipeline stages (docs/scaling.md)."""
    from streamdiff.bench import report as benchreport
    from streamdiff.bench.model import ModelBenchSettings, bench_config
    from streamdiff.bench.simulate import simulate

    overrides = list(args.set or ())
    if args.resolution:
        (width, height), *more = _parse_resolutions(args.resolution)
        if more:
            raise CliError("--simulate takes one --resolution")
        overrides += [f"video.width={width}", f"video.height={height}"]
    if args.steps:
        steps, *more = _parse_int_list("--steps", args.steps, 1, 4)
        if more:
            raise CliError("--simulate takes one --steps value")
        overrides.append(f"sampling.steps={steps}")
    streams, *more = _parse_int_list("--streams", "1" if args.streams is None else args.streams, 1, 64)
    if more:
        raise CliError("--simulate takes one --streams value")
    stages = list(_parse_int_list("--stages", args.stages or "1,2,4,8", 1, 64))
    cfg = bench_config(ModelBenchSettings(config=args.config or DEFAULT_PRESET, overrides=tuple(overrides),
                                          random_weights=args.random_weights, dtype=args.dtype))
    if args.stages and (more := [s for s in stages if s > cfg.model.num_layers]):  # the default list is cut to fit
        raise CliError(f"--stages {more[0]}: the model has only {cfg.model.num_layers} blocks")
    report = simulate(cfg, stages, streams, args.hop_ms)
    report["command"] = args.command_line
    m, hop = report["measured"], report["hop"]
    print(f"measured on {m['device']}: {cfg.name} {report['resolution']}, {report['steps']} steps, {streams} "
          f"stream(s): step {m['step_ms']:.1f} ms = encode {m['encode_ms']:.1f} + DiT {m['dit_ms']:.1f} "
          f"({m['dit_ms'] / cfg.model.num_layers:.2f} per block) + decode {m['decode_ms']:.1f}; "
          f"hop {hop['hop_ms']:.2f} ms ({hop['source']})")
    columns = [("stages", "stages"), ("partition", "blocks per stage"), ("stage_ms", "stage ms"),
               ("micro_batches", "micro-batches"), ("step_ms", "step ms"), ("fps", "fps"), ("speedup", "speed-up"),
               ("period_ms", "period ms"), ("fps_overlapped", "fps (D=S)"), ("speedup_overlapped", "speed-up (D=S)"),
               ("max_block_weights_gb_per_gpu", "block weights GB/GPU"), ("max_kv_gb_per_gpu", "KV GB/GPU")]
    print(benchreport.format_table(report["projection"], columns))
    if args.json:
        print(f"wrote {benchreport.write_json(report, args.json)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """streamdiff plan: the memory plan of a config from a meta-device build (bench/memory_plan.py)."""
    _refuse_empty(args, "json")
    if args.json:
        check_writable(args.json, "--json")
    from streamdiff.bench.memory_plan import GiB, format_plan, parse_bytes, plan_memory, write_plan_json

    try:
        if args.gpu_mem is not None and not args.gpu_mem.strip():  # an unset variable, not the default
            raise ValueError("is empty: give a size such as 80GiB")
        sizes = list(dict.fromkeys(parse_bytes(x) for x in args.gpu_mem.split(","))) if args.gpu_mem else []
    except ValueError as exc:
        raise CliError(f"--gpu-mem {exc}") from None
    if not sizes:
        import torch

        sizes = [torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 24 * GiB]
    width = height = None
    if args.resolution:
        (width, height), *more = _parse_resolutions(args.resolution)
        if more:
            raise CliError("--resolution takes one WxH")
    if args.steps is not None and not 1 <= args.steps <= 4:
        raise CliError(f"--steps {args.steps} must be 1-4")
    cfg = _config_with_stages(args.config, list(args.set or []), args.stages)
    plan = plan_memory(cfg, args.device, width, height, args.steps)
    for size in sizes:
        print(format_plan(plan, size))
    if args.json:
        print(f"wrote {write_plan_json(plan, sizes, args.json)}")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """streamdiff gpu-check: the gpu tests, the kernel bench and the model bench in one budget (bench/gpu_check.py)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet torch.profiler (host_ms_per_step); before torch loads
    from pathlib import Path

    from streamdiff.bench.gpu_check import CudaParts, format_dry_run, plan_parts, run_check

    _refuse_empty(args, "out")
    load_config(args.config, list(args.set or ()))  # a wrong preset or --set fails now, not inside every part on the GPU
    parts = plan_parts(args.duration)
    if args.only:  # a later session's second look: e.g. --only "VAE" --only "kernel"
        parts = [p for p in parts if any(text.lower() in p.name.lower() for text in args.only)]
        if not parts:
            raise CliError(f"--only {' '.join(args.only)} matches no part (--dry-run lists them)")
    if args.dry_run:
        print(format_dry_run(parts, args.budget_s))
        return 0
    import torch

    if not torch.cuda.is_available():
        raise CliError("gpu-check needs a CUDA GPU and there is none here (--dry-run prints the plan)")
    out = Path(args.out)
    execute = CudaParts(args.config, args.duration, out, tuple(args.set or ()))
    header = dict(execute.header(), command=args.command_line)
    report = run_check(parts, args.budget_s, out, execute, header)
    done = sum(e.get("status") == "ok" for e in report["parts"])
    failed = [e["part"] for e in report["parts"] if e.get("status") not in ("ok", "skipped")]
    print(f"gpu-check: {done}/{len(parts)} parts ok in {report['elapsed_s']:.0f} s; wrote {out / 'gpu-check.json'} "
          f"and {out / 'gpu-check.md'}" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0  # parts the budget left out (skipped) are not failures


def cmd_train_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streamdiff.config import load_config, resolve_path

    cfg = load_config(args.config)  # a wrong name fails here, before any folder is made
    for flag, folder in (("--work", args.work), ("--output", args.output)):
        if not folder.strip():  # an unset variable (a probe: "" filled the current folder)
            raise CliError(f"{flag} is empty: name a folder")
    check_folder(args.work, "--work")  # before the teacher's renders and the training, not after
    check_folder(args.output, "--output")
    try:
        from streamdiff.demo.data import require_training_extras
        from streamdiff.demo.train import Recipe, check_trainable, kernel_note, train_demo

        require_training_extras()  # a probe: missing, the data stage's workers failed and restarted for ever
    except ImportError as exc:
        raise CliError(f"{exc}") from None
    try:
        check_trainable(cfg)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # --smoke: a few steps of every stage at 64x64: checks the trainer, not the result
    recipe = Recipe.smoke() if args.smoke else Recipe()
    if not args.smoke:  # the weights this rebuild stands beside: the config's own
        made = cfg.weights.transformer
        note = kernel_note(resolve_path(made).parent / "training.json") if made else None
        if note:
            print(f"train-demo: {note}", file=sys.stderr)
    try:
        out = train_demo(Path(args.work), Path(args.output), args.config, recipe, args.threads)
    except ValueError as exc:  # a work folder of another run, a damaged file, a stage's process that died
        raise CliError(str(exc)) from None
    print(f"wrote the demo weights to {out} (work files in {args.work}; rerun to resume)")
    return 0


class _Parser(argparse.ArgumentParser):
    """A flag argparse cannot take is one line, like every other error here (argparse printed its
    usage block above it: 4-11 lines for `--duration nan`)."""

    def error(self, message: str):
        self.exit(2, f"streamdiff: error: {message} (see: {self.prog} --help)\n")


def _version() -> str:
    """The installed package's version (an install probe: `streamdiff --version` did not exist)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamdiff")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamdiff", description="Real-time streaming video diffusion")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("-V", "--version", action="version", version=f"streamdiff {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser (main names a command's own flags' errors)

    render = sub.add_parser("render", help="restyle a video file offline through the streaming pipeline")
    render.add_argument("--config", default=DEFAULT_PRESET, help=CONFIG_HELP)
    render.add_argument("--input", required=True, help=f"a video file PyAV can read, or '{SYNTHETIC}'")
    render.add_argument("--prompt", required=True)
    render.add_argument("--output", required=True, help="output video path (.mp4, .mkv, .mov, .avi or .webm; the input's audio is copied in where the container holds it)")
    render.add_argument("--steps", type=int, choices=[1, 2, 3, 4], help="denoise steps (overrides sampling.steps)")
    render.add_argument("--size", help="resize input to WxH on the way in (multiples of 16)")
    render.add_argument("--frames", type=number_in(int, 1, 100_000, "96"), default=None,
                        help=f"render at most this many frames (default: all of a file; 96 of --input {SYNTHETIC})")
    render.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. cache.window=8")
    render.add_argument("-q", "--quiet", action="store_true")
    render.set_defaults(func=cmd_render)

    serve = sub.add_parser("serve", help="run the WebRTC gateway (browser, WHIP/WHEP for OBS, control, metrics)")
    serve.add_argument("--config", default=DEFAULT_PRESET, help=CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    serve.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                       help=f"require 'Authorization: Bearer TOKEN' on session and control routes (default: "
                            f"${TOKEN_ENV}, which other users of this machine cannot read in `ps` as they can a flag)")
    serve.add_argument("--allow-host", action="append", type=host_name_arg, metavar="NAME",
                       help="without --token, answer requests addressed to NAME too (a proxy that passes its own host "
                            "name on; '*' any): a server on loopback answers only to an IP address or localhost "
                            "(DNS rebinding), one on --host 0.0.0.0 to any name unless this is given")
    serve.add_argument("--max-sessions", type=number_in(int, 1, 1024, "4"), help="stream limit (default cache.max_streams)")
    serve.add_argument("--max-viewers", type=number_in(int, 1, 1024, "16"), default=16,
                       help="WHEP players at once, all streams together (default 16)")
    serve.add_argument("--target-fps", type=number_in(float, 0.1, 240, "30"),
                       help="per-stream service level for admission (default: the config's slo, else video.fps)")
    serve.add_argument("--deadline-ms", type=number_in(float, 1, 3_600_000, "1000"),
                       help="per-frame deadline for admission (default: the config's slo.deadline_ms)")
    serve.add_argument("--bitrate-kbps", type=number_in(float, 50, 100_000, "4000"),
                       help="fixed video encoder bitrate (default: 1 bit a pixel a frame, 1000-4000: 2000 at 256x256)")
    serve.add_argument("--ice-loopback", action="store_true", help="also offer 127.0.0.1 ICE candidates")
    serve.add_argument("--stages", type=int, help="pipeline stages over Ray actors (parallel.num_stages)")
    serve.add_argument("--ray-address", help="join a Ray cluster ('auto' after `ray start`, or HOST:PORT)")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. video.width=320")
    serve.set_defaults(func=cmd_serve)

    control = sub.add_parser("control", help="change a live stream's prompt / steps / noise / seed")
    control.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    control.add_argument("--session", required=True, help="session id, or the WHIP stream key of an OBS stream")
    control.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                         help=f"the server's token (default: ${TOKEN_ENV})")
    control.add_argument("--prompt")
    control.add_argument("--steps", type=int, choices=[1, 2, 3, 4])
    control.add_argument("--noise", type=number_in(float, 0.1, 1.0, "0.3"), help="noise strength 0.1-1.0")
    control.add_argument("--seed", type=number_in(int, 0, MAX_SEED, "7"))
    control.add_argument("--motion", type=on_off, help="motion-aware noise: on or off (also true/false, 1/0, yes/no)")
    control.add_argument("--blend", type=number_in(int, 0, MAX_BLEND_CHUNKS, "8"),
                         help="a prompt change fades in over this many chunks (0: at once)")
    control.set_defaults(func=cmd_control)
    bench = sub.add_parser(
        "bench", help="measure fps, latency, jitter, memory and MFU: the model (default) or a server (--url)",
        description="Model mode (default): the engine and the model on synthetic clips in this process, no "
                    "network, for every combination of --steps x --resolution x --streams (a config that serves on "
                    "threaded stages, like the demo, is measured through them too: 'as served'). End-to-end mode "
                    "(--url): sessions against a running `streamdiff serve`.")
    shared = bench.add_argument_group("both modes")
    shared.add_argument("--duration", type=number_in(float, 0.1, 86400, "10"),
                        help=f"measured seconds (per combination in model mode; default {BENCH_DURATION_S:g})")
    shared.add_argument("--deadline-ms", type=number_in(float, 0.001, 1e12, "1000"),
                        help="per-frame deadline for the miss rate (default: the config's slo.deadline_ms; "
                             "with --url the server's)")
    shared.add_argument("--prompt", help=f"the streams' prompt (default {BENCH_PROMPT!r})")
    shared.add_argument("--json", metavar="OUT", help="write every number, the command and the device to OUT")
    shared.add_argument("--plot", metavar="OUT.png", help="latency CDF and fps over time (matplotlib)")
    shared.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    model = bench.add_argument_group("model mode")
    model.add_argument("--config", help=CONFIG_HELP)
    model.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. cache.window=8")
    model.add_argument("--steps", metavar="LIST", help="denoise steps to measure, e.g. 1,2,3,4 (default: the config's)")
    model.add_argument("--resolution", metavar="LIST",
                       help="frame sizes WxH, e.g. 512x512,832x480 (default: the config's)")
    model.add_argument("--streams", metavar="LIST", help="stream counts, e.g. 1,2,4 (default 1)")
    model.add_argument("--random-weights", action="store_true",
                       help="random weights for the configured architecture (no checkpoint needed)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override model.dtype")
    model.add_argument("--peak-tflops", type=number_in(float, 0.001, 1_000_000, "989"), help="device peak for MFU (default: known GPUs, none on CPU)")
    model.add_argument("--compile", action="store_true",
                       help="also run every combination with the DiT blocks under torch.compile (side by side)")
    model.add_argument("--cuda-graphs", action="store_true",
                       help="also run every combination as replayed CUDA graphs of the eager forward "
                            "(CUDA only; --compile is the compiled mode)")
    sim = bench.add_argument_group("scaling projection")
    sim.add_argument("--simulate", action="store_true",
                     help="measure one device, project 1..N pipeline stages (uses the model-mode options and --json)")
    model.add_argument("--stages", metavar="LIST",
                       help="run real pipeline stages, one thread each (Ray actors with --ray), for each "
                            "stage count, e.g. 1,2,4; with --simulate: the stage counts to project (default 1,2,4,8)")
    model.add_argument("--ray", action="store_true", help="with --stages: the stages are Ray actors")
    sim.add_argument("--hop-ms", type=number_in(float, 0, 60_000, "0.5"), help="per-hop transport latency (default: measured with Ray here)")
    e2e = bench.add_argument_group("end-to-end mode")
    e2e.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000 (selects end-to-end mode)")
    e2e.add_argument("--sessions", type=number_in(int, 1, 64, "2"), help="concurrent sessions (default 1)")
    e2e.add_argument("--token", help=f"bearer token of the server (default: ${TOKEN_ENV})")
    e2e.add_argument("--fps", type=number_in(float, 0.1, 240, "30"),
                     help="input frame rate sent per session (default 15)")
    e2e.add_argument("--size", help="input frame size WxH, e.g. 256x256")
    e2e.add_argument("--warmup", type=number_in(float, 0, 3600, "2"),
                     help="seconds sent before the measured --duration, left out of the numbers (default 2)")
    bench.set_defaults(func=cmd_bench)

    plan = sub.add_parser("plan", help="memory plan: weights, KV pool, VAE caches, activations, streams that fit",
                          description="Counts every byte a serving process holds on the device from a meta-device "
                                      "build (nothing allocated, no weights read) and how many streams fit.")
    plan.add_argument("--config", default=DEFAULT_PRESET, help=CONFIG_HELP)
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. text.device=cpu")
    plan.add_argument("--gpu-mem", metavar="SIZE[,SIZE]",
                      help="device memory, e.g. 24GiB or 16GiB,24GiB,80GiB; GB counts as GiB, as cards are sold "
                           "(default: this GPU's, else 24GiB)")
    plan.add_argument("--resolution", metavar="WxH", help="frame size (default: the config's)")
    plan.add_argument("--steps", type=int, help="denoise steps 1-4 (default: the config's)")
    plan.add_argument("--stages", type=int, help="pipeline stages: plan one stage's share (parallel.num_stages)")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                      help="plan for this device type's kernels (default cuda)")
    plan.add_argument("--json", metavar="OUT", help="write the plan (bytes) to OUT")
    plan.set_defaults(func=cmd_plan)

    check = sub.add_parser("gpu-check", help="on a CUDA GPU: gpu tests, kernel bench, model bench (1.3B), one budget",
                           description="Runs, most important first and within --budget-s: streamdiff bench with the "
                                       "1.3B random-weight architecture (512x512 and 832x480, steps 1-4, 1 and 4 "
                                       "streams, eager / compiled / CUDA graphs), the gpu-marked tests and the "
                                       "kernel bench; writes gpu-check.json and gpu-check.md (with "
                                       "StreamDiffusionV2's figures beside ours).")
    check.add_argument("--out", default="out/gpu-check", help="output folder (default out/gpu-check)")
    check.add_argument("--budget-s", type=number_in(float, 1, 86400, "600"), default=600.0, help="stop starting parts past this (default 600)")
    check.add_argument("--duration", type=number_in(float, 0.1, 3600, "5"), default=5.0,
                       help="measured seconds per bench combination (default 5)")
    check.add_argument("--config", default="wan-1.3b",
                       help="architecture to bench with random weights (default wan-1.3b)")
    check.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    check.add_argument("--only", action="append", metavar="TEXT",
                       help="run only the parts whose name contains TEXT (repeatable; case-insensitive)")
    check.add_argument("--dry-run", action="store_true", help="print the parts, their estimates and what fits; run nothing")
    check.set_defaults(func=cmd_gpu_check)

    train = sub.add_parser("train-demo", help="rebuild the demo model's weights from scratch (needs .[train])",
                           description="Teacher renders, TAEHV, latents, DiT; resumable from --work. "
                                       "See docs/demo.md.")
    train.add_argument("--config", default="demo", help="the architecture to train (default demo)")
    train.add_argument("--work", default="out/demo-train",
                       help="work folder: data, checkpoints (resumable; default out/demo-train)")
    train.add_argument("--output", default="out/demo-weights",
                       help="where the safetensors go (default out/demo-weights; configs/demo to replace the shipped "
                            "ones)")
    train.add_argument("--threads", type=int, default=2, choices=(1, 2),
                       help="2 (default): the teacher in two processes, TAEHV encoder and latents on two threads, then "
                            "the TAEHV decoder and the DiT side by side on one each; 1: every stage in turn on one thread")
    train.add_argument("--smoke", action="store_true", help="two steps per stage on two photographs at 64x64 (tests)")
    train.set_defaults(func=cmd_train_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a service manager) taken as Ctrl-C is: what a command leaves
    behind on Ctrl-C (a render's hidden partial file removed, bench's report of what it
    measured) it leaves on SIGTERM too; before, the process died where it stood."""


_TERMINATED = threading.Event()  # this run's interrupt was SIGTERM's


def _terminate_as_interrupt(signum, frame) -> None:
    _TERMINATED.set()
    raise Terminated()


def _interrupted_code() -> int:
    """For a command that reports what it did before it was stopped: 143 after SIGTERM, 130 after
    Ctrl-C, the codes a shell gives a process each signal ends (bench said 130 after SIGTERM)."""
    return 143 if _TERMINATED.is_set() else 130


def _out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation that failed (torch's CPU allocator, CUDA's OutOfMemoryError,
    Python's MemoryError), else None. A probe: model.* settings of 100 GB ended in a 29-line
    traceback; `streamdiff plan` says what settings need before a run."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "DefaultCPUAllocator" in text):
        return None
    tried = re.search(r"tried to allocate ([\d.]+) ?(\w+)", text, re.IGNORECASE)
    size = tried and (f"{float(tried[1]) / 2**30:.1f} GiB" if tried[2] == "bytes" else f"{tried[1]} {tried[2]}")
    what = f" (one tensor of {size})" if tried else ""
    return (f"out of memory{what}: these settings need more memory than this "
            f"{'GPU' if 'CUDA' in text else 'machine'} has; `streamdiff plan` with the same --config and --set "
            "says how much they need")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's parser, whose --help lists its flags (a probe: "see: streamdiff --help")
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = shlex.join(["streamdiff", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Kineto (torch's profiler, which bench uses for host time) prints "USDT: profiler_start /
    # profiler_stop" lines on stderr for every profiled call at its default level; above its
    # highest level it is quiet. Read once, when torch loads, so set before any command imports
    # it; an explicit KINETO_LOG_LEVEL wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    # serve stops on SIGTERM by its own handler (server.app); every other command as on Ctrl-C
    own = args.func is not cmd_serve and threading.current_thread() is threading.main_thread()
    _TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if own else None
    try:
        return args.func(args)
    except (CliError, ConfigError, FileNotFoundError) as exc:  # ConfigError: weights files that cannot be used too
        print(f"streamdiff: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if (said := _out_of_memory(exc)) is None:
            raise
        print(f"streamdiff: error: {said}", file=sys.stderr)
        return 1
    except Terminated:
        print("streamdiff: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("streamdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output has gone (`streamdiff plan | head`): stop as a shell tool does,
        # quietly with SIGPIPE's status; stdout pointed at /dev/null so the flush at exit is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if own:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
