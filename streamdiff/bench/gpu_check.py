"""`streamdiff gpu-check`: everything that needs a GPU, in one command, most important first.

Owns: the list of parts (the `gpu`-marked tests, the kernel bench, `streamdiff bench` with the
1.3B random-weight architecture at 512x512 and 832x480, steps 1-4, 1 and 4 streams, eager /
compiled / CUDA graphs), their order and time estimates, running them inside a time budget,
and the report: JSON and a markdown table with StreamDiffusionV2's published figures beside
ours, ready for docs/benchmarks.md. Does not own: the measurements (model.py, modes.py,
kernels.py, the tests).

Order: the headline number first (512x512, 1 step, 1 stream, eager: SDV2's 26.21 fps on one
H100), correctness (the gpu tests), the other 1-step eager numbers (480p, 4 streams), the
headline graph-captured, the kernel bench, 480p captured, the headline and 480p compiled
(one block's graph since regional compilation), steps 2-4 eager, then every other captured / compiled
combination. Budget: a part starts only if its estimate
fits in what is left (a later, shorter part may still run); the bench combinations run in this
process over one build of the model, each in its own try (a failing mode is recorded, the
rest go on; one still running when the budget ends is stopped by a signal and recorded as timed
out); tests and the kernel bench run as subprocesses killed at the budget or at 1.5 times
their estimate, whichever comes first. The JSON
and the markdown are rewritten after every part, so an interrupted check keeps what it had.
Estimates are from one H200 run (see EST_*); `--dry-run` prints them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# StreamDiffusionV2 (arXiv 2511.07399), one H100, one stream, fps by denoise steps (docs/benchmarks.md).
SDV2_ONE_H100_FPS = {
    (512, 512): {1: 26.21, 2: 24.02, 3: 21.51, 4: 19.43},
    (832, 480): {1: 20.47, 2: 17.97, 3: 15.68, 4: 13.95},
}
RESOLUTIONS = ((512, 512), (832, 480))
MODES = ("eager", "compiled", "graphs")
# Estimated seconds, from the first run on one H200 (2026-12-04, docs/benchmarks.md): eager parts
# took 18-42 s at 5 s measured, graph-captured ones 14-15 s, the tests 87 s (compile tests
# failing early; their 3 then took 102 s alone), the kernel bench 9 s (no tile sweep then); the
# compiled 1.3B had not finished 105 s after its build (the whole 30-block forward then; now one
# block is compiled and every layer runs it, which on a CPU took the time of the 1-2 block forward:
# the estimate below is a guess until a GPU measures it).
EST_BUILD_S = 25.0  # 1.3B random init on the CPU, VAE, to the GPU
EST_WARMUP_S = 20.0  # engine warm-up, rehearsal, first frames, lanes filled (4 streams: ~35)
EST_COMPILE_S = {"eager": 0.0, "compiled": 60.0, "graphs": 10.0}
EST_VAE_COMPILE_S = 150.0  # not measured: the Wan VAE's first-call and steady graphs (CPU: ~2 min for the tiny)
# The VAE variants a bench part may swap in (`Part.vae`; "" is the config's own Wan VAE): the eager
# step at 512x512 was encode 43 + DiT 94 + decode 63 ms on an H200, and graphs capture only the DiT.
VAE_VARIANTS = {"compiled": {"runtime": {"compile_vae": True}},  # runtime.compile_vae
                "taehv": {"vae": {"decoder": "taehv"}}}  # TAEHV decodes (StreamDiffusionV2's --use_taehv)
EST_TESTS_S = 220.0  # 190 s measured (H200); +30 s a guess for the gpu tests added since (graphs at warm-up, pinned noise)
EST_KERNELS_S = 40.0  # 9 s without --sweep; the sweep times each Triton tile as well
SUBPROCESS_CAP = 1.5  # the tests and the kernel bench are killed at this times their estimate


@dataclass(frozen=True)
class Part:
    kind: str  # "bench" | "tests" | "kernels"
    est_s: float
    width: int = 0
    height: int = 0
    steps: int = 0
    streams: int = 0
    mode: str = ""
    vae: str = ""  # a key of VAE_VARIANTS, or "" for the config's VAE

    @property
    def name(self) -> str:
        if self.kind != "bench":
            return {"tests": "gpu-marked tests (pytest -m gpu)", "kernels": "kernel bench"}[self.kind]
        vae = f" + VAE {self.vae}" if self.vae else ""
        return f"bench {self.width}x{self.height} steps {self.steps} streams {self.streams} {self.mode}{vae}"


def plan_parts(duration_s: float) -> list[Part]:
    """Every part in the order it runs (module docstring)."""

    def bench(res, steps, streams, modes=MODES, vae=""):
        extra = EST_VAE_COMPILE_S if vae == "compiled" else 0.0
        return [Part("bench", EST_WARMUP_S + duration_s + EST_COMPILE_S[m] + extra, res[0], res[1], steps, streams, m,
                     vae) for m in modes]

    r512, r480 = RESOLUTIONS
    eager, fast = ("eager",), ("graphs", "compiled")
    # 1. The headline (SDV2's 26.21 fps), correctness, the other 1-step eager numbers.
    parts = bench(r512, 1, 1, eager) + [Part("tests", EST_TESTS_S)]
    parts += bench(r480, 1, 1, eager) + bench(r512, 1, 4, eager) + bench(r480, 1, 4, eager)
    # 2. The headline captured (cheap: ~10 s over eager), then with TAEHV decoding (the VAE is half
    #    the eager step), the kernels, 480p captured, the headline with the VAE compiled, then the
    #    DiT compiled (minutes each).
    parts += bench(r512, 1, 1, ("graphs",)) + bench(r512, 1, 1, ("graphs",), "taehv") + [Part("kernels", EST_KERNELS_S)]
    parts += bench(r480, 1, 1, ("graphs",)) + bench(r512, 1, 1, ("graphs",), "compiled")
    parts += bench(r512, 1, 1, ("compiled",)) + bench(r480, 1, 1, ("compiled",))
    # 3. Steps 2-4 eager (cheap), then every remaining compiled / captured combination.
    later = [(res, steps, streams) for steps in (2, 3, 4) for streams in (1, 4) for res in RESOLUTIONS]
    for res, steps, streams in later:
        parts += bench(res, steps, streams, eager)
    parts += bench(r512, 1, 4, fast) + bench(r480, 1, 4, fast)
    for res, steps, streams in later:
        parts += bench(res, steps, streams, fast)
    return parts


def schedule(parts: list[Part], budget_s: float, build_s: float = EST_BUILD_S) -> list[tuple[Part, bool]]:
    """(part, fits) by the estimates: the model build is paid before the first bench part."""
    used, built, out = 0.0, False, []
    for part in parts:
        cost = part.est_s + (build_s if part.kind == "bench" and not built else 0.0)
        fits = used + cost <= budget_s
        if fits:
            used += cost
            built = built or part.kind == "bench"
        out.append((part, fits))
    return out


def format_dry_run(parts: list[Part], budget_s: float) -> str:
    lines = [f"streamdiff gpu-check plan (budget {budget_s:.0f} s; estimates from one H200 run, EST_* in bench/gpu_check.py):"]
    used, built = 0.0, False
    for i, (part, fits) in enumerate(schedule(parts, budget_s), 1):
        extra = EST_BUILD_S if part.kind == "bench" and not built and fits else 0.0
        if fits:
            used += part.est_s + extra
            built = built or part.kind == "bench"
        note = f" (+{extra:.0f} s model build)" if extra else ""
        state = f"done by {used:5.0f} s" if fits else "skipped (budget)"
        lines.append(f"{i:3d}. {part.name:<58} ~{part.est_s:4.0f} s{note:<22} {state}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- running


def run_check(parts: list[Part], budget_s: float, out_dir: Path, execute: Callable[[Part, float], dict],
              header: dict, clock: Callable[[], float] = time.monotonic, progress: Callable[[str], None] = print) -> dict:
    """Run the parts that fit in what is left of the budget; write JSON + markdown after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = clock()
    report = {**header, "budget_s": budget_s, "parts": []}
    built = False
    for part in parts:
        left = budget_s - (clock() - start)
        need = part.est_s + (EST_BUILD_S if part.kind == "bench" and not built else 0.0)
        entry = {"part": part.name, **asdict(part)}
        if need > left:
            entry.update(status="skipped", reason=f"budget: ~{need:.0f} s needed, {left:.0f} s left")
        else:
            progress(f"[{clock() - start:6.0f} s] {part.name}")
            t0 = clock()
            try:  # a subprocess part may overrun its estimate by half, never eat the whole budget
                entry.update(execute(part, left if part.kind == "bench" else min(left, SUBPROCESS_CAP * part.est_s)))
            except PartTimeout as exc:
                entry.update(status="timed out", summary=str(exc))
            except Exception as exc:  # noqa: BLE001 - one failing part must not end the check
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            entry["wall_s"] = round(clock() - t0, 1)
            built = built or part.kind == "bench"
        report["parts"].append(entry)
        report["elapsed_s"] = round(clock() - start, 1)
        write_report(report, out_dir)
    return report


