"""Weight loading: every format, saved here from tiny random-init diffusers models, must give the
same outputs as the model it was saved from (exact equality: the same fp32 tensors are copied).

The original-name state dicts are made with inverse mappings written here (mirroring diffusers'
rename tables); the VAE inverse is checked by a round trip through diffusers' own converter.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from streamdiff.config import ModelConfig, load_config
from streamdiff.model.causal_wan import CausalWanModel
from streamdiff.model.loading import (
    WeightsFileError,
    WeightsMismatchError,
    load_into,
    load_vae,
    random_init_,
    read_transformer_state_dict,
    transformer_config_disagreements,
)

TINY = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32, in_channels=16,
            out_channels=16, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads")

# diffusers name piece -> original Wan name piece, applied in order (inverse of diffusers' table).
TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm3"),  # diffusers' norm2 (cross-attn, affine) is Wan's norm3
    ("proj_out", "head.head"),
    ("scale_shift_table", "modulation"),
]


def to_wan_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = "head.modulation" if key == "scale_shift_table" else key
        for a, b in TO_WAN:
            new = new.replace(a, b)
        out[new] = value
    return out


def tiny_model(seed: int) -> WanTransformer3DModel:
    return random_init_(WanTransformer3DModel(**TINY), seed).eval()


def fresh_model() -> WanTransformer3DModel:
    torch.manual_seed(123)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)  # [B, C, F, h, w]
    text = torch.randn(1, 8, 32, generator=g)  # [B, L, text_dim]
    return x, torch.tensor([700]), text


def run(model: WanTransformer3DModel, inputs) -> torch.Tensor:
    x, t, text = inputs
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model saved in every format; returns (model, its diffusers state dict, root)."""
    root = tmp_path_factory.mktemp("weights")
    model = tiny_model(seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "pipe" / "transformer")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    wan = to_wan_names(state)
    save_file({"model.diffusion_model." + k: v for k, v in wan.items()}, root / "wan.safetensors")
    torch.save(wan, root / "wan.pth")
    (root / "wan_folder").mkdir()
    save_file(wan, root / "wan_folder" / "diffusion_pytorch_model.safetensors")
    gen = {"model." + k: v for k, v in wan.items()}
    torch.save({"generator": gen, "step": 100}, root / "sdv2_gen.pt")
    torch.save({"generator_ema": gen}, root / "sdv2_ema.pt")
    torch.save({"state_dict": {"model._orig_mod." + k: v for k, v in wan.items()}}, root / "sdv2_sd.pt")
    return model, state, root


def test_inverse_mapping_looks_like_wan(source):
    wan = to_wan_names(source[1])
    for key in ("head.modulation", "head.head.weight", "blocks.0.modulation", "blocks.1.norm3.weight",
                "blocks.0.self_attn.o.weight", "blocks.0.cross_attn.norm_k.weight", "blocks.0.ffn.0.weight",
                "time_projection.1.bias", "text_embedding.2.weight", "patch_embedding.weight"):
        assert key in wan, key
    assert not any("norm2" in k or "attn1" in k or "condition_embedder" in k for k in wan)


@pytest.mark.parametrize(
    "fmt, rel",
    [("diffusers", "pipe"), ("diffusers", "pipe/transformer"), ("diffusers", "sharded"), ("wan", "wan.safetensors"),
     ("wan", "wan.pth"), ("wan", "wan_folder"), ("sdv2", "sdv2_gen.pt"), ("sdv2", "sdv2_ema.pt"),
     ("sdv2", "sdv2_sd.pt")],
)
def test_format_loads_to_identical_outputs(source, inputs, fmt, rel):
    model, state, root = source
    loaded = fresh_model()
    assert not torch.equal(run(loaded, inputs), run(model, inputs))
    sd = read_transformer_state_dict(fmt, root / rel)
    assert set(sd) == set(state)
    report = load_into(loaded, sd)
    assert (report.matched, report.expected, report.n_unexpected, report.skipped_for_stage) == (69, 69, 0, 0)
    assert str(report) == "transformer: 69/69 keys matched (100.0%), 0 unexpected"
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_diffusers_folder_offers_config_and_shards(source):
    _, _, root = source
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    sd = read_transformer_state_dict("diffusers", root / "pipe")
    assert sd.config["num_layers"] == 2 and sd.config["_class_name"] == "WanTransformer3DModel"


