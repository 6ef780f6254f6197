"""`streamdiff plan` against what a real CPU run allocates (tiny model, 64x48, 2 steps).

The plan is built on the meta device; the real side builds the components on the CPU, runs a
stream through StreamPipeline to a steady state, and reads the bytes of the tensors it holds.
Weights, KV pool, prompt K/V, VAE caches: exact. Activations: the live-tensor peak of one
real steady chunk (encode, one forward of 2 rows, decode) against the plan's, same tracker.
"""

from __future__ import annotations

import gc
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from streamdiff.cli import main
from streamdiff.config import load_config
from streamdiff.bench.memory_plan import GiB, LiveBytes, format_plan, module_bytes, parse_bytes, plan_memory
from streamdiff.engine.model_runner import MAX_LANES
from streamdiff.model.build import build_components
from streamdiff.pipeline.frames import synthetic_clip
from streamdiff.pipeline.stream_pipeline import StreamPipeline

OVERRIDES = ["video.width=64", "video.height=48", "runtime.device=cpu", "sampling.steps=2",
             "model.attention_backend=torch"]
ACTIVATIONS = ("act_dit_fixed", "act_dit_row", "act_vae_fixed", "act_vae_stream")


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", OVERRIDES)


@pytest.fixture(scope="module")
def plan(cfg):
    return plan_memory(cfg, "cpu")


@pytest.fixture(scope="module")
def steady(cfg):
    """A real stream at steady state (every lane's window full), and the peak of one more chunk."""
    comps = build_components(cfg)
    pipe = StreamPipeline(comps, "a watercolor painting")
    clip = synthetic_clip(48, 64, 48, seed=0)
    pipe.push(clip[:5])
    for i in range(cfg.cache.window + 2):  # first chunk, then enough chunks to fill every window
        pipe.push(clip[5 + 4 * (i % 8): 9 + 4 * (i % 8)])
    assert all(pipe.slots.lane(0, j).filled == cfg.cache.window for j in range(2))
    peaks = {}
    forward = comps.model.forward

    def measured_forward(*args, **kwargs):  # the DiT forward alone, inside the chunk
        inner = _tracker()
        with inner:
            out = forward(*args, **kwargs)
        peaks["dit"] = inner.peak
        return out

    comps.model.forward = measured_forward
    live = _tracker()
    with torch.no_grad(), live:
        pipe.push(clip[9:13])
    del comps.model.forward
    return comps, pipe, live.peak, peaks["dit"]


def _tracker() -> LiveBytes:
    """Live-bytes tracker from now on: every tensor alive now is 'existing' (no list kept alive,
    so tensors replaced inside, like the VAE caches, are seen freed)."""
    gc.collect()
    return LiveBytes([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])


def test_weights_are_what_the_built_modules_hold(plan, steady):
    comps, *_ = steady
    assert plan.dit_weights == module_bytes(comps.model)
    assert plan.vae_weights == module_bytes(comps.vae.vae)
    assert plan.text_weights == sum(t.nbytes for t in vars(comps.text).values() if isinstance(t, torch.Tensor))
    assert plan.text_placement == "cpu"  # the tiny encoder's tables stay on the CPU
    assert sum(plan.stage_weights) == plan.dit_weights and plan.stage_blocks == [2]


def test_kv_pool_prompt_kv_and_vae_caches_are_exact(cfg, plan, steady):
    comps, pipe, *_ = steady
    assert pipe.pool.k.nbytes + pipe.pool.v.nbytes == plan.kv_needed == 2 * plan.kv_lane  # a lane per step
    assert plan.kv_stream == MAX_LANES * plan.kv_lane
    assert plan.prompt_kv == sum(k.nbytes + v.nbytes for k, v in pipe.state.cross_kv.values())
    assert plan.vae_cache_stream == pipe.state.vae_state.cache_bytes()


def test_engine_pool_matches_the_plan(cfg, plan, steady):
    from streamdiff.engine.model_runner import ModelRunner

    comps, *_ = steady
    runner = ModelRunner(comps, max_streams=3)
    assert runner.pool.k.nbytes + runner.pool.v.nbytes == 3 * plan.kv_stream


