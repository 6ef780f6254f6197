"""`streamdiff bench --stages LIST` (model mode): real pipeline stages, one stream or more, per
stage count — the measured counterpart of `--simulate`'s projection.

Owns: running EngineCore over a StagedExecutor for every combination of frame size x denoise
steps x streams x stage count — in-process stages (a thread per stage: `ThreadedStages`) or Ray
actors (`--ray`) — what is measured per combination, and the report (table rows, JSON).
Does not own: argument parsing (cli.py), the stages themselves (parallel/), the quantile and
JSON helpers (report.py).

Feeding is throughput mode, as in bench/model.py: each stream with no frames waiting gets a
full chunk of fresh synthetic frames before every engine step (arrival = push time); the SLO
is relaxed, so each stream gets the automatic lane stride D = stages (`parallel.lane_stride`
overrides it) and up to one plan per stage is in flight. With `parallel.block_delay_ms` every
stage sleeps that long per block per forward, so a CPU machine plays GPU-bound stages (a drill).

One combination:
  1. executor: the model split evenly (`parallel.partition` if given) over S stages; engine
     with a fixed cost model (admission and batching never refuse);
  2. warm-up: add the streams, feed and step until each stream has output
     `window + lag + 2` chunks (every KV lane full, the lag filled, first calls done);
  3. measure for `duration_s`: feed, step, take outputs; the window runs from the first
     measured step to the end of the last collected plan.
Per combination: fps (output frames / window, all streams), frame latency percentiles
(arrival -> end of the plan that output it: the pipeline's whole latency, lag included),
and each stage's busy share (its time running forwards / window, from the stages' own timing).
"""

from __future__ import annotations

import time

from streamdiff.bench import report as benchreport
from streamdiff.bench.model import ModelBenchSettings, bench_config
from streamdiff.config import Config, with_overrides

WARMUP_MAX_STEPS = 400


def run_stage_combination(cfg: Config, stages: int, steps: int, width: int, height: int, streams: int,
                          settings: ModelBenchSettings, ray: bool) -> dict:
    """Measure one (frame size, steps, streams, stages) combination (module docstring)."""
    from streamdiff.engine.core import EngineCore
    from streamdiff.engine.types import StreamParams
    from streamdiff.parallel import staged_executor
    from streamdiff.pipeline.frames import synthetic_clip
    from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw, StreamSLO

    cfg_c = with_overrides(cfg, video={"width": width, "height": height}, sampling={"steps": steps},
                           parallel={"num_stages": stages})
    executor = staged_executor(cfg_c, ray=ray, rebalance=False)
    counts = list(executor.counts)
    clock = time.monotonic
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=streams)
    core = EngineCore(cfg_c, executor, scheduler=sched, clock=clock)
    sids = [f"s{i}" for i in range(streams)]
    clips = {sid: synthetic_clip(61, width, height, seed=i) for i, sid in enumerate(sids)}
    pos = dict.fromkeys(sids, 0)
    relaxed = StreamSLO(target_fps=1.0, deadline_ms=1e9)
    try:
        # 1. Streams (automatic lane stride: as many as stages, unless overridden).
        for i, sid in enumerate(sids):
            params = StreamParams.defaults(cfg_c, f"{settings.prompt} #{i}").with_changes({"seed": i})
            if not core.add_stream(sid, params, relaxed):
                raise RuntimeError(f"stream {sid} refused")
        stride = core.params(sids[0]).lane_stride

        def feed() -> None:
            for sid in sids:
                if core.waiting_frames(sid):
                    continue
                need = 5 if pos[sid] == 0 else 4
                for _ in range(need):
                    core.push_frame(sid, clips[sid][pos[sid] % len(clips[sid])])
                    pos[sid] += 1

        # 2. Warm-up: KV lanes full, lag filled.
        want = cfg_c.cache.window + (steps - 1) * stride + 2
        chunks_out = dict.fromkeys(sids, 0)
        for _ in range(WARMUP_MAX_STEPS):
            if min(chunks_out.values()) >= want:
                break
            feed()
            report = core.step()
            if report is not None and report.result is not None:
                for sid in report.result.outputs:
                    chunks_out[sid] = chunks_out.get(sid, 0) + 1
            for sid in sids:
                core.pop_outputs(sid)
        else:
            raise RuntimeError(f"internal: warm-up did not finish in {WARMUP_MAX_STEPS} steps")

        # 3. Measure.
        latencies_ms: list[float] = []
        frames = 0
        busy_before = list(executor.stage_busy_ms)
        start_s = end_s = clock()
        while end_s - start_s < settings.duration_s:
            feed()
            report = core.step()
            if report is not None and report.result is not None:
                end_s = report.result.end_s
            for sid in sids:
                outs = core.pop_outputs(sid)
                frames += len(outs)
                latencies_ms.extend(o.latency_ms for o in outs)
        window_s = end_s - start_s
        busy = [(b - a) / 1000.0 / window_s for a, b in zip(busy_before, executor.stage_busy_ms)]
        in_flight = executor.peak_in_flight
        core.drain()
    finally:
        executor.shutdown()
    summary = benchreport.latency_summary(latencies_ms, settings.deadline_ms)
    return {
        "stages": stages, "partition": counts, "transport": "ray" if ray else "threads",
        "steps": steps, "resolution": f"{width}x{height}", "width": width, "height": height, "streams": streams,
        "lane_stride": stride, "plans_in_flight": in_flight,
        "fps": frames / window_s, "output_frames": frames, "window_s": window_s,
        "latency_p50_ms": summary["p50"], "latency_p99_ms": summary["p99"], "latency_ms": summary,
        "stage_busy": busy,
        "block_delay_ms": cfg_c.parallel.block_delay_ms,
    }