def test_an_index_naming_the_wrong_shard_is_one_error_naming_both(tmp_path, source):
    """A probe: an index mapping a tensor to a shard that lacks it (a half-updated download) ended
    in safetensors' traceback at load."""
    import shutil

    _, _, root = source
    shutil.copytree(root / "sharded", tmp_path / "t")
    index = tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    key = next(k for k, v in data["weight_map"].items() if v == shards[0])
    data["weight_map"][key] = shards[1]
    index.write_text(json.dumps(data))
    with pytest.raises(WeightsFileError, match=rf"maps {re.escape(key)} to {re.escape(shards[1])}, which does not hold it"):
        read_transformer_state_dict("diffusers", tmp_path / "t")


def test_sdv2_prefers_generator_and_can_pick_ema(tmp_path, source, inputs):
    model, state, _ = source
    other = to_wan_names({k: v + 1 for k, v in state.items()})
    wan = to_wan_names(state)
    path = tmp_path / "model.pt"
    torch.save({"generator": {"model." + k: v for k, v in wan.items()},
                "generator_ema": {"model." + k: v for k, v in other.items()}}, path)
    default, ema = fresh_model(), fresh_model()
    load_into(default, read_transformer_state_dict("sdv2", tmp_path))  # the folder holding model.pt
    load_into(ema, read_transformer_state_dict("sdv2", path, prefer="generator_ema"))
    assert torch.equal(run(default, inputs), run(model, inputs))
    assert torch.equal(ema.proj_out.bias, state["proj_out.bias"] + 1)


class _NotATensor:  # makes weights_only=True refuse the file
    pass


def test_sdv2_pickle_is_refused_by_default_and_loads_only_when_trusted(tmp_path, source, caplog):
    wan = to_wan_names(source[1])
    path = tmp_path / "model.pt"
    torch.save({"generator": {"model." + k: v for k, v in wan.items()}, "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"weights\.trust_pickle: true") as err:
        read_transformer_state_dict("sdv2", path)  # the default runs no code from the file
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING):
        sd = read_transformer_state_dict("sdv2", path, trust_pickle=True)
    assert "trust" in caplog.text and set(sd) == set(source[1])


def test_missing_keys_refused_with_counts_and_kinds(tmp_path, source):
    _, state, _ = source
    dropped = {k: v for k, v in state.items() if not re.search(r"attn1\.norm_[qk]\.weight", k)}
    assert len(dropped) == 65  # 4 of 69 (5.8%) dropped
    save_file(dropped, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY)))
    sd = read_transformer_state_dict("diffusers", tmp_path)
    model = fresh_model()
    before = model.proj_out.weight.clone()
    with pytest.raises(WeightsMismatchError) as err:
        load_into(model, sd)
    msg = str(err.value)
    assert "65/69" in msg and "missing 4" in msg
    assert "blocks.*.attn1.norm_q.weight (2 keys)" in msg and "blocks.*.attn1.norm_k.weight (2 keys)" in msg
    assert isinstance(err.value, ValueError) and err.value.report.n_missing == 4
    assert torch.equal(model.proj_out.weight, before)  # nothing copied
    report = load_into(model, sd, min_match=0.9)  # allowed when asked for
    assert report.matched == 65
    assert sorted(report.missing) == ["blocks.*.attn1.norm_k.weight (2 keys)", "blocks.*.attn1.norm_q.weight (2 keys)"]
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"])


def test_unexpected_keys_reported_and_beyond_min_match_refused(source, caplog):
    _, state, _ = source
    extra = dict(state)
    extra["blocks.0.attn1.extra.weight"] = torch.ones(3)
    extra["blocks.1.attn1.extra.weight"] = torch.ones(3)
    extra["img_emb.proj.0.weight"] = torch.ones(3)
    # 3 unexpected of 69 keys: more than the 1 % default min_match allows (a probe: 50 unrelated
    # keys loaded with no word but an INFO line)
    with pytest.raises(WeightsMismatchError, match="more unexpected keys than min_match=0.99 allows"):
        load_into(fresh_model(), extra)
    report = load_into(fresh_model(), extra, min_match=0.95)
    assert report.matched == 69 and report.n_unexpected == 3 and report.skipped_for_stage == 0
    assert "blocks.*.attn1.extra.weight (2 keys)" in report.unexpected
    assert str(report) == "transformer: 69/69 keys matched (100.0%), 3 unexpected"
    assert "3 unexpected key(s)" in caplog.text and "img_emb.proj.*.weight (1 key)" in caplog.text  # a warning