def test_activation_peak_of_a_real_steady_chunk(plan, steady):
    *_, chunk_peak, dit_peak = steady
    planned_dit = plan.act_dit_fixed + plan.act_dit_row * 2  # one forward of 2 rows (2 steps, 1 stream)
    assert abs(planned_dit - dit_peak) <= 0.02 * dit_peak, (planned_dit, dit_peak)
    # The whole chunk (encode, forward, decode, frame conversion): at this size the VAE dominates.
    assert 0.9 * chunk_peak <= plan.activations(1) <= 1.1 * chunk_peak, (plan.activations(1), chunk_peak)


@pytest.mark.parametrize("config, overrides", [
    ("demo", ["video.width=64", "video.height=64"]),  # TAEHV both ways, the styles prompt table
    ("tiny", ["video.width=64", "video.height=48", "vae.decoder=taehv"]),  # Wan encoder, TAEHV decoder
])
def test_taehv_and_the_styles_table_are_planned_as_built(config, overrides):
    from streamdiff.model.taehv import HybridVAE

    cfg = load_config(config, ["runtime.device=cpu", *overrides])
    plan = plan_memory(cfg, "cpu")
    comps = build_components(cfg)
    pipe = StreamPipeline(comps, "starry night")
    clip = synthetic_clip(9, cfg.video.width, cfg.video.height, seed=0)
    pipe.push(clip[:5])
    pipe.push(clip[5:9])
    vae = comps.vae
    resident = [vae.wan.vae, vae.taehv.net] if isinstance(vae, HybridVAE) else [vae.vae]
    assert plan.vae_weights == sum(module_bytes(m) for m in resident)
    assert plan.vae_cache_stream == pipe.state.vae_state.cache_bytes()
    assert plan.vae_dec_cache_stream == sum(t.nbytes for t in pipe.state.vae_state.dec_cache) > 0
    if cfg.text.kind == "styles":
        assert plan.text_weights == comps.text.table.nbytes and plan.text_placement == "cpu"
    # the demo serves with VAE stages of their own: the plan says what each holds
    text = format_plan(plan, GiB)
    assert plan.vae_stages == cfg.parallel.vae_stages and ("VAE stages:" in text) == cfg.parallel.vae_stages


def test_split_stages_hold_their_blocks(cfg):
    two = plan_memory(load_config("tiny", [*OVERRIDES, "model.num_layers=4", "parallel.num_stages=2"]), "cpu")
    one = plan_memory(load_config("tiny", [*OVERRIDES, "model.num_layers=4"]), "cpu")
    assert two.stage_blocks == [2, 2] and one.stage_blocks == [4]
    assert two.stage_weights[0] + two.stage_weights[1] > one.dit_weights  # both stages keep the condition embedder
    assert max(two.stage_weights) < one.dit_weights


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"  # as format_plan prints it (tiny's parts are all under 256 MiB)


def _prompt_kv_bytes(runner) -> int:
    """The bytes of the prompt K/V a runner keeps (every prompt in its cache, every layer)."""
    return sum(k.nbytes + v.nbytes for cross, _ in runner._prompt_cache.values() for k, v in cross.values())


def _share(plan, device: str, streams: int, *fields: str) -> int:
    """The bytes the plan's `fields` add to what `device` holds with `streams` streams."""
    return plan.device_total(device, streams) - replace(plan, **dict.fromkeys(fields, 0)).device_total(device, streams)


