"""Engine benchmark: prints numbers, asserts nothing. The user-facing benchmark is
`streamdiff bench` (model mode: bench/model.py); this script keeps the scheduler
decision time and the engine-versus-StreamPipeline comparison of docs/benchmarks.md.

    python -m streamdiff.bench.engine [--config tiny] [--set k=v ...] [--streams 1,2,4]
                                      [--chunks 6] [--repeats 3] [--decision-streams 64]

1. Scheduler decision time inside the engine core with `--decision-streams` streams (1-4
   lanes, every stream with a chunk ready every step; a no-op executor, so only CPU
   bookkeeping is timed): `schedule()` median / p99 and the core's whole step overhead.
2. Throughput of the real model at the config's frame size: one StreamPipeline alone, then the
   engine serving 1, 2, 4 ... streams (each fed a chunk per step, so every step batches every
   stream); aggregate and per-stream output fps over `--chunks` steady chunks after 2 warm-up
   chunks. Output frames / wall time of the steps, VAE encode and decode included. The
   configurations run interleaved `--repeats` times and the median is printed (a shared CPU
   machine is noisy), with the step split into VAE encode / DiT / VAE decode.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from streamdiff.config import load_config
from streamdiff.engine.core import EngineCore
from streamdiff.engine.executor import RunsAtOnce
from streamdiff.engine.types import EngineStepResult, StreamOutput, StreamParams
from streamdiff.scheduler import FixedCostModel, FrameScheduler, LinearLaw, StreamSLO

RELAXED = StreamSLO(target_fps=1.0, deadline_ms=1e9)


class _NullExecutor(RunsAtOnce):
    """Echoes inputs as outputs at once: isolates the core's and the scheduler's CPU time.
    Stream commands ride in the plans; it has nothing to apply them to."""

    def execute(self, plan, inputs):
        outputs = {sid: StreamOutput(c.frames, c.metas) for sid, c in inputs.items()}
        return EngineStepResult(plan.step_id, 0.0, None, outputs=outputs, forwards=1)

    def resources(self):
        return {}

    def shutdown(self):
        pass


def decision_time(cfg, streams: int = 64, steps: int = 300) -> dict:
    cfg_w, cfg_h = cfg.video.width, cfg.video.height
    sched = FrameScheduler(FixedCostModel(LinearLaw(2.0, 0.1, 0.01)), max_streams=streams)
    core = EngineCore(cfg, _NullExecutor(), scheduler=sched)
    frame = np.zeros((cfg_h, cfg_w, 3), np.uint8)
    for i in range(streams):
        p = StreamParams.defaults(cfg, "x").with_changes({"steps": 1 + i % 4})
        assert core.add_stream(f"s{i}", p, RELAXED)
    decision_us, step_us, batch = [], [], []
    for k in range(steps):
        for i in range(streams):
            for _ in range(5 if k == 0 else 4):
                core.push_frame(f"s{i}", frame)
        t0 = time.perf_counter()
        report = core.step()
        step_us.append((time.perf_counter() - t0) * 1e6)
        decision_us.append(sched.last_decision_us)
        batch.append(len(report.plan.chunks))
        for i in range(streams):
            core.pop_outputs(f"s{i}")
    decision_us.sort()
    step_us.sort()
    return {
        "streams": streams,
        "schedule_median_us": statistics.median(decision_us),
        "schedule_p99_us": decision_us[int(0.99 * (len(decision_us) - 1))],
        "core_step_median_us": statistics.median(step_us),
        "streams_per_step": statistics.mean(batch),
    }


def pipeline_fps(comps, chunks: int) -> float:
    from streamdiff.pipeline.frames import synthetic_clip
    from streamdiff.pipeline.stream_pipeline import StreamPipeline

    w, h = comps.cfg.video.width, comps.cfg.video.height
    clip = synthetic_clip(5 + 4 * (chunks + 2), w, h, seed=0)
    pipe = StreamPipeline(comps, "a watercolor city")
    pipe.push(clip[:13])  # first chunk + one steady chunk: warm
    t0 = time.perf_counter()
    n = sum(len(pipe.push(clip[13 + 4 * i : 17 + 4 * i])) for i in range(chunks))
    return n / (time.perf_counter() - t0)


def engine_fps(comps, streams: int, chunks: int) -> dict:
    from streamdiff.engine.executor import LocalExecutor
    from streamdiff.engine.model_runner import ModelRunner
    from streamdiff.pipeline.frames import synthetic_clip

    cfg = comps.cfg
    w, h = cfg.video.width, cfg.video.height
    sched = FrameScheduler(FixedCostModel(LinearLaw(1.0, 0.0, 0.0)), max_streams=max(streams, cfg.cache.max_streams))
    runner = ModelRunner(comps, sched.max_streams, profile=True)
    core = EngineCore(cfg, LocalExecutor(runner), scheduler=sched)
    warm_max = cfg.cache.window + 2  # rounds of warm-up at most (below)
    clips = {f"s{i}": synthetic_clip(5 + 4 * (chunks + warm_max), w, h, seed=i) for i in range(streams)}
    for i, sid in enumerate(clips):
        assert core.add_stream(sid, StreamParams.defaults(cfg, f"prompt {i}").with_changes({"seed": i}), RELAXED)
    pos = dict.fromkeys(clips, 0)

    phases: dict[str, list[float]] = {}

    def round_() -> tuple[int, float, int]:
        for sid, clip in clips.items():
            n = 5 if pos[sid] == 0 else 4
            for f in clip[pos[sid] : pos[sid] + n]:
                core.push_frame(sid, f)
            pos[sid] += n
        out, step_ms, rows = 0, 0.0, 0
        while (report := core.step()) is not None:
            out += sum(report.delivered.values())
            step_ms += report.result.step_ms
            rows = max(rows, report.plan.rows)
            for name, ms in runner.last_phase_ms.items():
                phases.setdefault(name, []).append(ms)
        for sid in clips:
            core.pop_outputs(sid)
        return out, step_ms, rows

    # warm: prepare, then until every lane attends to a full window (two rounds left the lanes 4 and
    # 3 of 6 full, and a DiT whose attention grows with the cache then read a short step: a review)
    for _ in range(warm_max):
        round_()
        if all(lane.filled == cfg.cache.window for sid in clips for lane in runner.slots.streams[sid].lanes):
            break
    else:
        raise RuntimeError(f"internal: KV lanes not full after {warm_max} warm-up rounds")
    phases.clear()
    t0 = time.perf_counter()
    results = [round_() for _ in range(chunks)]
    wall_s = time.perf_counter() - t0
    frames = sum(r[0] for r in results)
    return {
        "streams": streams,
        "aggregate_fps": frames / wall_s,
        "per_stream_fps": frames / wall_s / streams,
        "step_ms_median": statistics.median(r[1] for r in results),
        "rows_per_step": max(r[2] for r in results),
        "phase_ms": {name: statistics.median(v) for name, v in phases.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], help="config override section.key=value")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decision-streams", type=int, default=64)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    import torch

    from streamdiff.model.build import build_components

    d = decision_time(cfg, args.decision_streams)
    print(f"scheduler decision, {d['streams']} streams ({d['streams_per_step']:.0f} chunks per step): "
          f"schedule() median {d['schedule_median_us']:.0f} us, p99 {d['schedule_p99_us']:.0f} us; "
          f"whole core step without the model {d['core_step_median_us']:.0f} us")
    comps = build_components(cfg)
    print(f"model: {cfg.name} {cfg.video.width}x{cfg.video.height}, steps {cfg.sampling.steps}, "
          f"device {comps.device}, torch threads {torch.get_num_threads()}, median of {args.repeats} interleaved runs")
    counts = [int(s) for s in args.streams.split(",")]
    alone_runs: list[float] = []
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        alone_runs.append(pipeline_fps(comps, args.chunks))
        for n in counts:
            runs[n].append(engine_fps(comps, n, args.chunks))
    alone = statistics.median(alone_runs)
    print(f"StreamPipeline, 1 stream alone: {alone:.2f} fps")
    for n in counts:
        r = sorted(runs[n], key=lambda x: x["aggregate_fps"])[len(runs[n]) // 2]
        split = ", ".join(f"{k} {v:.0f}" for k, v in r["phase_ms"].items())
        print(f"engine, {n} stream{'s' if n > 1 else ' '}: aggregate {r['aggregate_fps']:.2f} fps "
              f"({r['aggregate_fps'] / alone:.2f}x one alone), per stream {r['per_stream_fps']:.2f} fps, "
              f"step {r['step_ms_median']:.0f} ms for {r['rows_per_step']} rows (ms: {split})")


if __name__ == "__main__":
    main()