def run_stages_bench(settings: ModelBenchSettings, stage_counts: list[int], ray: bool = False) -> dict:
    """Every combination; fps speed-up is against the first stage count of the same setting."""
    import platform

    import torch

    from streamdiff.bench.device import device_name
    from streamdiff.bench.model import _git_commit
    from streamdiff.model.build import resolve_device

    cfg = bench_config(settings)
    resolutions = settings.resolutions or ((cfg.video.width, cfg.video.height),)
    steps_list = settings.steps or (cfg.sampling.steps,)
    for stages in stage_counts:
        if stages > cfg.model.num_layers:
            raise ValueError(f"--stages {stages}: the model has only {cfg.model.num_layers} blocks")
    commit = _git_commit()  # the code that runs (read at the start: a commit made meanwhile is not it)
    results, interrupted = [], False
    try:
        for width, height in resolutions:
            for steps in steps_list:
                for streams in settings.streams:
                    base = None
                    for stages in stage_counts:
                        if not settings.quiet:
                            print(f"  {cfg.name} {width}x{height} steps {steps} streams {streams}: {stages} "
                                  f"stage(s) ...", flush=True)
                        r = run_stage_combination(cfg, stages, steps, width, height, streams, settings, ray)
                        base = base or r["fps"]
                        r["speedup"] = r["fps"] / base
                        results.append(r)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the combinations measured so far (a probe: none were shown)
        if not results:
            raise
        interrupted = True
    return {
        "mode": "stages", "command": settings.command, "config": cfg.name, "overrides": list(settings.overrides),
        "transport": "ray" if ray else "threads", "device": device_name(resolve_device(cfg.runtime.device)),
        "interrupted": interrupted,
        "combinations": len(resolutions) * len(steps_list) * len(settings.streams) * len(stage_counts),
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "git_commit": commit, "duration_s": settings.duration_s, "deadline_ms": settings.deadline_ms,
        "feeding": "throughput: every stream gets a full chunk of fresh frames whenever it has none waiting, "
                   "arrival = push time; lane stride automatic (= stages) unless parallel.lane_stride is set",
        "results": results,
    }


TABLE_COLUMNS = (
    ("resolution", "size"), ("steps", "steps"), ("streams", "streams"), ("stages", "stages"),
    ("partition", "blocks"), ("lane_stride", "D"), ("fps", "fps"), ("speedup", "speed-up"),
    ("latency_p50_ms", "p50 ms"), ("latency_p99_ms", "p99 ms"), ("busy", "stage busy %"),
)


def report_rows(report: dict) -> list[dict]:
    return [{**r, "partition": str(r["partition"]),
             "busy": "/".join(f"{100.0 * b:.0f}" for b in r["stage_busy"])} for r in report["results"]]


__all__ = ["TABLE_COLUMNS", "report_rows", "run_stage_combination", "run_stages_bench"]