def test_one_device_a_stage_holds_what_its_stage_builds():
    """A probe: `plan --config wan-14b-4gpu` printed each stage's share, then answered for the
    whole model on one device ("no stream" on 24 GiB cards, where each stage fits one). A device
    of a split model is planned with what model_runner builds on it."""
    from streamdiff.engine.model_runner import ModelRunner, stage_components
    from streamdiff.engine.stage_io import StageSpec

    cfg = load_config("tiny", [*OVERRIDES, "model.num_layers=3", "parallel.num_stages=2", "parallel.partition=[1,2]"])
    plan = plan_memory(cfg, "cpu")
    assert plan.split and plan.devices() == ["stage 0", "stage 1"]
    streams = 3
    for k, blocks in enumerate(((0, 1), (1, 3))):
        comps = stage_components(cfg, StageSpec(k, 2, blocks), torch.device("cpu"))
        runner = ModelRunner(comps, max_streams=streams, spec=StageSpec(k, 2, blocks))
        weights = module_bytes(comps.model) + module_bytes(comps.vae.vae)  # both ends hold the VAE
        weights += sum(t.nbytes for t in vars(comps.text).values() if isinstance(t, torch.Tensor)) if comps.text else 0
        assert plan.stage_weights[k] == module_bytes(comps.model)
        kv = runner.pool.k.nbytes + runner.pool.v.nbytes
        held = plan.device_total(f"stage {k}", streams) - plan.device_total(f"stage {k}", 0)
        # a stream more: its KV lanes here, its share of prompt K/V, its VAE half's caches, activations
        per_stream = (kv // streams + round(plan.prompt_kv * (blocks[1] - blocks[0]) / 3)
                      + (plan.vae_cache_stream - plan.vae_dec_cache_stream if k == 0 else plan.vae_dec_cache_stream))
        assert held >= streams * per_stream
        fixed = plan.device_total(f"stage {k}", 0)
        assert fixed >= plan.reserve + weights - (plan.text_weights if plan.text_placement == "cpu" and k == 0 else 0)
        # each part exactly: its blocks' KV lanes, its end's VAE caches, the VAE's activations at both ends
        assert _share(plan, f"stage {k}", streams, "kv_stream") == kv
        assert _share(plan, f"stage {k}", streams, *ACTIVATIONS) == plan.activations(streams)
        caches = plan.vae_cache_stream - plan.vae_dec_cache_stream if k == 0 else plan.vae_dec_cache_stream
        assert _share(plan, f"stage {k}", streams, "vae_cache_stream", "vae_dec_cache_stream") == streams * caches
        if k == 0:  # the runner keeps streams + 4 prompts' K/V of its blocks
            for i in range(streams + 6):
                runner._prompt_kv(f"prompt {i}")
            assert _share(plan, "stage 0", streams, "prompt_kv") == _prompt_kv_bytes(runner)
    whole = plan_memory(load_config("tiny", [*OVERRIDES, "model.num_layers=3"]), "cpu")
    for n in (1, 4):
        assert all(plan.device_total(d, n) < whole.total(n) for d in plan.devices())
    n, tightest = plan.max_streams_split(whole.total(2))
    assert n >= 2 and all(plan.device_total(d, n) <= whole.total(2) for d in plan.devices())
    assert any(plan.device_total(d, n + 1) > whole.total(2) for d in plan.devices()) and tightest in plan.devices()
    text = format_plan(plan, whole.total(2))
    assert f"fits, one {whole.total(2) / GiB:.1f} GiB device a stage: {n} stream(s)" in text, text
    assert "the whole model on one device: 2 stream(s)" in text, text


def test_fit_arithmetic(plan):
    n = plan.max_streams(2 * GiB)
    assert plan.total(n) <= 2 * GiB < plan.total(n + 1)
    assert plan.max_streams(plan.total(1) - 1) == 0
    assert plan.max_streams(plan.total(3), lanes_needed_only=True) >= 3


def test_wan_1_3b_weights_from_the_meta_build():
    p = plan_memory(load_config("wan-1.3b"), "cuda", steps=1)
    assert 1.40e9 < p.dit_weights / 2 < 1.45e9  # ~1.42B parameters in bf16
    assert p.kv_lane == 2 * 30 * 6 * 1024 * 12 * 128 * 2
    assert 5.6e9 < p.text_weights / 2 < 5.8e9  # umT5-XXL encoder in bf16