@pytest.mark.parametrize("block", [2, 7])  # 2: one block more than num_layers=2, the first beyond it
def test_a_checkpoint_of_a_bigger_model_is_refused(source, block):
    """Blocks beyond model.num_layers are not another stage's: the file is of a bigger model
    (a probe: the demo's 4 blocks with 4-7 added, or num_layers=3 against 4, loaded at "100 %")."""
    _, state, _ = source
    extra = dict(state)
    extra[f"blocks.{block}.attn1.to_q.weight"] = torch.ones(3)  # beyond num_layers=2
    with pytest.raises(WeightsMismatchError,
                       match=rf"has {block + 1} blocks but the model has 2 \(model.num_layers=2\)"):
        load_into(fresh_model(), extra, min_match=0.5)


class _Params(torch.nn.Module):
    """A module of `n` two-element parameters: n keys, for match ratios of exact percentages."""

    def __init__(self, n: int):
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2)) for _ in range(n)])


def test_min_match_loads_a_file_at_exactly_the_ratio_and_refuses_one_below_it():
    """weights.min_match=0.99 means 99 % of the keys loads and anything less is refused: a user
    who lowered it to admit a file that lacks a known share of keys gets exactly that."""
    keys = list(_Params(200).state_dict())
    at = {k: torch.ones(2) for k in keys[2:]}  # 198/200 = 99.0 %
    assert load_into(_Params(200), at).matched == 198
    below = {k: torch.ones(2) for k in keys[3:]}  # 197/200 = 98.5 %
    with pytest.raises(WeightsMismatchError, match="below min_match=0.99"):
        load_into(_Params(200), below)


def test_unexpected_keys_load_up_to_the_share_min_match_leaves_and_are_refused_beyond_it():
    """weights.min_match=0.99 allows unexpected keys as it allows missing ones: 1 % of the
    module's keys (2 of 200) loads, one more is refused."""
    keys = list(_Params(200).state_dict())
    full = {k: torch.ones(2) for k in keys}
    at = {**full, **{f"other.{i}.weight": torch.ones(2) for i in range(2)}}
    assert load_into(_Params(200), at).n_unexpected == 2
    beyond = {**full, **{f"other.{i}.weight": torch.ones(2) for i in range(3)}}
    with pytest.raises(WeightsMismatchError, match="more unexpected keys than min_match=0.99 allows"):
        load_into(_Params(200), beyond)


def test_shape_mismatch_names_key_and_shapes(source):
    _, state, _ = source
    bad = dict(state)
    bad["blocks.1.ffn.net.0.proj.weight"] = torch.zeros(96, 64)
    model = fresh_model()
    before = model.patch_embedding.weight.clone()
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.0\.proj\.weight: checkpoint \(96, 64\) vs model \(128, 64\)"):
        load_into(model, bad)
    assert torch.equal(model.patch_embedding.weight, before)