class PartTimeout(Exception):
    """A part stopped at the end of the budget."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in this (main) thread after `seconds`: a bench part runs in this process
    (one build of the model), so only a signal stops one that overruns, such as an inductor
    compile of the 1.3B that takes longer than the budget has left. Elsewhere than the main
    thread, or without SIGALRM, the part runs unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise PartTimeout(f"stopped at the budget, {seconds:.0f} s in")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    from streamdiff.bench.report import write_json

    json_path = write_json(report, out_dir / "gpu-check.json")
    md_path = out_dir / "gpu-check.md"
    md_path.write_text(markdown(report))
    return json_path, md_path


def markdown(report: dict) -> str:
    """The table for docs/benchmarks.md: our numbers beside StreamDiffusionV2's."""
    lines = [f"### gpu-check: {report.get('config', '?')} ({report.get('weights', 'random')} weights) on "
             f"{report.get('device', '?')}",
             "",
             f"torch {report.get('torch_version', '?')}, commit {report.get('git_commit') or '?'}, "
             f"{report.get('duration_s', '?')} s measured per combination, budget {report['budget_s']:.0f} s, "
             f"{report.get('elapsed_s', 0):.0f} s used. Command: `{report.get('command', 'streamdiff gpu-check')}`",
             "",
             "| size | steps | streams | mode | fps | fps/stream | SDV2 1×H100, 1 stream | ttff s | chunk p50 ms "
             "| MFU % | host ms/step | peak GiB (plan) | graph breaks / recompiles | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["parts"]:
        if e["kind"] != "bench" or e.get("status") == "skipped":
            continue
        sdv2 = SDV2_ONE_H100_FPS.get((e["width"], e["height"]), {}).get(e["steps"])
        vae = f" + VAE {e['vae']}" if e.get("vae") else ""
        head = f"| {e['width']}x{e['height']} | {e['steps']} | {e['streams']} | {e['mode']}{vae} |"
        sdv2_cell = f"{sdv2:.2f}" if sdv2 and e["streams"] == 1 else "-"
        r = e.get("result")
        if e.get("status") != "ok" or not r:
            lines.append(f"{head} {e.get('status')}: {(e.get('error') or e.get('summary', ''))[:80]} | | {sdv2_cell} "
                         "| | | | | | | |")
            continue
        c = r.get("compile") or {}
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
        plan = f" ({r['planned_peak_mb'] / 1024:.1f})" if r.get("planned_peak_mb") else ""
        lines.append(
            f"{head} {r['fps']:.2f} | {r['fps_per_stream']:.2f} | {sdv2_cell} | {r['ttff_s']:.2f} | "
            f"{r['chunk_latency_ms']['p50']:.1f} | {mfu} | {r['host_ms_per_step']:.2f} | "
            f"{r['peak_memory_mb'] / 1024:.1f}{plan} | {c.get('graph_breaks', '-')} / {c.get('recompiles', '-')} | "
            f"{c.get('compile_s', '-')} |")
    others = [e for e in report["parts"] if e["kind"] != "bench" and e.get("status") != "skipped"]
    for e in others:
        lines += ["", f"**{e['part']}**: {e.get('status')} ({e.get('summary') or e.get('error', '')}); "
                  f"log `{e.get('log', '-')}`"]
    skipped = [e["part"] for e in report["parts"] if e.get("status") == "skipped"]
    if skipped:
        lines += ["", f"Not run (budget): {len(skipped)} parts, from '{skipped[0]}' on."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- CUDA side


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """The test files that hold `gpu`-marked tests. pytest is handed these alone: collecting the
    whole suite imports the server's tests, whose aiortc / av a bare GPU image may lack, and one
    collection error fails the run before any test."""
    return sorted(f for f in tests_dir.rglob("test_*.py") if "mark.gpu" in f.read_text())


class CudaParts:
    """Executes parts on this machine's GPU: bench combinations in-process over one build.
    (Nothing here needs CUDA itself: tests run it on the CPU with the tiny preset.)"""

    def __init__(self, config: str, duration_s: float, out_dir: Path, overrides: tuple[str, ...] = ()):
        from streamdiff.bench.model import ModelBenchSettings

        self.settings = ModelBenchSettings(config=config, overrides=overrides, random_weights=True,
                                           duration_s=duration_s, quiet=True, command="streamdiff gpu-check")
        self.out_dir = out_dir
        self.comps = self.cfg = self.peak = None
        self._plans: dict = {}
        self._vaes: dict = {}  # VAE_VARIANTS built so far

    def header(self) -> dict:
        import platform

        import torch

        from streamdiff.bench.device import device_name
        from streamdiff.bench.model import _git_commit

        return {"mode": "gpu-check", "config": self.settings.config, "weights": "random",
                "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                "torch_version": torch.__version__,
                "python_version": platform.python_version(), "git_commit": _git_commit(),
                "duration_s": self.settings.duration_s, "sdv2_one_h100_fps": {
                    f"{w}x{h}": v for (w, h), v in SDV2_ONE_H100_FPS.items()}}

    def __call__(self, part: Part, left_s: float) -> dict:
        if part.kind == "tests":
            files = [str(f) for f in gpu_test_files(Path("tests"))]
            return self._subprocess([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                     *files], "gpu-tests.log", left_s)
        if part.kind == "kernels":
            return self._subprocess([sys.executable, "-m", "streamdiff.bench.kernels", "--lanes", "1", "4",
                                     "--streams", "1", "4", "--sweep"], "kernels.log", left_s)
        with deadline(left_s):
            return self._bench(part)

    def _build(self) -> None:
        from streamdiff.bench.device import device_name, peak_tflops_for
        from streamdiff.bench.model import bench_config
        from streamdiff.model.build import build_components

        self.cfg = bench_config(self.settings)
        self.comps = build_components(self.cfg)
        self.peak, _ = peak_tflops_for(device_name(self.comps.device), self.comps.device.type, None)

    def _bench(self, part: Part) -> dict:
        from streamdiff.bench.model import run_combination

        if self.comps is None:
            self._build()
        own = self.comps.vae
        cfg, self.comps.vae = self._vae(part.vae) if part.vae else (self.cfg, own)
        try:  # the part's config too: the runner and the warm-up follow runtime.compile_vae
            result = run_combination(self.comps, cfg, part.steps, part.width, part.height, part.streams,
                                     self.settings, self.peak, None, part.mode)
        finally:
            self.comps.vae = own
        if result["stopped"]:  # Ctrl-C during its measurement or after: the check stops, as anywhere else
            raise KeyboardInterrupt
        result.pop("series", None)
        if part.steps == 1 and not part.vae and self.comps.device.type == "cuda":  # the planner beside the measured peak
            result["planned_peak_mb"] = self._planned_mb(part)
        return {"status": "ok", "result": result}

    def _vae(self, name: str):
        """(config, VAE) of a variant beside the built one (random weights like it), built on first use."""
        if name not in self._vaes:
            from streamdiff.config import with_overrides
            from streamdiff.model.build import build_streaming_vae

            cfg = with_overrides(self.cfg, **VAE_VARIANTS[name])
            self._vaes[name] = (cfg, build_streaming_vae(cfg, self.comps.device, self.comps.dtype))
        return self._vaes[name]

    def _planned_mb(self, part: Part) -> float:
        """streamdiff plan's device bytes for this combination, without the CUDA-context reserve
        (max_memory_allocated counts tensors only) and the text-embedding cache."""
        from streamdiff.bench.memory_plan import plan_memory

        key = (part.width, part.height, part.steps)
        if key not in self._plans:
            self._plans[key] = plan_memory(self.cfg, "cuda", *key)
        plan = self._plans[key]
        return (plan.total(part.streams) - plan.reserve - plan.text_cache) / 2**20

    def _subprocess(self, argv: list[str], log_name: str, left_s: float) -> dict:
        log = self.out_dir / log_name
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=max(left_s, 1.0), env=env)
        except subprocess.TimeoutExpired as exc:
            log.write_text((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
            return {"status": "timed out", "log": str(log), "summary": f"killed at the budget ({left_s:.0f} s)"}
        log.write_text(proc.stdout + proc.stderr)
        tail = [line for line in proc.stdout.splitlines() if line.strip()]
        return {"status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
                "log": str(log), "summary": tail[-1][:200] if tail else ""}


__all__ = ["Part", "PartTimeout", "RESOLUTIONS", "SDV2_ONE_H100_FPS", "CudaParts", "deadline", "format_dry_run",
           "gpu_test_files", "markdown", "plan_parts", "run_check", "schedule"]