def test_the_original_wan_umt5_file_is_planned_from_its_shapes(tmp_path):
    """weights.text_encoder naming an original Wan2.1 folder: the plan reads the encoder's size off
    the umT5 file's tensor shapes, as the loader builds it (not umT5-XXL assumed)."""
    from streamdiff.model.loading import load_wan_t5

    vocab, dim, attn, ffn, heads = 300, 40, 48, 56, 6
    sd = {"token_embedding.weight": torch.randn(vocab, dim), "norm.weight": torch.ones(dim)}
    for i in range(3):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": torch.ones(dim), p + "norm2.weight": torch.ones(dim),
               **{p + f"attn.{n}.weight": torch.randn(attn, dim) for n in "qkv"}, p + "attn.o.weight": torch.randn(dim, attn),
               p + "ffn.gate.0.weight": torch.randn(ffn, dim), p + "ffn.fc1.weight": torch.randn(ffn, dim),
               p + "ffn.fc2.weight": torch.randn(dim, ffn), p + "pos_embedding.embedding.weight": torch.randn(32, heads)}
    torch.save(sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    cfg = load_config("wan-1.3b", [f"weights.text_encoder={tmp_path}"])
    p = plan_memory(cfg, "cuda", steps=1)
    built = load_wan_t5(tmp_path, torch.bfloat16)
    params = sum(t.numel() for t in sd.values())  # the tied embedding counted once
    assert sum(t.numel() for t in built.parameters()) == params
    assert p.text_weights == 2 * params  # bf16; umT5-XXL assumed would be 11 GB


# a probe: the range said 16 TiB, "1TiB" was refused; GB and MB count as GiB and MiB, as cards are sold
@pytest.mark.parametrize("text,value", [("24GiB", 24 * GiB), ("80G", 80 * GiB), ("16384MiB", 16 * GiB), ("1e9", 10**9),
                                        ("1TiB", 2**40), ("16TB", 2**44), ("24GB", 24 * GiB), ("16384MB", 16 * GiB)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["24", "0", "1e30GiB", "nan", "infGiB", "20TiB", "12MiB"])
def test_parse_bytes_refuses_what_no_device_has(text):
    """A probe: '24' (a unit forgotten: 24 bytes) and '0' planned "no stream", '1e30GiB' a billion."""
    with pytest.raises(ValueError, match="not a (device's memory|memory size)"):
        parse_bytes(text)


def test_cli_plan_prints_and_refuses_bad_sizes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "tiny", "--set", "video.width=64", "--set", "video.height=48", "--device", "cpu",
                 "--gpu-mem", "1GiB,2GiB", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("memory plan: tiny at 64x48") == 2 and "fits:" in text
    written = json.loads(out.read_text())  # a probe: the file held the first size's fit only
    assert [f["device_bytes"] for f in written["fits"]] == [GiB, 2 * GiB]
    assert written["fits"][0]["max_streams"] == written["max_streams"] <= written["fits"][1]["max_streams"]
    assert main(["plan", "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem" in capsys.readouterr().err
    # --stages as serve and bench take it: each stage's share of the blocks
    assert main(["plan", "--config", "tiny", "--device", "cpu", "--gpu-mem", "1GiB", "--stages", "2"]) == 0
    text = capsys.readouterr().out
    assert "stage 0: 1 block, " in text and "stage 1: 1 block, " in text, text


def test_the_plan_says_what_it_leaves_out_under_cuda_graphs():
    graphs = plan_memory(load_config("tiny", OVERRIDES + ["runtime.cuda_graphs=true"]), "cpu")
    eager = plan_memory(load_config("tiny", OVERRIDES), "cpu")
    assert any("cuda_graphs" in note and "not counted" in note for note in graphs.notes)
    assert not any("cuda_graphs" in note for note in eager.notes)
    assert graphs.total(2) == eager.total(2)  # a note, not a guess added to the sum


def test_the_printed_parts_add_up_to_the_plan():
    """A probe: the plan printed "+1.9 MiB DiT per stream" and left out the VAE's 45 MB a stream,
    which "fits" counted, so the printed numbers did not add up to the streams that fit."""
    plan = plan_memory(load_config("tiny"), "cpu", steps=1)
    text = format_plan(plan, 24 * GiB)
    per_stream_activations = plan.activations(3) - plan.activations(2)
    assert per_stream_activations in (plan.act_dit_row * plan.steps, plan.act_vae_stream)
    line = next(l for l in text.splitlines() if l.strip().startswith("activations:"))
    dit, vae = _mib(plan.act_dit_row * plan.steps), _mib(plan.act_vae_stream)
    assert f"adds {dit} to the DiT's phase and {vae} to the VAE's" in line
    assert plan.act_vae_stream > 0
    n, n_steps = plan.max_streams(24 * GiB), plan.max_streams(24 * GiB, lanes_needed_only=True)
    assert n < n_steps and f"fits: {n} stream(s) " in text and f"; {n_steps} if the pool held only 1 lane(s)" in text


def test_the_prompt_kv_planned_is_what_the_runner_keeps(plan, steady):
    """ModelRunner keeps the prompt K/V of max_streams + 4 prompts: the plan counts a stream's
    (per stream) and the spare ones (fixed)."""
    from streamdiff.engine.model_runner import ModelRunner

    comps, *_ = steady
    runner = ModelRunner(comps, max_streams=2)
    for i in range(8):
        runner._prompt_kv(f"prompt {i}")
    assert len(runner._prompt_cache) == 2 + 4
    assert plan.total(2) - replace(plan, prompt_kv=0).total(2) == _prompt_kv_bytes(runner)


def test_the_activations_planned_for_a_stream_run_a_row_per_step(plan, steady):
    """A stream's DiT forward has a row per denoise step (the stream batch): at 2 steps, one
    stream's DiT phase is the measured forward of 2 rows."""
    *_, dit_peak = steady
    dit_phase = replace(plan, act_vae_fixed=0, act_vae_stream=0).activations(1)
    assert abs(dit_phase - dit_peak) <= 0.02 * dit_peak, (dit_phase, dit_peak)


def test_auto_attention_is_planned_with_the_gathered_copy():
    """`auto` on CUDA attends by Triton or by SDPA over a gathered window per shape: the plan
    takes the copy (the larger); only `triton` reads the pool in place."""
    plans = {b: plan_memory(load_config("tiny", [*OVERRIDES[:-1], f"model.attention_backend={b}"]), "cuda")
             for b in ("auto", "torch", "triton")}
    assert plans["auto"].attention_backend == "auto"
    assert plans["auto"].act_dit_row == plans["torch"].act_dit_row > plans["triton"].act_dit_row


def test_a_prompt_encoder_on_the_cpu_is_not_on_the_device(plan):
    """text.device=cpu keeps umT5 off the device; offloaded after encoding, it must still fit
    while it encodes (on the first stage of a split model)."""
    placed = {p: replace(plan, text_placement=p, text_weights=5 * GiB, stage_blocks=[1, 1],
                         stage_weights=[plan.dit_weights // 2] * 2) for p in ("device", "offloaded", "cpu")}
    assert placed["device"].total(1) == placed["offloaded"].total(1) == placed["cpu"].total(1) + 5 * GiB
    for d, held in (("stage 0", 5 * GiB), ("stage 1", 0)):
        assert placed["offloaded"].device_total(d, 1) - placed["cpu"].device_total(d, 1) == held


def test_vae_stages_hold_their_half_of_the_caches_and_the_vae_activations(plan):
    """parallel.vae_stages: VAE encode and decode each on a device of their own, holding the
    VAE, their half of a stream's caches and the VAE's activations; the DiT stage none of it."""
    split = replace(plan, vae_stages=True)
    assert split.devices() == ["VAE encode", "stage 0", "VAE decode"]
    enc = plan.vae_cache_stream - plan.vae_dec_cache_stream
    assert enc > 0 and plan.vae_dec_cache_stream > 0
    vae_act, dec = plan.act_vae_fixed + 3 * plan.act_vae_stream, plan.vae_dec_cache_stream
    for d, cache, act in (("VAE encode", enc, vae_act), ("stage 0", 0, 0), ("VAE decode", dec, vae_act)):
        assert _share(split, d, 3, "vae_cache_stream", "vae_dec_cache_stream") == 3 * cache, d
        assert _share(split, d, 3, "act_vae_fixed", "act_vae_stream") == act, d


def test_no_stream_says_what_one_stream_needs(plan):
    """Where nothing fits, the line gives one stream's need (on every device of a split model),
    not the empty model's."""
    split = replace(plan, reserve=0, stage_blocks=[1, 1], stage_weights=[plan.dit_weights // 2] * 2)
    text = format_plan(split, 2**20)
    one = {d: _mib(split.device_total(d, 1)) for d in split.devices()}
    assert one["stage 0"] != _mib(split.device_total("stage 0", 0))
    assert f"no stream (1 stream needs stage 0 {one['stage 0']}, stage 1 {one['stage 1']});" in text, text
    assert f"no stream (1 stream needs {_mib(split.total(1))};" in text, text


def test_the_verdict_counts_the_lanes_a_render_holds_and_refuses_only_past_the_whole(monkeypatch):
    """`render` runs one stream with a lane per denoise step (StreamPipeline's pool): a size that
    fits those says nothing. Past what is free on a machine whose total is unknown, it warns and
    does not refuse."""
    import streamdiff.bench.memory_plan as memory_plan
    from streamdiff.bench.memory_plan import memory_verdict

    cfg = load_config("tiny", OVERRIDES)
    need = plan_memory(cfg, "cpu").total(1, lanes_needed_only=True)
    assert memory_verdict(cfg, 64, 48, available=need, total=need) is None
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device, total=False: None)
    fatal, said = memory_verdict(cfg, 64, 48, available=need - 1)
    assert not fatal and "will likely run out of memory" in said, said
