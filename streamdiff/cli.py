"""The `streamdiff` command line: render (offline, one stream through StreamPipeline), serve
(the WebRTC gateway) and control (change a live stream's parameters).

Owns: argument parsing, turning known failures into one-line errors (exit 2, no traceback),
and the progress display. Does not own: any model or serving logic.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from streamdiff.config import ConfigError, load_config

SYNTHETIC = "synthetic"  # --input synthetic: the built-in clip of moving shapes


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CliError(f"--size {text!r} must look like 512x512") from None
    return width, height


def cmd_render(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamdiff.client.video_io import VideoInputError, VideoWriter, probe, read_frames
    from streamdiff.model.build import build_components
    from streamdiff.pipeline.frames import synthetic_clip
    from streamdiff.pipeline.stream_pipeline import StreamPipeline

    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"sampling.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    size = _parse_size(args.size)

    # 1. Open the input (or make the synthetic clip) and settle the processing size.
    if args.input == SYNTHETIC:
        width, height = size or (cfg.video.width, cfg.video.height)
        fps, total = cfg.video.fps, args.frames
        frames_iter = iter(synthetic_clip(total, width, height, seed=cfg.sampling.seed))
    else:
        try:
            info = probe(args.input)
        except VideoInputError as exc:
            raise CliError(str(exc)) from None
        width, height = size or (info.width, info.height)
        fps, total = info.fps, info.frames
        frames_iter = read_frames(args.input, size)
    if width % 16 or height % 16:
        raise CliError(
            f"frame size {width}x{height} cannot go through the VAE and patching: width and height must be "
            f"multiples of 16 (resize on the way in with --size, e.g. --size {width // 16 * 16}x{height // 16 * 16})"
        )

    # 2. Build the model and the pipeline.
    t_build = time.perf_counter()
    comps = build_components(cfg)
    pipe = StreamPipeline(comps, args.prompt, width=width, height=height)
    build_s = time.perf_counter() - t_build

    # 3. Stream the frames through, chunk by chunk, writing outputs as they come.
    frames_in = 0
    t_run = time.perf_counter()
    with VideoWriter(args.output, width, height, fps) as writer, tqdm(
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
        writer.write(pipe.flush())
    run_s = time.perf_counter() - t_run
    if not args.quiet:
        print(
            f"wrote {writer.frames_written} frames {width}x{height} @ {fps:g} fps to {args.output} "
            f"({frames_in / run_s:.2f} frames/s; model build {build_s:.1f} s)"
        )
    if writer.frames_written != frames_in:
        raise CliError(f"internal: wrote {writer.frames_written} frames for {frames_in} in")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from streamdiff.server.app import ServerSettings, serve

    cfg = load_config(args.config, list(args.set or []))
    settings = ServerSettings(
        token=args.token, max_sessions=args.max_sessions, target_fps=args.target_fps,
        deadline_ms=args.deadline_ms, bitrate_bps=int(args.bitrate_kbps * 1000), ice_loopback=args.ice_loopback,
    )
    serve(cfg, host=args.host, port=args.port, settings=settings)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from streamdiff.client.control import run

    params = {k: v for k, v in (("prompt", args.prompt), ("steps", args.steps), ("noise", args.noise),
                                ("seed", args.seed), ("motion", args.motion)) if v is not None}
    if not params:
        raise CliError("nothing to change: give --prompt, --steps, --noise, --seed or --motion")
    try:
        return run(args.url, args.session, params, args.token)
    except OSError as exc:
        raise CliError(f"cannot reach {args.url}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamdiff", description="Real-time streaming video diffusion")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="restyle a video file offline through the streaming pipeline")
    render.add_argument("--config", default="tiny", help="preset name (tiny, wan-1.3b, wan-14b) or a YAML file")
    render.add_argument("--input", required=True, help=f"a video file PyAV can read, or '{SYNTHETIC}'")
    render.add_argument("--prompt", required=True)
    render.add_argument("--output", required=True, help="output video path (.mp4)")
    render.add_argument("--steps", type=int, choices=[1, 2, 3, 4], help="denoise steps (overrides sampling.steps)")
    render.add_argument("--size", help="resize input to WxH on the way in (multiples of 16)")
    render.add_argument("--frames", type=int, default=96, help=f"frame count of --input {SYNTHETIC}")
    render.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. cache.window=8")
    render.add_argument("-q", "--quiet", action="store_true")
    render.set_defaults(func=cmd_render)

    serve = sub.add_parser("serve", help="run the WebRTC gateway (browser, WHIP/WHEP for OBS, control, metrics)")
    serve.add_argument("--config", default="tiny", help="preset name (tiny, wan-1.3b, wan-14b) or a YAML file")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on session and control routes")
    serve.add_argument("--max-sessions", type=int, help="stream limit (default cache.max_streams)")
    serve.add_argument("--target-fps", type=float, help="per-stream SLO for admission (default video.fps)")
    serve.add_argument("--deadline-ms", type=float, default=1000.0, help="per-frame deadline for admission")
    serve.add_argument("--bitrate-kbps", type=float, default=4000, help="fixed video encoder bitrate")
    serve.add_argument("--ice-loopback", action="store_true", help="also offer 127.0.0.1 ICE candidates")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. video.width=320")
    serve.set_defaults(func=cmd_serve)

    control = sub.add_parser("control", help="change a live stream's prompt / steps / noise / seed")
    control.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    control.add_argument("--session", required=True, help="session id, or the WHIP stream key of an OBS stream")
    control.add_argument("--token")
    control.add_argument("--prompt")
    control.add_argument("--steps", type=int, choices=[1, 2, 3, 4])
    control.add_argument("--noise", type=float, help="noise strength 0.1-1.0")
    control.add_argument("--seed", type=int)
    control.add_argument("--motion", type=lambda v: v.lower() in ("1", "true", "on", "yes"), help="motion-aware noise on/off")
    control.set_defaults(func=cmd_control)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CliError, ConfigError, FileNotFoundError) as exc:
        print(f"streamdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