def _broken_files(root, source_file):
    """Files a user could point a config at by mistake, each with the words its error must say."""
    whole = source_file.read_bytes()
    (root / "cut.safetensors").write_bytes(whole[: len(whole) // 3])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "pickle.safetensors").write_bytes((root / "wan.pth").read_bytes())
    (root / "cut.pth").write_bytes((root / "wan.pth").read_bytes()[:300])
    (root / "empty.pth").write_bytes(b"")
    (root / "noise.pt").write_bytes(bytes(range(256)) * 8)
    torch.save([1, 2, 3], root / "list.pt")
    # text saved under a checkpoint's name (a probe: KeyError, IndexError, struct.error and
    # UnicodeDecodeError tracebacks from inside pickle)
    for name, text in (("hello.pt", "hello"), ("abc.pth", "abc"), ("notes.pt", "Quick notes"), ("x.pth", "Xyz"),
                       ("u.pt", "Upload me")):
        (root / name).write_text(text)
    return [*((fmt, name, "is not a readable torch file") for fmt, name in
              (("sdv2", "hello.pt"), ("wan", "abc.pth"), ("sdv2", "notes.pt"), ("wan", "x.pth"), ("sdv2", "u.pt"))),
            ("wan", "cut.safetensors", "is not a readable safetensors file"),
            ("wan", "empty.safetensors", "is not a readable safetensors file"),
            ("wan", "pickle.safetensors", "is not a readable safetensors file"),
            ("wan", "cut.pth", "is not a readable torch file"),
            ("wan", "empty.pth", "is not a readable torch file"),
            ("sdv2", "noise.pt", "is not a readable torch file (truncated or not a checkpoint"),
            ("sdv2", "list.pt", "found no dict of tensors")]


def test_broken_files_are_refused_in_one_line_that_names_them(tmp_path, source):
    """Found by trying: a truncated or empty file ended in safetensors' or pickle's traceback,
    which did not name the file, and random bytes in a .pt were taken for a pickle with objects
    (the advice was to trust it)."""
    _, _, root = source
    for name in ("wan.pth", "wan.safetensors"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    for fmt, name, words in _broken_files(tmp_path, root / "wan.safetensors"):
        with pytest.raises(WeightsFileError) as err:
            load_into(fresh_model(), read_transformer_state_dict(fmt, tmp_path / name))
        msg = str(err.value)
        assert words in msg and str(tmp_path / name) in msg and "\n" not in msg, (name, msg)
        assert "trust_pickle" not in msg, msg


def test_integer_tensors_are_refused_before_anything_is_copied(tmp_path, source):
    _, state, _ = source
    save_file({k: v.to(torch.int64) for k, v in state.items()}, tmp_path / "ints.safetensors")
    model = fresh_model()
    before = model.proj_out.weight.clone()
    with pytest.raises(WeightsMismatchError, match=r"69 tensor\(s\) of .*ints\.safetensors are not floating point"):
        load_into(model, read_transformer_state_dict("wan", tmp_path / "ints.safetensors"))
    assert torch.equal(model.proj_out.weight, before)


def test_a_vae_sized_module_counts_no_keys_for_other_stages(source):
    """A DiT file given as a VAE: its keys are unexpected, not "for other stages"."""
    _, state, _ = source
    vae_like = torch.nn.Module()
    vae_like.encoder = torch.nn.Linear(2, 2)
    with pytest.raises(WeightsMismatchError) as err:
        load_into(vae_like, state, what="taehv")
    assert err.value.report.skipped_for_stage == 0 and err.value.report.n_unexpected == len(state)
    assert "other stages" not in str(err.value)


def test_stacked_wrapper_prefixes_are_all_stripped(tmp_path, source):
    """A generator saved from a DDP-wrapped trainer has keys "module.model.<name>": every
    leading wrapper prefix is stripped, not only the first (else nothing matches)."""
    _, state, _ = source
    path = tmp_path / "ddp.pt"
    torch.save({"generator": {"module.model." + k: v for k, v in to_wan_names(state).items()}}, path)
    assert set(read_transformer_state_dict("sdv2", path)) == set(state)


def test_state_dicts_nested_in_several_wrapper_dicts_are_found(tmp_path, source):
    """A trainer's checkpoint may nest the generator, {"model": {"generator": {...}}}: the
    reader descends through the wrapper dicts to the tensors."""
    _, state, _ = source
    path = tmp_path / "nested.pt"
    torch.save({"model": {"generator": {"model." + k: v for k, v in to_wan_names(state).items()}}}, path)
    assert set(read_transformer_state_dict("sdv2", path)) == set(state)


def test_diffusers_names_with_one_original_looking_key_are_not_converted(tmp_path, source):
    """A diffusers-named file with one stray key that looks original-Wan ("head.*") stays
    diffusers: diffusers' Wan converter is not idempotent and would rename the real keys."""
    _, state, _ = source
    save_file({**state, "head.extra": torch.ones(3)}, tmp_path / "diffusion_pytorch_model.safetensors")
    sd = read_transformer_state_dict("diffusers", tmp_path)
    assert set(state) <= set(sd)
    report = load_into(fresh_model(), sd, min_match=0.9)
    assert report.matched == len(state) and report.n_unexpected == 1


def test_two_keys_that_strip_to_one_name_are_refused_naming_both(tmp_path, source):
    """"model.X" and "X" in one file are ambiguous (which one loads would depend on dict order):
    refused, not silently resolved."""
    _, state, _ = source
    save_file({**state, "model.proj_out.bias": state["proj_out.bias"] + 1}, tmp_path / "twice.safetensors")
    with pytest.raises(WeightsMismatchError, match="both become 'proj_out.bias'"):
        read_transformer_state_dict("wan", tmp_path / "twice.safetensors")


def test_a_bf16_safetensors_file_loads_cast_to_the_models_dtype(tmp_path, source):
    """Many Wan checkpoints ship in bf16 ("BF16" in the safetensors header): they are weights,
    copied into the fp32 model as the bf16 values."""
    _, state, _ = source
    save_file({k: v.to(torch.bfloat16) for k, v in to_wan_names(state).items()}, tmp_path / "bf16.safetensors")
    model = fresh_model()
    report = load_into(model, read_transformer_state_dict("wan", tmp_path / "bf16.safetensors"))
    assert report.matched == len(state) and model.proj_out.weight.dtype == torch.float32
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"].to(torch.bfloat16).float())


@pytest.mark.parametrize("fmt", ["diffusers", "wan", "sdv2"])
def test_missing_path_raises_file_not_found(tmp_path, fmt):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        read_transformer_state_dict(fmt, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="expected"):
        read_transformer_state_dict(fmt, "")


def test_empty_diffusers_folder_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        read_transformer_state_dict("diffusers", tmp_path)


def test_stage_loads_its_blocks_only(source):
    _, state, root = source
    sd = read_transformer_state_dict("diffusers", root / "sharded")
    stage = CausalWanModel(ModelConfig(), block_range=(1, 2), has_embed=False, has_head=False)
    report = load_into(stage, sd)
    n_block = sum(k.startswith("blocks.0.") for k in state)
    assert report.matched == report.expected == len(stage.state_dict())
    assert report.n_unexpected == 0 and report.n_missing == 0
    assert report.skipped_for_stage == n_block + 5  # block 0, patch_embedding (2), proj_out (2), scale_shift_table
    assert str(report).endswith(f"0 unexpected, {n_block + 5} for other stages")
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    full = CausalWanModel(ModelConfig())
    assert load_into(full, sd).matched == len(state)  # our DiT carries diffusers' names exactly


def test_dtype_cast_on_load(source):
    _, state, _ = source
    model = fresh_model().to(torch.bfloat16)
    load_into(model, state)
    assert model.proj_out.weight.dtype == torch.bfloat16
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"].to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def _decode(vae: AutoencoderKLWan, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae(x, sample_posterior=False).sample


def test_vae_diffusers_folder(tmp_path):
    vae = random_init_(AutoencoderKLWan(base_dim=8, num_res_blocks=1), seed=3).eval()
    vae.save_pretrained(tmp_path / "vae")
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [B, 3, T, H, W]
    for path in (tmp_path, tmp_path / "vae"):
        loaded = load_vae(path)
        assert torch.equal(_decode(loaded, x), _decode(vae, x))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_vae(tmp_path / "nope")


def test_a_vae_folder_of_another_model_is_refused_and_a_vae_of_other_latents_at_build(tmp_path, source):
    """A probe: the transformer folder given as weights.vae built a default 96-wide VAE and was
    refused as "0/194 ... 69 for other stages"; the Wan2.2 VAE was a bare ValueError; a VAE of 32
    latent channels loaded and the first chunk failed in a convolution."""
    from streamdiff.config import ConfigError, load_config
    from streamdiff.model.build import build_streaming_vae

    _, _, root = source
    with pytest.raises(WeightsFileError, match="describes a WanTransformer3DModel, not the Wan VAE"):
        load_vae(root / "pipe" / "transformer")
    AutoencoderKLWan(base_dim=4, num_res_blocks=1, z_dim=32, latents_mean=[0.0] * 32,
                     latents_std=[1.0] * 32).save_pretrained(tmp_path / "z32")
    folder = tmp_path / "wan22"
    AutoencoderKLWan(base_dim=4, num_res_blocks=1).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "patch_size": 2}))
    with pytest.raises(WeightsFileError, match=r"is the Wan2\.2 VAE \(patch_size=2\)"):
        load_vae(folder)
    cfg = load_config("tiny", ["weights.format=wan", f"weights.vae={tmp_path / 'z32'}", "vae.num_res_blocks=1",
                               f"weights.transformer={root / 'wan.safetensors'}",
                               "runtime.device=cpu"])
    with pytest.raises(ConfigError, match="has 32 latent channels but the DiT takes model.in_channels=16"):
        build_streaming_vae(cfg, torch.device("cpu"), torch.float32)


