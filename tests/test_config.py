"""Config schema: presets, YAML files, --set overrides, clear errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest

from streamdiff.config import ConfigError, load_config, to_dict, with_overrides


def test_presets_carry_the_model_facts():
    tiny = load_config("tiny")
    assert (tiny.model.dim, tiny.model.num_layers, tiny.weights.format) == (64, 2, "random")
    small = load_config("wan-1.3b")
    assert (small.model.num_heads, small.model.head_dim, small.model.ffn_dim, small.model.num_layers) == (12, 128, 8960, 30)
    big = load_config("wan-14b")  # inherits from wan-1.3b and overrides the architecture
    assert (big.model.dim, big.model.ffn_dim, big.model.num_layers, big.model.text_dim) == (5120, 13824, 40, 4096)
    assert (big.cache.window, big.cache.sinks) == (6, 3)


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: tiny\nsampling: {steps: 3}\nvideo: {width: 320}\n")
    cfg = load_config(path, ["cache.window=8", "sampling.motion_aware=false", "model.eps=1e-5"])
    assert cfg.sampling.steps == 3 and cfg.video.width == 320 and cfg.video.height == 256
    assert cfg.cache.window == 8 and cfg.sampling.motion_aware is False and cfg.model.eps == 1e-5
    assert isinstance(cfg.vae.dim_mult, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sampling.steps = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.steps=5", "sampling.steps=5 is out of range"),
        ("sampling.stepz=2", "unknown config key 'sampling.stepz'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("sampling.steps=two", "sampling.steps='two' must be an integer"),
        ("sampling.motion_aware=maybe", "sampling.motion_aware='maybe' must be true or false"),
        ("model.attention_backend=cudnn", "not one of"),
        ("model.attention_backend=xformers", "not one of"),  # dropped: it replaced cross-attention only
        ("video.width=250", "video.width=250 must be a multiple of 16"),
        ("cache.sinks=6", "cache.sinks=6 must be smaller than cache.window=6"),
        ("weights.format=diffusers", "weights.transformer must name a path"),
        ("sampling.steps", "must look like section.key=value"),
        ("parallel.backend=processes", "not one of"),
        # model sizes a probe gave `serve` (a traceback after warm-up, or a silently empty layer)
        ("model.text_dim=-1", "model.text_dim=-1 is out of range"),
        ("model.ffn_dim=0", "model.ffn_dim=0 is out of range"),
        ("vae.num_res_blocks=0", "vae.num_res_blocks=0 is out of range"),
        ("model.freq_dim=33", "model.freq_dim=33 must be even"),
        ("vae.dim_mult=[]", "vae.dim_mult=[] must list"),
        # VAE shapes that passed and failed mid-render with a shape error (a probe)
        ("vae.temperal_downsample=[true,true,true]", "must compress 8x in space and 4x in time"),
        ("vae.temperal_downsample=[false,false,false]", "must compress 8x in space and 4x in time"),
        ("model.in_channels=8", "must both be vae.z_dim=16"),
        # a probe: an 8 TB schedule table (a traceback), and 0 blamed sampling.timesteps
        ("sampling.num_train_timesteps=1000000", "sampling.num_train_timesteps=1000000 is out of range"),
        ("sampling.num_train_timesteps=0", "sampling.num_train_timesteps=0 is out of range"),
        # a probe: RoPE tables too short for the frame or the window failed mid-render
        ("model.rope_max_seq_len=8", "model.rope_max_seq_len=8 is shorter than the frame's 16 patches a side"),
        # YAML 1.1 read 4:16 as 256 (base 60) without a word
        ("video.width=4:16", "video.width='4:16' must be an integer"),
        # YAML's true is no count; a rebase frame equal to the RoPE table's length is past its end (a review)
        ("sampling.steps=true", "sampling.steps=True must be an integer"),
        ("cache.rebase_frame=1024", "cache.rebase_frame=1024 must lie in"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("tiny", [override])


def test_a_vae_of_another_compression_is_refused_in_one_line():
    for overrides in (["vae.dim_mult=[1]", "vae.temperal_downsample=[]"],
                      ["vae.dim_mult=[1,1,1,1,1]", "vae.temperal_downsample=[false,true,true,true]"]):
        with pytest.raises(ConfigError, match="must compress 8x in space and 4x in time"):
            load_config("tiny", overrides)
    assert load_config("tiny", ["vae.temperal_downsample=[true,true,false]"]).vae.temperal_downsample == (True, True, False)


def test_threaded_stages_cannot_join_a_ray_cluster():
    with pytest.raises(ConfigError, match="parallel.backend=threads runs every stage in this process"):
        load_config("demo", ["parallel.ray_address=auto"])
    assert load_config("demo", ["parallel.ray_address=auto", "parallel.backend=ray"]).parallel.backend == "ray"


def test_unknown_preset_and_bad_yaml(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config("huge")
    # a folder with no presets (an install probe saw "(known: )"): say where it looked and the way out
    import streamdiff.config as config
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=f"unknown preset 'demo': no presets in {tmp_path} .*STREAMDIFF_CONFIG_DIR"):
        load_config("demo")
    monkeypatch.undo()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_files_a_user_gets_wrong_are_one_line(tmp_path):
    """Found by trying: a non-UTF-8 file ended in a traceback, an empty one ran the built-in
    defaults without a word, a folder was "not found", a YAML error took several lines."""
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "latin1.yaml").write_bytes("preset: tiny\nname: caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "indent.yaml").write_text("video:\n  width: 256\n height: 3\n")
    for name, words in (("folder.yaml", "is a folder"), ("latin1.yaml", "not UTF-8 text"), ("empty.yaml", "is empty"),
                        ("indent.yaml", "not valid YAML: expected <block end>, but found '<block mapping start>' at line 3")):
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        assert words in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("override, home", [("noise_strength=0.3", "sampling.noise_strength"),
                                            ("window=4", "cache.window"), ("sampling.window=4", None),
                                            ("cache.windw=4", "cache.window"), ("sampling.step=2", "sampling.steps"),
                                            ("cach.window=4", "cache"), ("video.size=4", None)])
def test_a_key_in_the_wrong_section_or_mistyped_says_which_it_may_be(override, home):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert (f"did you mean {home}?" in str(err.value)) if home else ("did you mean" not in str(err.value))


def test_a_config_files_relative_weights_are_found_beside_it(tmp_path, monkeypatch):
    """Found by trying: a user's YAML beside its weights worked only when run from its folder."""
    (tmp_path / "mine" / "w").mkdir(parents=True)
    (tmp_path / "mine" / "w" / "t.safetensors").write_bytes(b"")
    (tmp_path / "mine" / "my.yaml").write_text("preset: demo\nweights: {transformer: w/t.safetensors}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "mine" / "my.yaml")
    assert cfg.weights.transformer == str(tmp_path / "mine" / "w" / "t.safetensors")
    assert cfg.weights.vae == "demo/taehv.safetensors"  # the preset's own, found in the configs folder
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "t.safetensors").write_bytes(b"")  # one from the working directory wins, as before
    assert load_config(tmp_path / "mine" / "my.yaml").weights.transformer == "w/t.safetensors"


