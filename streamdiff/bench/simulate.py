"""Scaling projection for 1..N pipeline stages from costs measured on this machine's device.

Owns: `streamdiff bench --simulate`: measure one engine step of the configured model on one
device (VAE encode, DiT, VAE decode, split by ModelRunner's profiler) for a stream count, then
project S stages: the measured per-block cost, the balanced split (partition.balance with the
encode on the first stage and the decode on the last), the per-stage times, the step time with
the step's rows in micro-batches, fps, and weights / KV cache per GPU. The per-hop latency is
measured (hops.py, Ray channels on this host) or given. No GPU needed: the projection is only
as good as the device it measured on, and says so.
Does not own: running stages (parallel/executor.py) or the single-device benchmark (bench/model.py).

Projection (S stages, m micro-batches of the step's rows, hop h ms):
  stage k time t_k = fixed_k + n_k * per_block   (fixed: encode on 0, decode on S-1)
  step = (sum_k t_k + (m - 1) * max_k t_k) / m + (S - 1) * h
(each micro-batch takes t_k / m on stage k; the first goes through every stage, each later one
leaves one slowest-stage slot after the previous). fps = frames per step / step. That is the
schedule of streams whose lane stride is 1. With plans in flight (lane stride D = S, the
default: docs/scaling.md) one plan ends per pipeline period:
  period = max_k t_k + h (S > 1),  fps_overlapped = frames per step / period,
  latency (one plan through the stages) = sum_k t_k + (S - 1) * h.
"""

from __future__ import annotations

from streamdiff.config import Config
from streamdiff.parallel.partition import balance, stage_times

# StreamDiffusionV2 (arXiv 2511.07399), H100s, as reported: one GPU (480p, 1-4 denoise steps)
# and the abstract's four-GPU figures (resolution and steps not stated there).
SDV2_ONE_H100_480P_FPS = {1: 20.47, 2: 17.97, 3: 15.68, 4: 13.95}
SDV2_FOUR_H100_FPS = {"wan-1.3b": 64.52, "wan-14b": 58.28}


def measure_step(cfg: Config, streams: int, chunks: int = 4, repeats: int = 3) -> dict:
    """Median phase times (ms) of a steady engine step batching `streams` streams."""
    from streamdiff.bench.engine import engine_fps
    from streamdiff.model.build import build_components

    comps = build_components(cfg)
    runs = [engine_fps(comps, streams, chunks) for _ in range(repeats)]
    run = sorted(runs, key=lambda r: r["step_ms_median"])[len(runs) // 2]  # the median run
    phases = run["phase_ms"]
    block_params = sum(p.numel() for n, p in comps.model.named_parameters() if n.startswith("blocks.0."))
    return {
        "streams": streams,
        "step_ms": run["step_ms_median"],
        "encode_ms": phases.get("encode", 0.0),
        "dit_ms": phases.get("dit", 0.0),
        "decode_ms": phases.get("decode", 0.0),
        "rows": run["rows_per_step"],
        "frames_per_step": 4 * streams,
        "measured_fps": run["aggregate_fps"],
        "block_params": block_params,
        "bytes_per_param": comps.model.dtype.itemsize,
        "device": str(comps.device),
    }


def kv_bytes_per_layer(cfg: Config, streams: int) -> int:
    from streamdiff.engine.model_runner import MAX_LANES

    m = cfg.model
    tokens = (cfg.video.height // 16) * (cfg.video.width // 16)
    itemsize = 2 if m.dtype in ("bfloat16", "float16") else 4
    return 2 * streams * MAX_LANES * cfg.cache.window * tokens * m.num_heads * m.head_dim * itemsize


def project(measured: dict, cfg: Config, num_stages: int, hop_ms: float, micro_batches: int = 0) -> dict:
    layers = cfg.model.num_layers
    per_block = measured["dit_ms"] / layers
    enc, dec = measured["encode_ms"], measured["decode_ms"]
    if num_stages == 1:
        fixed = [enc + dec]
    else:
        fixed = [enc] + [0.0] * (num_stages - 2) + [dec]
    counts = balance(layers, fixed, [per_block] * num_stages)
    times = stage_times(counts, fixed, [per_block] * num_stages)
    m = 1 if num_stages == 1 else max(1, min(micro_batches or num_stages, measured["rows"]))
    step_ms = (sum(times) + (m - 1) * max(times)) / m + (num_stages - 1) * hop_ms
    weights_gb = [n * measured["block_params"] * measured["bytes_per_param"] / 1e9 for n in counts]
    kv_gb = [n * kv_bytes_per_layer(cfg, measured["streams"]) / 1e9 for n in counts]
    fps = measured["frames_per_step"] / (step_ms / 1000.0)
    period_ms = max(times) + (hop_ms if num_stages > 1 else 0.0)
    return {
        "stages": num_stages,
        "partition": counts,
        "stage_ms": [round(t, 2) for t in times],
        "micro_batches": m,
        "step_ms": step_ms,
        "fps": fps,
        "period_ms": period_ms,
        "fps_overlapped": measured["frames_per_step"] / (period_ms / 1000.0),
        "plan_latency_ms": sum(times) + (num_stages - 1) * hop_ms,
        "max_block_weights_gb_per_gpu": max(weights_gb),
        "max_kv_gb_per_gpu": max(kv_gb),
    }


def simulate(cfg: Config, stage_counts: list[int], streams: int, hop_ms: float | None = None,
             hop_stages: int = 3) -> dict:
    """Measure on this device, then project every stage count (1 included as the baseline)."""
    measured = measure_step(cfg, streams)
    hop = {"hop_ms": hop_ms, "source": "given"}
    if hop_ms is None:
        from streamdiff.bench.hops import measure_hop_ms

        tokens = (cfg.video.height // 16) * (cfg.video.width // 16)
        payload = measured["rows"] * cfg.sampling.chunk_latents * tokens * cfg.model.dim * 2
        hop = dict(measure_hop_ms(payload, hop_stages), source="measured")
    rows = [project(measured, cfg, s, hop["hop_ms"], cfg.parallel.micro_batches) for s in stage_counts
            if s <= cfg.model.num_layers]
    base = next((r["fps"] for r in rows if r["stages"] == 1), None) or project(measured, cfg, 1, 0.0)["fps"]
    for r in rows:
        r["speedup"] = r["fps"] / base
        r["speedup_overlapped"] = r["fps_overlapped"] / base
    return {"config": cfg.name, "resolution": f"{cfg.video.width}x{cfg.video.height}",
            "steps": cfg.sampling.steps, "measured": measured, "hop": hop, "projection": rows,
            "sdv2_reference": {"one_h100_480p_fps": SDV2_ONE_H100_480P_FPS, "four_h100_fps": SDV2_FOUR_H100_FPS}}


__all__ = ["SDV2_FOUR_H100_FPS", "SDV2_ONE_H100_480P_FPS", "kv_bytes_per_layer", "measure_step", "project", "simulate"]