def _resnet_to_wan(rest: str) -> str:
    for a, b in (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                 ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")):
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def vae_to_wan_name(key: str) -> str:
    """diffusers AutoencoderKLWan name -> original Wan VAE name (num_res_blocks=2)."""
    for a, b in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2."), ("encoder.conv_in.", "encoder.conv1."),
                 ("decoder.conv_in.", "decoder.conv1."), ("encoder.norm_out.", "encoder.head.0."),
                 ("decoder.norm_out.", "decoder.head.0."), ("encoder.conv_out.", "encoder.head.2."),
                 ("decoder.conv_out.", "decoder.head.2.")):
        if key.startswith(a):
            return b + key[len(a):]
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_to_wan(m[3])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
        return f"encoder.downsamples.{m[1]}.{_resnet_to_wan(m[2])}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_resnet_to_wan(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise AssertionError(f"no original name for {key}")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vae_original_file(tmp_path, suffix):
    config = dict(base_dim=4, num_res_blocks=2)  # diffusers' converter knows the real layout only
    vae = random_init_(AutoencoderKLWan(**config), seed=4).eval()
    state = vae.state_dict()
    wan = {vae_to_wan_name(k): v for k, v in state.items()}
    # The inverse is right iff diffusers' own converter maps it back onto every name.
    assert convert_wan_vae_to_diffusers({k: k for k in wan}) == {k: vae_to_wan_name(k) for k in state}
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    if suffix == ".pth":
        torch.save(wan, path)
    else:
        save_file({k: v.contiguous() for k, v in wan.items()}, path)
    loaded = load_vae(path, config=config)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [B, 3, T, H, W]
    assert torch.equal(_decode(loaded, x), _decode(vae, x))
    if suffix == ".pth":  # the original Wan2.1 folder holding it, as StreamDiffusionV2 reads it
        assert torch.equal(_decode(load_vae(tmp_path, config=config), x), _decode(vae, x))