def test_with_overrides_round_trip():
    cfg = load_config("tiny")
    other = with_overrides(cfg, sampling={"steps": 4})
    assert other.sampling.steps == 4 and cfg.sampling.steps == 2
    assert load_config(None) == cfg  # defaults are the tiny preset
    assert to_dict(other)["sampling"]["steps"] == 4


def test_a_name_yaml_reads_as_a_number_is_a_string_and_a_bad_value_is_one_line():
    """A CLI probe: `--set weights.vae=2024` (a folder named 2024) was refused as "must be a
    string"; an unparseable value printed YAML's 7-9-line message."""
    assert load_config("tiny", ["weights.vae=2024"]).weights.vae == "2024"
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["weights.vae=[x"])
    assert "\n" not in str(err.value) and "cannot parse the value as YAML" in str(err.value)


@pytest.mark.parametrize("value", ["[700,500,400]", "[700,500,500,200]", "[200,400,500,700]", "[1000,500,400,200]"])
def test_sampling_timesteps_must_be_four_descending_timesteps(value):
    with pytest.raises(ConfigError, match="sampling.timesteps"):
        load_config("tiny", [f"sampling.timesteps={value}"])
    assert load_config("tiny", ["sampling.timesteps=[100,30,15,5]"]).sampling.timesteps == (100, 30, 15, 5)


