"""What `streamdiff bench` reports, shared by its model mode (bench/model.py) and its
end-to-end mode (client/bench.py): summaries of measured series, the table printed at the end,
the JSON file and the plot.

Owns: the definitions of the reported numbers (below) and how they are shown.
Does not own: measuring anything (the two modes collect the series), or the live metrics of a
running engine (metrics.py).

Definitions (the same in both modes):
- latency_ms p50/p90/p99/max: quantiles with linear interpolation over every sample.
- jitter_ms: standard deviation of the time between consecutive output frames of a stream,
  counting only gaps between bursts (a chunk's frames leaving in one burst are one arrival).
- freezes: gaps between consecutive output arrivals longer than 3 frame periods.
- fps (`fps`): output frames after the first / (last output - first output); the modes say
  which frames and window they use (the end-to-end one: frames in its measured window over the
  window's length).
- fps over time (the plot): chunk-level rates, each burst's frames over the time since the
  previous burst, drawn at the burst; 1-second bins would swing (8 -> 0 -> 4) whenever chunks
  of a few frames arrive less than once a second.
- deadline_miss_rate: share of output frames whose latency exceeds the deadline.
No numpy or matplotlib at import time (matplotlib only inside `plot`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

FREEZE_PERIODS = 3.0  # a gap longer than this many frame periods is a freeze
BURST_GAP_S = 1e-3  # output arrivals closer than this are one burst (one chunk's frames)


def quantile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation; NaN when empty."""
    if not samples:
        return math.nan
    data = sorted(samples)
    pos = q * (len(data) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_summary(latency_ms: Sequence[float], deadline_ms: float | None = None) -> dict:
    """count, mean, p50, p90, p99, max and (with a deadline) deadline misses and their rate."""
    n = len(latency_ms)
    out = {
        "count": n,
        "mean": sum(latency_ms) / n if n else math.nan,
        "p50": quantile(latency_ms, 0.5),
        "p90": quantile(latency_ms, 0.9),
        "p99": quantile(latency_ms, 0.99),
        "max": max(latency_ms) if n else math.nan,
    }
    if deadline_ms is not None:
        misses = sum(1 for v in latency_ms if v > deadline_ms)
        out["deadline_ms"] = deadline_ms
        out["deadline_misses"] = misses
        out["deadline_miss_rate"] = misses / n if n else 0.0
    return out


def arrival_gaps_s(times_s: Sequence[float]) -> list[float]:
    """Gaps between consecutive output bursts (arrivals closer than BURST_GAP_S merge)."""
    gaps, last = [], None
    for t in sorted(times_s):
        if last is not None and t - last > BURST_GAP_S:
            gaps.append(t - last)
        last = t
    return gaps


def jitter_ms(times_s: Sequence[float]) -> float:
    """NaN ("-" in tables, null in JSON) with fewer than two gaps: a spread of one gap is not 0."""
    gaps = arrival_gaps_s(times_s)
    if len(gaps) < 2:
        return math.nan
    mean = sum(gaps) / len(gaps)
    return 1000.0 * math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1))


def freezes(times_s: Sequence[float], frame_period_s: float) -> int:
    """Gaps between output arrivals longer than FREEZE_PERIODS frame periods."""
    return sum(1 for g in arrival_gaps_s(times_s) if g > FREEZE_PERIODS * frame_period_s)


def fps(times_s: Sequence[float]) -> float:
    """Output frames per second over the span of `times_s` (frames after the first / span)."""
    if len(times_s) < 2:
        return 0.0
    span = max(times_s) - min(times_s)
    return (len(times_s) - 1) / span if span > 0 else 0.0


def fps_series(times_s: Sequence[float], bin_s: float = 1.0) -> list[tuple[float, float]]:
    """(bin start, frames per second) over consecutive bins from the first output."""
    if not times_s:
        return []
    t0 = min(times_s)
    counts: dict[int, int] = {}
    for t in times_s:
        k = int((t - t0) // bin_s)
        counts[k] = counts.get(k, 0) + 1
    return [(k * bin_s, counts.get(k, 0) / bin_s) for k in range(max(counts) + 1)]


def chunk_fps_series(times_s: Sequence[float]) -> list[tuple[float, float]]:
    """(time since the first output, fps) per output burst after the first: the burst's frames
    over the gap since the previous burst (arrivals closer than BURST_GAP_S are one burst)."""
    bursts: list[list[float]] = []
    for t in sorted(times_s):
        if bursts and t - bursts[-1][-1] <= BURST_GAP_S:
            bursts[-1].append(t)
        else:
            bursts.append([t])
    if not bursts:
        return []
    t0 = bursts[0][0]
    return [(cur[0] - t0, len(cur) / (cur[0] - prev[0])) for prev, cur in zip(bursts, bursts[1:])]


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: `columns` are (key in the row, header); floats with 2 decimals."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.2f}"
        return "-" if v is None else str(v)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _clean(obj: object) -> object:
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(report: Mapping[str, object], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")
    return path


def plot(series: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "",
         deadline_ms: float | None = None) -> Path:
    """Latency CDF (left, with the deadline drawn) and fps over time from chunk-level rates
    (right), one line per series. `series[name]` has "latency_ms" (samples) and "times_s"
    (output arrival times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cdf, ax_fps) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in series.items():
        lat = sorted(s.get("latency_ms", ()))
        if lat:
            ax_cdf.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=name)
        pts = chunk_fps_series(s.get("times_s", ()))
        if pts:
            ax_fps.plot([t for t, _ in pts], [v for _, v in pts], marker=".", label=name)
    if deadline_ms is not None:
        ax_cdf.axvline(deadline_ms, color="red", linestyle="--", label=f"deadline {deadline_ms:g} ms")
    ax_cdf.set(xlabel="latency (ms)", ylabel="share of frames", title="latency CDF")
    ax_fps.set(xlabel="time (s)", ylabel="fps (per chunk)", title="delivered fps")
    for ax in (ax_cdf, ax_fps):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:  # a series of one burst draws no fps line (matplotlib warned)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "FREEZE_PERIODS",
    "arrival_gaps_s",
    "chunk_fps_series",
    "format_table",
    "fps",
    "fps_series",
    "freezes",
    "jitter_ms",
    "latency_summary",
    "plot",
    "quantile",
    "write_json",
]