@pytest.mark.parametrize("config, words", [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),  # diffusers took it for a Hub repository name
    ('{"base_dim": -1}', "does not describe a Wan VAE"),
])
def test_a_vae_folder_with_a_broken_config_is_one_error_naming_it(tmp_path, config, words):
    """Found by a CLI probe: tracebacks (JSONDecodeError, RuntimeError), and for a list diffusers
    tried to reach huggingface.co."""
    from streamdiff.model.loading import WeightsFileError

    vae = random_init_(AutoencoderKLWan(base_dim=4, num_res_blocks=2), seed=4)
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(config)
    with pytest.raises(WeightsFileError, match=words) as err:
        load_vae(folder)
    assert str(folder / "config.json") in str(err.value)
    (folder / "config.json").write_text(json.dumps(dict(vae.config)))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(WeightsFileError, match="has no weight_map"):  # was a KeyError
        load_vae(folder)


def test_an_original_vae_file_is_built_with_the_configs_architecture(tmp_path):
    """An original Wan2.1_VAE.pth has no config of its own: the config's `vae` section says its
    sizes (it was built with diffusers' defaults, the 96-wide real VAE, whatever the config said;
    two helpers comparing with StreamDiffusionV2 had to patch this for a small VAE)."""
    import torch

    from streamdiff.config import load_config
    from streamdiff.model.build import build_streaming_vae

    vae = random_init_(AutoencoderKLWan(base_dim=8, num_res_blocks=2), seed=4).eval()
    torch.save({vae_to_wan_name(k): v for k, v in vae.state_dict().items()}, tmp_path / "Wan2.1_VAE.pth")
    cfg = load_config("tiny", ["vae.base_dim=8", "vae.num_res_blocks=2", "vae.dim_mult=[1,2,4,4]",
                               "weights.format=wan", f"weights.transformer={tmp_path}", f"weights.vae={tmp_path}"])
    streaming = build_streaming_vae(cfg, torch.device("cpu"), torch.float32)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(_decode(streaming.vae, x), _decode(vae, x))