def test_a_rolling_window_needs_a_longer_rope_table():
    with pytest.raises(ConfigError, match="model.rope_max_seq_len=6 must be more than cache.window=6"):
        load_config("tiny", ["cache.policy=rolling", "model.rope_max_seq_len=6", "video.width=64", "video.height=64"])
    assert load_config("tiny", ["cache.policy=rolling", "model.rope_max_seq_len=7", "video.width=64",
                                "video.height=64"]).model.rope_max_seq_len == 7


def test_rules_between_settings_hold_at_their_edges():
    """Rules that tie settings together, at their edges (a review): a lane pool of exactly one
    stream's lanes is taken; a partition must add up to the model's blocks; compile and CUDA graphs
    are alternatives; the first chunk fits the rolling window; a frame's longer side, not its
    shorter, must fit the RoPE table. A setting taken past its edge fails mid-render instead."""
    assert load_config("tiny", ["cache.pool_lanes=2"]).cache.pool_lanes == 2  # tiny runs 2 steps
    for overrides, message in (
            (["parallel.num_stages=2", "parallel.partition=[1,2]"], "blocks in all"),
            (["runtime.compile=true", "runtime.cuda_graphs=true"], "alternatives"),
            (["cache.policy=rolling", "sampling.first_chunk_latents=7"],
             "first_chunk_latents must be at most cache.window=6"),
            (["model.rope_max_seq_len=8", "video.height=64"], "shorter than the frame's 16 patches a side")):
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", overrides)


def test_a_section_given_as_a_mapping_changes_only_what_it_names():
    """A probe: --set 'model={num_layers: 30}' on wan-1.3b replaced the whole section, the preset's
    heads, widths and dtype fell to the defaults (a 6 MiB model planned in float32), silently."""
    base = load_config("wan-1.3b")
    cfg = load_config("wan-1.3b", ["model={num_layers: 12}"])
    assert cfg.model.num_layers == 12
    assert dataclasses.replace(cfg.model, num_layers=base.model.num_layers) == base.model


def test_numbers_read_as_written_and_a_key_given_twice_is_refused(tmp_path):
    """A probe: YAML 1.1 read --set video.width=0640 as octal (416) and a seed 012345 as 5349; a
    file's second `model:` dropped its first without a word."""
    cfg = load_config("tiny", ["video.width=0640", "sampling.seed=012345", "weights.seed=0x10"])
    assert (cfg.video.width, cfg.sampling.seed, cfg.weights.seed) == (640, 12345, 16)
    twice = tmp_path / "twice.yaml"
    twice.write_text("preset: tiny\nmodel: {num_layers: 3}\nmodel: {num_heads: 4}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: 'model' is given twice \(line 3\)"):
        load_config(twice)
    with pytest.raises(ConfigError, match="'a' is given twice"):
        load_config("tiny", ["model={a: 1, a: 2}"])


def test_a_taehv_setting_that_would_do_nothing_is_refused():
    """A TAEHV probe: `vae.normalize_latents=true` with `vae.kind=taehv` was accepted and ignored
    (TAEHV's latents are the normalised ones whatever it says)."""
    with pytest.raises(ConfigError, match="vae.normalize_latents is for the Wan encoder"):
        load_config("demo", ["vae.normalize_latents=true"])
    with pytest.raises(ConfigError, match="with vae.kind=taehv TAEHV already decodes"):
        load_config("demo", ["vae.decoder=taehv"])
    hybrid = load_config("tiny", ["vae.decoder=taehv", "vae.normalize_latents=true"])  # the Wan encoder's own
    assert hybrid.vae.normalize_latents and hybrid.vae.decoder == "taehv"
    # the TAEHV's latent scale: the Wan VAE (and the Wan encoder a TAEHV decodes for) has its own
    with pytest.raises(ConfigError, match="vae.latent_scale=2 is for vae.kind=taehv"):
        load_config("tiny", ["vae.latent_scale=2"])
    with pytest.raises(ConfigError, match="vae.latent_scale=2 is for vae.kind=taehv"):
        load_config("tiny", ["vae.decoder=taehv", "vae.latent_scale=2"])
    with pytest.raises(ConfigError, match=r"vae.latent_scale=0.0 is out of range"):
        load_config("demo", ["vae.latent_scale=0"])
    assert load_config("tiny", ["vae.kind=taehv", "vae.latent_scale=3"]).vae.latent_scale == 3
