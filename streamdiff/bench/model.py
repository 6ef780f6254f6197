"""Model mode of `streamdiff bench`: the engine and the real model on synthetic clips, no network.

Owns: running EngineCore + LocalExecutor(ModelRunner) for every combination of denoise steps x
frame size x stream count, what is measured per combination, and the report dict (the CLI
prints the table, writes the JSON and the plot with streamdiff.bench.report).
Does not own: argument parsing (cli.py), the definitions shared with the end-to-end mode
(quantiles, jitter, JSON, plot: bench/report.py), the FLOP count (model/flops.py).

Input feeding (throughput mode, the only mode): before every engine step, each stream that has
no frames waiting gets one full chunk of fresh synthetic frames (5 for its first chunk, then 4),
all pushed at once and stamped with arrival = push time. The scheduler's SLO is relaxed
(admission and batching never refuse), so every step batches every stream, nothing is dropped,
and the engine runs flat out: fps is the engine's capacity, not a camera's rate.

One combination:
  1. engine: ModelRunner over the shared components (built once per run: the DiT and VAE do
     not depend on frame size or steps), a KV pool for exactly `streams` streams (x 4 lanes x
     window slots), EngineCore.warmup() (a dummy stream at this size and step count);
  2. time to first frame: a rehearsal (as many streams with other prompts: added, prepared,
     removed) so first calls at this batch shape are not counted; then reset the peak-memory
     counter, add the streams (new prompts: encoding and K/V included), feed their first
     chunks, step until each has output; per stream, from just before its add_stream to the
     end of the step that output its first frame (the prepare pass);
  3. steady warm-up: feed and step until every KV lane of every stream is full (so every
     measured row attends to the whole window and the stream-batch lag is filled);
  4. measure for `duration_s`: feed, step, collect outputs, until the duration has passed;
     the window runs from the first measured push to the end of the last step.

Per combination (definitions):
- fps: output frames in the window / window seconds (all streams); fps per stream the same per
  stream. (Output leaves in bursts of a chunk, so "frames / window" rather than
  benchreport.fps, whose (n-1)/span counts one burst too many over a short window.)
- chunk latency: from the arrival of a chunk's newest input frame to the end of the step that
  outputs that chunk; frame latency: OutputFrame.latency_ms (its own arrival to that step's
  end). In throughput mode a chunk's frames arrive together, so the two agree; a live camera
  adds the time to gather a chunk, which the end-to-end mode measures.
- deadline-miss rate: share of output frames whose latency exceeds `deadline_ms`.
- jitter: benchreport.jitter_ms over each stream's output times (a chunk's burst is one
  arrival), averaged over streams.
- peak memory: CUDA, torch.cuda.max_memory_allocated after a reset at step 2 (weights, pool,
  activations); CPU, peak resident set size since step 2 (Linux /proc/self/clear_refs reset,
  read from VmHWM), or, where that reset is refused, the process's lifetime peak from
  resource.getrusage. `peak_memory_kind` says which.
- DiT TFLOP/s: analytic DiT FLOPs of the measured steps (model/flops.py) / time spent in the
  DiT phase; MFU = that / the device's dense bf16 peak (`mfu_wall`: over the whole window,
  VAE included). Peak: device.PEAK_BF16_TFLOPS by device name, or `peak_tflops`; None
  on CPU.
- step split: median ms of VAE encode / DiT / VAE decode (ModelRunner.last_phase_ms).
- mode (`modes`): eager, compiled (torch.compile of the DiT blocks, one graph all layers run) or graphs (compiled with
  CUDA graphs); every combination runs in every mode asked, side by side. `compile` and
  `host_ms_per_step`: see bench/modes.py.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from streamdiff.bench import modes as step_modes
from streamdiff.bench import report as benchreport
from streamdiff.config import Config, load_config, with_overrides
from streamdiff.bench.device import device_name, peak_tflops_for, read_peak_memory_mb, reset_peak_memory

STEADY_WARMUP_MAX_STEPS = 200


@dataclass(frozen=True)
class ModelBenchSettings:
    config: str
    overrides: tuple[str, ...] = ()
    steps: tuple[int, ...] | None = None  # None: the config's sampling.steps
    resolutions: tuple[tuple[int, int], ...] | None = None  # (width, height); None: the config's
    streams: tuple[int, ...] = (1,)
    random_weights: bool = False
    dtype: str | None = None
    duration_s: float = 10.0
    deadline_ms: float = 1000.0
    peak_tflops: float | None = None
    prompt: str = "a watercolor painting"
    quiet: bool = False
    command: str = ""
    modes: tuple[str, ...] = ("eager",)  # step modes (bench/modes.py), each combination in each


def bench_config(settings: ModelBenchSettings) -> Config:
    """The config to benchmark. `random_weights` forces seeded random init of the configured
    architecture and the built-in prompt encoder (at the configured text_dim and length);
    without it every checkpoint path must exist (FileNotFoundError with a hint, before building)."""
    overrides = list(settings.overrides)
    if settings.random_weights:
        overrides += ["weights.format=random", "text.kind=tiny"]
    if settings.dtype:
        overrides.append(f"model.dtype={settings.dtype}")
    cfg = load_config(settings.config, overrides)
    if cfg.weights.format != "random":
        needed = [("transformer", cfg.weights.transformer), ("vae", cfg.weights.vae)]
        if cfg.text.kind == "umt5":
            needed.append(("text_encoder", cfg.weights.text_encoder))
        from streamdiff.model.loading import resolve_path

        for name, path in needed:
            if not path or not resolve_path(path).exists():
                raise FileNotFoundError(
                    f"weights.{name} {path or '(empty)'} does not exist: point it at a local checkpoint "
                    f"(--set weights.{name}=PATH) or measure the architecture with --random-weights")
    return cfg


def _backend_name(attention) -> str:
    """How the built model attends (model/attention.py `Attention`)."""
    return "triton write, triton or sdpa attend per shape" if attention.choice else attention.backend


# ---------------------------------------------------------------------------------- one combination


class _Feeder:
    """Fresh synthetic frames per stream, cycling through a pre-made clip (never modified)."""

    def __init__(self, core, stream_ids: list[str], width: int, height: int):
        from streamdiff.pipeline.frames import synthetic_clip

        self.core = core
        self.clips = {sid: synthetic_clip(61, width, height, seed=i) for i, sid in enumerate(stream_ids)}
        self.pos = dict.fromkeys(stream_ids, 0)

    def feed(self, needed: Callable[[str], int]) -> None:
        """Push a full chunk to every stream with no frames waiting (arrival = push time)."""
        for sid, clip in self.clips.items():
            if self.core.waiting_frames(sid):
                continue
            for _ in range(needed(sid)):
                self.core.push_frame(sid, clip[self.pos[sid] % len(clip)])
                self.pos[sid] += 1


def _first_frames(core, runner, feeder: _Feeder, cfg: Config, prompt: str) -> list[float]:
    """Add the feeder's streams, feed and step until each has output; per stream, seconds from
    just before its add_stream to the end of the step that output its first frame."""
    from streamdiff.engine.types import StreamParams
    from streamdiff.scheduler import StreamSLO

    relaxed = StreamSLO(target_fps=1.0, deadline_ms=1e9)  # never refuse, never defer
    added_s: dict[str, float] = {}
    for i, sid in enumerate(feeder.clips):
        added_s[sid] = core.clock()
        params = StreamParams.defaults(cfg, f"{prompt} #{i}").with_changes({"seed": i})
        admission = core.add_stream(sid, params, relaxed)
        if not admission:
            raise RuntimeError(f"stream {sid} refused: {admission.reason}")
    first_s: dict[str, float] = {}
    while len(first_s) < len(added_s):
        feeder.feed(runner.frames_needed)
        if core.step() is None:
            raise RuntimeError("internal: no stream had a full chunk")
        for sid in added_s:
            outs = core.pop_outputs(sid)
            if outs and sid not in first_s:
                first_s[sid] = outs[0].output_s
    return [first_s[sid] - added_s[sid] for sid in added_s]


def run_combination(comps, cfg: Config, steps: int, width: int, height: int, streams: int,
                    settings: ModelBenchSettings, peak_tflops: float | None, bar=None, mode: str = "eager") -> dict:
    """Measure one (steps, frame size, streams, mode) combination (module docstring, steps 1-4)."""
    from streamdiff.engine.core import EngineCore
    from streamdiff.engine.executor import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner
    from streamdiff.model.flops import dit_forward_flops, tokens_per_frame
    from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw

    clock = time.monotonic
    compile_start = step_modes.enter_mode(comps, mode)
    # 1. Engine over the shared components, warmed up at this size and step count.
    cfg_c = with_overrides(cfg, video={"width": width, "height": height}, sampling={"steps": steps})
    comps_c = replace(comps, cfg=cfg_c)
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=streams)
    runner = ModelRunner(comps_c, streams, profile=True)
    core = EngineCore(cfg_c, LocalExecutor(runner, clock), scheduler=sched, clock=clock)
    core.warmup(steps, every_shape=False)  # this combination's batch shape only

    # 2. Time to first frame (prepare pass included), peak memory from here. A rehearsal with
    #    other stream ids and prompts first, so first calls at this batch shape are not in the
    #    figure (the measured streams' prompts are new: their encoding and K/V are).
    sids = [f"s{i}" for i in range(streams)]
    rehearsal = [f"rehearsal{i}" for i in range(streams)]
    _first_frames(core, runner, _Feeder(core, rehearsal, width, height), cfg_c, f"{settings.prompt} (rehearsal)")
    for sid in rehearsal:
        core.remove_stream(sid)
    memory_kind = reset_peak_memory(comps.device)
    feeder = _Feeder(core, sids, width, height)
    ttff_s = _first_frames(core, runner, feeder, cfg_c, settings.prompt)

    # 3. Steady warm-up: until every lane of every stream attends to a full window.
    window = cfg_c.cache.window
    for _ in range(STEADY_WARMUP_MAX_STEPS):
        lanes = [lane for sid in sids for lane in runner.slots.streams[sid].lanes]
        if all(lane.filled == window for lane in lanes):
            break
        feeder.feed(runner.frames_needed)
        core.step()
        for sid in sids:
            core.pop_outputs(sid)
    else:
        raise RuntimeError(f"internal: KV lanes not full after {STEADY_WARMUP_MAX_STEPS} steps")

    # 4. Measure.
    tokens = tokens_per_frame(width, height)
    chunk_lat_ms: list[float] = []
    frame_lat_ms: list[float] = []
    times_s: dict[str, list[float]] = {sid: [] for sid in sids}
    phases: dict[str, list[float]] = {}
    step_ms: list[float] = []
    rows: list[int] = []
    dit_flops = 0
    compile_before = step_modes.compile_stats()
    if bar is not None:
        bar.set_postfix_str("measuring")
    start_s = clock()
    end_s = start_s
    cut_short = False  # Ctrl-C during the measurement: what was measured is reported
    try:
        while end_s - start_s < settings.duration_s:
            feeder.feed(runner.frames_needed)
            report = core.step()
            if (report is None or report.result.forwards != 1 or len(report.plan.chunks) != streams
                    or any(c.first for c in report.plan.chunks)):
                raise RuntimeError("internal: a measured step was not one steady forward over every stream")
            flops = dit_forward_flops(cfg_c.model, report.plan.rows, cfg_c.sampling.chunk_latents, tokens,
                                      window, cfg_c.text.max_length).total
            outs = {sid: core.pop_outputs(sid) for sid in sids}
            # the step is counted whole or not at all (Ctrl-C may come anywhere above)
            end_s = report.result.end_s
            step_ms.append(report.result.step_ms)
            rows.append(report.plan.rows)
            dit_flops += flops
            for name, ms in runner.last_phase_ms.items():
                phases.setdefault(name, []).append(ms)
            for sid, got in outs.items():
                if got:
                    chunk_lat_ms.append((got[0].output_s - max(o.arrival_s for o in got)) * 1000.0)
                    frame_lat_ms.extend(o.latency_ms for o in got)
                    times_s[sid].extend(o.output_s - start_s for o in got)
            if bar is not None:  # tqdm redraws at most every 0.1 s
                bar.set_postfix_str(f"{sum(map(len, times_s.values())) / (end_s - start_s):.2f} fps", refresh=False)
                bar.update(min(end_s - start_s, settings.duration_s) - bar.n)
    except KeyboardInterrupt:
        if not frame_lat_ms:
            raise
        cut_short = True
    window_s = end_s - start_s
    peak_mb = read_peak_memory_mb(comps.device, memory_kind)
    compile_info = step_modes.compile_report(mode, compile_start, compile_before, step_modes.compile_stats())

    def steady_step() -> None:
        feeder.feed(runner.frames_needed)
        core.step()
        for sid in sids:
            core.pop_outputs(sid)

    # Ctrl-C from here on stops the run after this combination, whose measurement is whole (a probe:
    # one in the host-time profile or the shutdown lost the finished measurement, the whole run)
    stopped, host_ms = cut_short, None
    if not cut_short:
        try:
            host_ms = step_modes.host_ms_per_step(steady_step, comps.device)
        except KeyboardInterrupt:
            stopped = True
    try:
        step_modes.enter_mode(comps, "eager")
        core.executor.shutdown()
    except KeyboardInterrupt:
        stopped = True
        step_modes.enter_mode(comps, "eager")
        core.executor.shutdown()  # (idempotent: its threads end whatever the first call did)
    del core, runner, feeder
    gc.collect()
    if comps.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()

    # 5. Summaries.
    frames = sum(len(v) for v in times_s.values())
    dit_s = sum(phases.get("dit", [])) / 1000.0
    dit_tflops = dit_flops / dit_s / 1e12 if dit_s > 0 else None
    frame_summary = benchreport.latency_summary(frame_lat_ms, settings.deadline_ms)
    jitters = [benchreport.jitter_ms(times_s[sid]) for sid in sids]
    return {
        "mode": mode, "steps": steps, "width": width, "height": height, "resolution": f"{width}x{height}", "streams": streams,
        "tokens_per_frame": tokens, "rows_per_forward": max(rows), "measured_steps": len(step_ms),
        "window_s": window_s, "output_frames": frames, "cut_short": cut_short, "stopped": stopped,
        "fps": frames / window_s, "fps_per_stream": frames / window_s / streams,
        "fps_streams": [len(times_s[sid]) / window_s for sid in sids],
        "ttff_s": statistics.mean(ttff_s), "ttff_max_s": max(ttff_s), "ttff_streams_s": ttff_s,
        "chunk_latency_ms": benchreport.latency_summary(chunk_lat_ms, settings.deadline_ms),
        "frame_latency_ms": frame_summary,
        "deadline_ms": settings.deadline_ms,
        "deadline_misses": frame_summary["deadline_misses"],
        "deadline_miss_rate": frame_summary["deadline_miss_rate"],
        "jitter_ms": statistics.mean(jitters), "jitter_streams_ms": jitters,
        "peak_memory_mb": peak_mb, "peak_memory_kind": memory_kind,
        "step_ms": {"total": statistics.median(step_ms),
                    **{name: statistics.median(v) for name, v in phases.items()}},
        "dit_flops_per_step": dit_flops // len(step_ms),
        "dit_tflops_per_s": dit_tflops,
        "mfu": dit_tflops / peak_tflops if dit_tflops is not None and peak_tflops else None,
        "mfu_wall": dit_flops / window_s / 1e12 / peak_tflops if peak_tflops else None,
        "host_ms_per_step": host_ms,
        "compile": compile_info,
        "series": {"times_s": sorted(t for v in times_s.values() for t in v), "chunk_latency_ms": chunk_lat_ms},
    }


# ---------------------------------------------------------------------------------- the whole run


def run_model_bench(settings: ModelBenchSettings) -> dict:
    """Every combination (resolution x steps x streams); returns the report (see `report_rows`)."""
    import platform

    import torch
    from tqdm import tqdm

    from streamdiff.model.build import build_components

    cfg = bench_config(settings)
    commit = _git_commit()  # the code that runs (read at the start: a commit made meanwhile is not it)
    resolutions = settings.resolutions or ((cfg.video.width, cfg.video.height),)
    steps_list = settings.steps or (cfg.sampling.steps,)
    t0 = time.perf_counter()
    comps = build_components(cfg)
    build_s = time.perf_counter() - t0
    name = device_name(comps.device)
    peak, peak_source = peak_tflops_for(name, comps.device.type, settings.peak_tflops)
    step_modes.check_modes(settings.modes, comps.device)
    results = []
    combinations = [(w, h, steps, streams, mode) for w, h in resolutions for steps in steps_list
                    for streams in settings.streams for mode in settings.modes]
    interrupted = False
    try:
        for width, height, steps, streams, mode in combinations:
            desc = f"{cfg.name} {width}x{height} steps {steps} streams {streams} {mode}"
            with tqdm(total=settings.duration_s, desc=desc, unit="s", disable=settings.quiet,
                      bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s{postfix}") as bar:
                bar.set_postfix_str("warm-up" if mode == "eager" else "compile + warm-up")
                results.append(run_combination(comps, cfg, steps, width, height, streams, settings, peak,
                                               bar, mode))
            if results[-1]["stopped"]:  # Ctrl-C while it measured (reported up to there) or after
                interrupted = True
                break
    except KeyboardInterrupt:  # Ctrl-C elsewhere: the combinations done so far (none: interrupted)
        if not results:
            raise
        interrupted = True
    return {
        "mode": "model",
        "command": settings.command,
        "config": cfg.name,
        "config_source": settings.config,
        "overrides": list(settings.overrides),
        "weights": cfg.weights.format,
        "random_weights": settings.random_weights,
        "dtype": cfg.model.dtype,
        "attention_backend": _backend_name(comps.model.attention),
        "vae_compiled": cfg.runtime.compile_vae,
        "device": name,
        "device_type": comps.device.type,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": commit,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "duration_s": settings.duration_s,
        "deadline_ms": settings.deadline_ms,
        "modes": list(settings.modes),
        "build_s": build_s,
        "feeding": "throughput: every stream gets a full chunk of fresh frames right before every step, "
                   "arrival = push time; every step batches every stream",
        "results": results,
        "interrupted": interrupted,
        "combinations": len(combinations),
    }


def _git_commit() -> str | None:
    """HEAD of the checkout; STREAMDIFF_COMMIT where the code came without its .git (a copy)."""
    import os
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        out = None
    return (out.stdout.strip() if out else "") or os.environ.get("STREAMDIFF_COMMIT") or None


TABLE_COLUMNS = (
    ("resolution", "size"), ("steps", "steps"), ("streams", "streams"), ("mode", "mode"), ("fps", "fps"),
    ("fps_per_stream", "fps/stream"), ("ttff_s", "ttff s"), ("p50", "chunk p50 ms"), ("p90", "p90 ms"),
    ("p99", "p99 ms"), ("jitter_ms", "jitter ms"), ("deadline_miss_rate", "miss rate"),
    ("peak_memory_mb", "peak MiB"), ("dit_tflops", "DiT TFLOP/s"), ("mfu_pct", "MFU %"),
    ("split", "enc/DiT/dec ms"), ("host_ms_per_step", "host ms"), ("breaks", "breaks/recomp"),
)


def report_rows(report: dict) -> list[dict]:
    """One flat row per combination for benchreport.format_table(rows, TABLE_COLUMNS)."""
    rows = []
    for r in report["results"]:
        ms = r["step_ms"]
        rows.append({
            **r, **{q: r["chunk_latency_ms"][q] for q in ("p50", "p90", "p99")},
            "mfu_pct": None if r["mfu"] is None else 100.0 * r["mfu"],
            "dit_tflops": None if r["dit_tflops_per_s"] is None else f"{r['dit_tflops_per_s']:.3g}",
            "split": "/".join(f"{ms.get(k, math.nan):.1f}" for k in ("encode", "dit", "decode")),
            "breaks": None if r["compile"] is None else f"{r['compile']['graph_breaks']}/{r['compile']['recompiles']}",
        })
    return rows


def plot_series(report: dict) -> dict:
    """benchreport.plot series: one per combination (chunk latency CDF, output fps over time)."""
    return {f"{r['resolution']} s{r['steps']} x{r['streams']}" + ("" if r["mode"] == "eager" else f" {r['mode']}"): {"latency_ms": r["series"]["chunk_latency_ms"],
                                                                  "times_s": r["series"]["times_s"]}
            for r in report["results"]}


__all__ = [
    "ModelBenchSettings", "TABLE_COLUMNS", "bench_config", "plot_series", "report_rows", "run_combination",
    "run_model_bench",
]