def test_vae_original_file_with_wrong_architecture_is_refused(tmp_path):
    vae = random_init_(AutoencoderKLWan(base_dim=4, num_res_blocks=2), seed=4)
    torch.save({vae_to_wan_name(k): v for k, v in vae.state_dict().items()}, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vae(tmp_path / "vae.pth", config=dict(base_dim=8, num_res_blocks=2))


# ---------------------------------------------------------------------------------------------
# Seeded random init
# ---------------------------------------------------------------------------------------------


def test_random_init_is_seeded_by_name(inputs):
    a, b, c = tiny_model(5), tiny_model(5), tiny_model(6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
        assert pa.abs().min() > 0 or pa.numel() > 1000, name  # biases too are non-zero
    out, out_other = run(a, inputs), run(c, inputs)
    assert torch.isfinite(out).all() and 0.1 < out.std() < 100
    assert (out - out_other).abs().mean() > 0.1 * out.abs().mean()


def test_random_init_same_tensors_for_any_block_range():
    cfg = ModelConfig(num_layers=4)
    full = random_init_(CausalWanModel(cfg), seed=9)
    stage = random_init_(CausalWanModel(cfg, block_range=(2, 4), has_embed=False, has_head=False), seed=9)
    diffusers_model = random_init_(WanTransformer3DModel(**{**TINY, "num_layers": 4}), seed=9)
    full_params = dict(full.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, full_params[name]), name
    for name, p in diffusers_model.named_parameters():
        assert torch.equal(p, full_params[name]), name
    assert not torch.equal(full_params["blocks.2.attn1.to_q.weight"], full_params["blocks.3.attn1.to_q.weight"])


def test_latent_stream_from_an_sdv2_checkpoint(source):
    """The replay route: the project's SDV2 loader feeding LatentStream gives what the same
    weights give when put into the model directly, chunk after chunk (default sdv2 policy)."""
    from streamdiff.config import load_config
    from streamdiff.model.causal_wan import CausalWanModel
    from streamdiff.pipeline import LatentStream

    _, state, root = source
    overrides = ["model.num_heads=2", "model.head_dim=32", "model.ffn_dim=128", "model.num_layers=2",
                 "model.text_dim=32", "weights.format=sdv2", f"weights.transformer={root / 'sdv2_gen.pt'}",
                 "runtime.device=cpu"]
    cfg = load_config("tiny", overrides)
    loaded = LatentStream.from_config(cfg)
    direct_model = CausalWanModel(cfg.model).eval()
    direct_model.load_state_dict(state, strict=True)
    direct = LatentStream(direct_model, cfg.cache)
    g = torch.Generator().manual_seed(9)
    text = torch.randn(1, 8, 32, generator=g)
    for c in range(8):
        x = torch.randn(1, 16, 2 if c == 0 else 1, 8, 8, generator=g)
        torch.testing.assert_close(loaded.step(x, 700 - 20 * c, text), direct.step(x, 700 - 20 * c, text))
    assert loaded.held_frames() == direct.held_frames()


def _tiny_cfg(root, fmt: str, rel: str, *more: str):
    from streamdiff.config import load_config

    return load_config("tiny", ["model.num_heads=2", "model.head_dim=32", "model.ffn_dim=128", "model.num_layers=2",
                                "model.text_dim=32", f"weights.format={fmt}", f"weights.transformer={root / rel}",
                                "runtime.device=cpu", *more])


def test_a_wrong_file_for_the_1_3b_is_refused_before_the_model_is_made(source, monkeypatch):
    """A probe: the DiT was made in full (the 1.3B in fp32: 5.8 GB and 15 s here; the 14B would
    be 56 GB) before its file was looked at, so a wrong file cost a whole model's memory. Now
    only a meta-device model (no storage) exists when the file is refused."""
    from streamdiff.config import load_config
    from streamdiff.model.build import build_transformer

    made_on, init = [], CausalWanModel.__init__

    def spy(self, *args, **kwargs):
        made_on.append(torch.empty(()).device.type)  # where this construction puts its tensors
        init(self, *args, **kwargs)

    monkeypatch.setattr(CausalWanModel, "__init__", spy)
    monkeypatch.setattr(CausalWanModel, "materialize_", lambda *a: pytest.fail("storage made for a refused file"))
    _, _, root = source
    cfg = load_config("wan-1.3b", ["runtime.device=cpu", "weights.format=wan",
                                   f"weights.transformer={root / 'wan.safetensors'}"])
    with pytest.raises(WeightsMismatchError, match="transformer:"):
        build_transformer(cfg, torch.device("cpu"))
    assert made_on == ["meta"], made_on


def test_a_folder_whose_config_is_another_architecture_is_refused_naming_the_field(tmp_path, source):
    """A probe: a diffusers folder's config.json was read and never compared: a 2 x 32 checkpoint
    ran as 4 x 16 heads (the same tensors) at 100% matched, its output silently wrong."""
    from streamdiff.model.build import build_transformer

    _, _, root = source
    cfg = _tiny_cfg(root, "diffusers", "pipe", "model.num_heads=4", "model.head_dim=16")
    with pytest.raises(WeightsMismatchError) as err:
        build_transformer(cfg, torch.device("cpu"))
    msg = str(err.value)
    assert "num_attention_heads=2 (model.num_heads=4: --set model.num_heads=2)" in msg, msg
    assert "attention_head_dim=32 (model.head_dim=16: --set model.head_dim=32)" in msg and "\n" not in msg, msg
    # an original Wan folder's config.json (WanModel names): a 14B's against the 2 x 32 model
    import shutil

    shutil.copytree(root / "wan_folder", tmp_path / "wan")
    (tmp_path / "wan" / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "dim": 5120, "num_heads": 40, "ffn_dim": 13824, "num_layers": 40,
         "in_dim": 16, "out_dim": 16, "freq_dim": 256, "eps": 1e-6, "model_type": "t2v"}))
    with pytest.raises(WeightsMismatchError, match=r"num_heads=40 .*ffn_dim=13824 .*num_layers=40 .*dim=5120"):
        build_transformer(_tiny_cfg(tmp_path, "wan", "wan"), torch.device("cpu"))
    # the same folder with its own architecture's config loads
    (tmp_path / "wan" / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "dim": 64, "num_heads": 2, "ffn_dim": 128, "num_layers": 2, "in_dim": 16,
         "out_dim": 16, "freq_dim": 256, "eps": 1e-6, "model_type": "t2v"}))
    build_transformer(_tiny_cfg(tmp_path, "wan", "wan"), torch.device("cpu"))


def test_a_config_of_another_model_type_or_patch_size_is_reported():
    """A transformer folder of another architecture that `model:` has no setting for (an i2v
    model, another patch size) is reported, so that build_transformer refuses it instead of
    loading its tensors into the t2v model."""
    model_cfg = load_config("wan-1.3b").model
    said = transformer_config_disagreements({"model_type": "i2v", "patch_size": [1, 4, 4]}, model_cfg)
    assert any(s.startswith("model_type='i2v'") for s in said), said
    assert any(s.startswith("patch_size=[1, 4, 4]") for s in said), said
    assert transformer_config_disagreements({"model_type": "t2v", "patch_size": [1, 2, 2]}, model_cfg) == []


def test_an_original_wan_config_without_its_class_name_is_compared_in_wan_names():
    """An original Wan config.json that lost its `_class_name` (dim, num_heads) is still read in
    Wan's names: 24 heads of 64 hold the same tensors as 12 of 128, only the file's config tells."""
    model_cfg = load_config("wan-1.3b").model
    config = {"dim": 1536, "num_heads": 24, "ffn_dim": 8960, "num_layers": 30}
    said = transformer_config_disagreements(config, model_cfg)
    assert said == ["num_heads=24 (model.num_heads=12: --set model.num_heads=24)"], said


def test_tensors_a_file_lacks_within_min_match_are_seeded_not_left_as_they_were(tmp_path, source):
    """The model is made on the meta device and filled from the file: what the file lacks (allowed
    by a lower weights.min_match) gets the seeded init, the same in every build."""
    from streamdiff.model.build import build_transformer

    _, state, _ = source
    save_file({k: v for k, v in state.items() if "norm_k" not in k}, tmp_path / "lacks.safetensors")
    cfg = _tiny_cfg(tmp_path, "wan", "lacks.safetensors", "weights.min_match=0.9", "weights.seed=3")
    a, b = build_transformer(cfg, torch.device("cpu")), build_transformer(cfg, torch.device("cpu"))
    seeded = random_init_(CausalWanModel(cfg.model), 3)
    for name in ("blocks.0.attn1.norm_k.weight", "blocks.1.attn2.norm_k.weight"):
        got = a.state_dict()[name]
        assert torch.equal(got, b.state_dict()[name]) and torch.equal(got, seeded.state_dict()[name]), name
    torch.testing.assert_close(a.state_dict()["proj_out.weight"], state["proj_out.weight"])


@pytest.mark.parametrize("lacks", ["proj_out.", "patch_embedding.bias", "scale_shift_table"])
def test_a_file_without_the_head_or_embeddings_is_refused_whatever_its_ratio(tmp_path, source, lacks):
    """A review: a 1.3B file without its output head (proj_out, scale_shift_table) and
    patch_embedding.bias matched 821/825 (99.5%) and streamed noise from a random head."""
    _, state, _ = source
    kept = {k: v for k, v in state.items() if not k.startswith(lacks)}
    save_file(kept, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY)))
    sd = read_transformer_state_dict("diffusers", tmp_path)
    with pytest.raises(WeightsMismatchError, match=f"lacks {re.escape(lacks)}.*outside the blocks"):
        load_into(fresh_model(), sd, min_match=0.5)
