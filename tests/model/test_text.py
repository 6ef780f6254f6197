"""Prompt encoder tests: umT5 loading from folders saved in the real formats (tiny random model,
tokenizer trained offline), the diffusers zero-padding rule, the LRU cache, placement/offload,
missing files, and the tiny built-in encoder."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from streamdiff.config import TextConfig, WeightsConfig
from streamdiff.model.loading import WeightsMismatchError
from streamdiff.model.text import (
    PromptEncoder,
    TinyPromptEncoder,
    UMT5PromptEncoder,
    build_prompt_encoder,
    prompt_clean,
)

SENTENCES = [
    "a cat sitting on a red sofa",
    "a watercolor painting of mountains at dawn",
    "anime style portrait, bright colors",
    "a dog running through the snow",
    "cyberpunk city street at night with neon lights",
]
D_MODEL = 32
MAX_LEN = 64


@pytest.fixture(scope="module")
def umt5_dirs(tmp_path_factory):
    """A tiny random UMT5EncoderModel and a unigram T5 tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("umt5")
    raw = Tokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    raw.train_from_iterator(SENTENCES * 4, trainer)
    vocab = [tuple(v) for v in json.loads(raw.to_str())["model"]["vocab"]]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(root / "tokenizer"))

    torch.manual_seed(1)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    UMT5EncoderModel(cfg).eval().save_pretrained(str(root / "text_encoder"))
    return root


def _reference(root, prompt: str, max_length: int) -> torch.Tensor:
    """diffusers' `_get_t5_prompt_embeds`, written out against the saved folders directly."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    model = UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).eval()
    batch = tok([prompt_clean(prompt)], padding="max_length", max_length=max_length, truncation=True,
                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    seq_len = int(batch.attention_mask.sum())
    with torch.no_grad():
        states = model(batch.input_ids, batch.attention_mask).last_hidden_state  # [1, L, D]
    out = torch.zeros_like(states)
    out[:, :seq_len] = states[:, :seq_len]
    return out, seq_len


def _umt5(root, **kw) -> UMT5PromptEncoder:
    kw.setdefault("max_length", MAX_LEN)
    return UMT5PromptEncoder(root / "text_encoder", root / "tokenizer", **kw)


def _count_forward(enc: UMT5PromptEncoder) -> list[int]:
    calls: list[int] = []
    enc.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------------
# umT5
# ---------------------------------------------------------------------------------------------


def test_umt5_matches_direct_model_and_zero_pads(umt5_dirs):
    enc = _umt5(umt5_dirs)
    prompt = "  a cat   sitting on a red sofa &amp; a dog "
    emb = enc.encode(prompt)
    ref, seq_len = _reference(umt5_dirs, prompt, MAX_LEN)
    assert enc.text_dim == D_MODEL
    assert emb.shape == (1, MAX_LEN, D_MODEL) and emb.dtype == torch.float32
    assert 3 < seq_len < MAX_LEN
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    assert torch.all(emb[0, seq_len:] == 0)
    assert torch.all(emb[0, :seq_len].abs().sum(-1) > 0)  # the real tokens (incl. </s>) are kept
    assert not emb.is_inference()  # usable outside inference mode


def test_umt5_truncates_to_max_length(umt5_dirs):
    enc = _umt5(umt5_dirs, max_length=8)
    long_prompt = " ".join(SENTENCES)
    emb = enc.encode(long_prompt)
    ref, seq_len = _reference(umt5_dirs, long_prompt, 8)
    assert seq_len == 8
    assert emb.shape == (1, 8, D_MODEL)
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)


def test_umt5_cache_calls_model_once_and_evicts_lru(umt5_dirs):
    enc = _umt5(umt5_dirs, cache_size=2)
    calls = _count_forward(enc)
    a1 = enc.encode("a cat")
    a2 = enc.encode("a  cat ")  # same prompt after cleaning
    assert len(calls) == 1
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    a2.zero_()  # the caller's copy; the cached entry is unaffected
    torch.testing.assert_close(enc.encode("a cat"), a1, rtol=0, atol=0)
    assert len(calls) == 1

    enc.encode("a dog")  # cache: [cat, dog]
    enc.encode("a cat")  # hit; cat is now the most recent: [dog, cat]
    enc.encode("snow")  # evicts dog: [cat, snow]
    assert len(calls) == 3
    enc.encode("a cat")
    assert len(calls) == 3
    enc.encode("a dog")  # was evicted -> recomputed
    assert len(calls) == 4
    info = enc.cache_info()
    assert info == {"hits": 4, "misses": 4, "size": 2, "capacity": 2}
    uncached = _umt5(umt5_dirs, cache_size=0)  # text.cache_size=0: each prompt encoded afresh
    emb = uncached.encode("a cat")
    torch.testing.assert_close(emb, a1, rtol=0, atol=0)
    assert not emb.is_inference() and uncached.cache_info()["size"] == 0  # a normal tensor, as with the cache


def test_umt5_missing_files_name_the_path(umt5_dirs, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        UMT5PromptEncoder(missing)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((umt5_dirs / "text_encoder" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        UMT5PromptEncoder(no_weights, umt5_dirs / "tokenizer")
    with pytest.raises(FileNotFoundError, match="config.json"):
        UMT5PromptEncoder(umt5_dirs / "tokenizer")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tok")):
        UMT5PromptEncoder(umt5_dirs / "text_encoder", tmp_path / "tok")


def _broken_text_folders(umt5_dirs, root):
    """A copy of the encoder and tokenizer folders with one thing broken, and the words its
    error must say."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import UMT5Config, UMT5EncoderModel

    def copy(name: str):
        folder = root / name
        shutil.copytree(umt5_dirs / "text_encoder", folder / "text_encoder")
        shutil.copytree(umt5_dirs / "tokenizer", folder / "tokenizer")
        return folder

    cases = []
    (copy("config") / "text_encoder" / "config.json").write_text("{ not json")
    cases.append(("config", "cannot be read"))
    weights = copy("cut") / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases.append(("cut", "cannot be read"))
    for f in (copy("tokjson") / "tokenizer").glob("*.json"):
        f.write_text("{}" if f.name == "tokenizer.json" else f.read_text())
    cases.append(("tokjson", "tokenizer folder"))
    nopad = copy("nopad")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (nopad / "tokenizer" / name).unlink(missing_ok=True)
    cases.append(("nopad", "no padding token"))
    small = copy("vocab")
    cfg = UMT5Config(vocab_size=29, d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    UMT5EncoderModel(cfg).save_pretrained(str(small / "text_encoder"))
    cases.append(("vocab", "not this encoder's tokenizer"))
    lacking = copy("lacking") / "text_encoder" / "model.safetensors"  # a tensor short: random weights, no word
    tensors = load_file(str(lacking))
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(tensors, str(lacking), metadata={"format": "pt"})
    cases.append(("lacking", "keys matched"))
    return cases


def test_umt5_broken_folders_are_one_line_errors_naming_them(umt5_dirs, tmp_path):
    """A probe: transformers' own errors (a broken config.json, a truncated safetensors, a broken
    tokenizer.json) were tracebacks; a tokenizer without its config loaded and failed at the first
    prompt; a tokenizer of another vocabulary crashed the first prompt (IndexError) or, smaller,
    gave other embeddings without a word."""
    from streamdiff.config import ConfigError

    for name, words in _broken_text_folders(umt5_dirs, tmp_path):
        with pytest.raises(ConfigError) as err:
            UMT5PromptEncoder(tmp_path / name / "text_encoder", max_length=MAX_LEN)
        msg = str(err.value)
        assert words in msg and str(tmp_path / name) in msg and "\n" not in msg, (name, msg)


def test_umt5_finds_diffusers_layout_tokenizer(umt5_dirs):
    """No tokenizer folder given: the encoder's sibling tokenizer/ (diffusers layout) is used,
    and a diffusers root folder works as the encoder folder."""
    enc = UMT5PromptEncoder(umt5_dirs / "text_encoder", max_length=MAX_LEN)
    assert enc.tokenizer_folder == umt5_dirs / "tokenizer"
    root_enc = UMT5PromptEncoder(umt5_dirs, max_length=MAX_LEN)
    torch.testing.assert_close(enc.encode("a red sofa"), root_enc.encode("a red sofa"), rtol=0, atol=0)


def test_umt5_text_dim_mismatch_is_refused(umt5_dirs):
    with pytest.raises(ValueError, match="d_model=32"):
        _umt5(umt5_dirs, text_dim=4096)


def test_umt5_refuses_a_tokenizer_with_a_much_smaller_vocabulary_than_the_encoder(umt5_dirs, tmp_path):
    """Another model's tokenizer (T5's 32k tokens with umT5's 256k-row embedding table) gives
    embeddings without a word of error: refused, as a tokenizer with too many tokens is."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    tokens = len(AutoTokenizer.from_pretrained(str(umt5_dirs / "tokenizer"), local_files_only=True))
    cfg = UMT5Config(vocab_size=tokens * 8, d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    UMT5EncoderModel(cfg).eval().save_pretrained(str(tmp_path / "text_encoder"))
    with pytest.raises(WeightsMismatchError, match="not this encoder's tokenizer"):
        UMT5PromptEncoder(tmp_path / "text_encoder", umt5_dirs / "tokenizer", max_length=MAX_LEN)


def test_umt5_asked_for_fp16_runs_the_encoder_in_bf16_and_returns_fp16(umt5_dirs):
    """T5 encoders overflow in fp16: model.dtype=float16 runs umT5 in bf16 and casts the result."""
    enc = _umt5(umt5_dirs, dtype=torch.float16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    assert enc.encode("a cat").dtype == torch.float16


def test_umt5_cpu_placement_returns_requested_device_and_dtype(umt5_dirs):
    """encoder_device='cpu': the encoder stays on the CPU, the result goes to `device` in `dtype`.
    `meta` stands in for "another device" (it holds no data, so no GPU is faked)."""
    enc = _umt5(umt5_dirs, encoder_device="cpu", device="meta", dtype=torch.float64)
    emb = enc.encode("a cat")
    assert enc.encoder_device.type == "cpu"
    assert emb.device.type == "meta" and emb.dtype == torch.float64 and emb.shape == (1, MAX_LEN, D_MODEL)
    enc_f64 = _umt5(umt5_dirs, dtype=torch.float64)
    ref, _ = _reference(umt5_dirs, "a cat", MAX_LEN)
    torch.testing.assert_close(enc_f64.encode("a cat").float(), ref, rtol=1e-5, atol=1e-5)


def test_umt5_offload_moves_to_device_then_back_to_cpu(umt5_dirs, monkeypatch):
    enc = _umt5(umt5_dirs, offload_after_encode=True)
    moves: list[str] = []
    real_to = enc.model.to

    def spy_to(*args, **kwargs):
        moves.append(str(torch.device(args[0])))
        return real_to(*args, **kwargs)

    monkeypatch.setattr(enc.model, "to", spy_to)
    calls = _count_forward(enc)
    emb = enc.encode("a dog running")
    assert moves == ["cpu", "cpu"]  # compute device (cpu here), then the offload to cpu
    assert enc.encoder_device.type == "cpu"
    ref, _ = _reference(umt5_dirs, "a dog running", MAX_LEN)
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    enc.encode("a dog running")  # cached: no move, no forward
    assert moves == ["cpu", "cpu"] and len(calls) == 1

    # The offload also happens when the forward fails.
    monkeypatch.setattr(enc, "tokenize", lambda p: (torch.full((1, MAX_LEN), 10**6), torch.ones(1, MAX_LEN)))
    with pytest.raises(IndexError):
        enc.encode("broken")
    assert moves[-1] == "cpu" and len(moves) == 4

    # encoder_device='cpu' makes offloading moot: no moves at all.
    kept = _umt5(umt5_dirs, encoder_device="cpu", offload_after_encode=True)
    assert kept.offload_after_encode is False


def test_build_prompt_encoder_umt5(umt5_dirs):
    text = TextConfig(kind="umt5", max_length=MAX_LEN, cache_size=3)
    weights = WeightsConfig(text_encoder=str(umt5_dirs / "text_encoder"), tokenizer=str(umt5_dirs / "tokenizer"))
    enc = build_prompt_encoder(text, weights, D_MODEL, "cpu", torch.float32)
    assert isinstance(enc, UMT5PromptEncoder) and enc.cache_size == 3
    ref, _ = _reference(umt5_dirs, "neon lights", MAX_LEN)
    torch.testing.assert_close(enc.encode("neon lights"), ref, rtol=0, atol=0)
    # text.device=cpu keeps umT5 off the model's device (`meta` stands in for a GPU), and
    # text.offload_after_encode reaches the encoder: a 24 GB card relies on both
    kept = build_prompt_encoder(dataclasses.replace(text, device="cpu"), weights, D_MODEL, "meta", torch.float32)
    assert kept.encoder_device.type == "cpu" and kept.encode("neon lights").device.type == "meta"
    offloaded = build_prompt_encoder(dataclasses.replace(text, offload_after_encode=True), weights, D_MODEL, "cpu",
                                     torch.float32)
    assert offloaded.offload_after_encode and offloaded.encoder_device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Tiny encoder
# ---------------------------------------------------------------------------------------------


def test_tiny_deterministic_distinct_and_zero_padded():
    a = TinyPromptEncoder(32, max_length=64, seed=3)
    b = TinyPromptEncoder(32, max_length=64, seed=3)
    cat = a.encode("A cat, on a sofa")
    torch.testing.assert_close(cat, b.encode("A cat, on a sofa"), rtol=0, atol=0)
    n = len(a.token_ids("a cat, on a sofa"))
    assert n == 7  # a cat , on a sofa </s>
    assert torch.all(cat[0, n:] == 0) and torch.all(cat[0, :n].abs().sum(-1) > 0)
    dog = a.encode("A dog, on a sofa")
    assert (cat - dog)[0, :n].abs().max() > 0.1
    reordered = a.encode("sofa a on , cat A")
    assert not torch.equal(cat, reordered)  # word order matters
    # and not only through where each word's row sits: cross-attention (no mask) sees the rows as a set
    assert not torch.allclose(cat[0].sum(0), reordered[0].sum(0), atol=1e-3)
    other_seed = TinyPromptEncoder(32, max_length=64, seed=4).encode("A cat, on a sofa")
    assert not torch.equal(cat, other_seed)
    # Mixing: changing one word changes every real token's embedding, not only its own.
    assert torch.all((cat - dog)[0, :n].abs().sum(-1) > 0)


def test_tiny_truncates_and_stays_deterministic_across_processes():
    enc = TinyPromptEncoder(16, max_length=8, seed=0)
    ids = enc.token_ids("one two three four five six seven eight nine ten")
    assert len(ids) == 8 and ids[-1] == TinyPromptEncoder.EOS_ID
    emb = enc.encode("one two three four five six seven eight nine ten")
    assert torch.all(emb[0].abs().sum(-1) > 0)  # all 8 positions are real tokens

    code = ("import torch; from streamdiff.model.text import TinyPromptEncoder as T;"
            "e = T(16, max_length=8, seed=0).encode('a cat on a sofa'); print(repr(e.flatten()[:40].tolist()))")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout for s in (1, 2)]
    assert out[0] == out[1]
    assert out[0].strip() == repr(enc.encode("a cat on a sofa").flatten()[:40].tolist())


def test_tiny_cache_and_build_prompt_encoder():
    text = TextConfig(kind="tiny", max_length=32, cache_size=1)
    enc = build_prompt_encoder(text, WeightsConfig(seed=5), 24, "cpu", torch.float64)
    assert isinstance(enc, TinyPromptEncoder) and isinstance(enc, PromptEncoder)
    emb = enc.encode("hello")
    assert emb.dtype == torch.float64 and emb.shape == (1, 32, 24)
    torch.testing.assert_close(emb, TinyPromptEncoder(24, max_length=32, seed=5).encode("hello").double())
    enc.encode("hello")
    enc.encode("world")  # evicts hello (capacity 1)
    enc.encode("hello")
    assert enc.cache_info() == {"hits": 1, "misses": 3, "size": 1, "capacity": 1}


def test_prompt_clean_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_clean

    for p in ["  a\tcat \n on &amp;amp; a sofa  ", "", "neon &lt;city&gt;"]:
        assert prompt_clean(p) == diffusers_clean(p)


# ---------------------------------------------------------------------------------------------
# umT5 from the original Wan file (models_t5_umt5-xxl-enc-bf16.pth), as StreamDiffusionV2 reads it
# ---------------------------------------------------------------------------------------------

WAN_HEADS, WAN_BUCKETS, WAN_LAYERS = 4, 8, 2


@pytest.fixture(scope="module")
def wan_t5_dir(umt5_dirs, tmp_path_factory):
    """An original Wan2.1 folder's text part: random bf16 tensors in the Wan T5 encoder's names
    (umT5: a relative position table in every block) and the tokenizer in google/umt5-xxl/."""
    import shutil

    root = tmp_path_factory.mktemp("wan")
    gen = torch.Generator().manual_seed(3)
    vocab = len(json.loads((umt5_dirs / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    dim, attn, ffn = D_MODEL, 24, 40  # attention 24 wide = 4 heads of 6: not d_model / heads

    def w(*shape, scale=None):
        return (torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)).to(torch.bfloat16)

    sd = {"token_embedding.weight": w(vocab, dim, scale=1.0), "norm.weight": 1 + w(dim, scale=0.1)}
    for i in range(WAN_LAYERS):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + w(dim, scale=0.1), p + "norm2.weight": 1 + w(dim, scale=0.1),
               p + "attn.q.weight": w(attn, dim), p + "attn.k.weight": w(attn, dim),
               p + "attn.v.weight": w(attn, dim), p + "attn.o.weight": w(dim, attn),
               p + "ffn.gate.0.weight": w(ffn, dim), p + "ffn.fc1.weight": w(ffn, dim),
               p + "ffn.fc2.weight": w(dim, ffn), p + "pos_embedding.embedding.weight": w(WAN_BUCKETS, WAN_HEADS, scale=1.0)}
    torch.save(sd, root / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(umt5_dirs / "tokenizer", root / "google" / "umt5-xxl")
    return root


def _wan_t5_states(sd: dict, ids: torch.Tensor, mask: torch.Tensor, max_dist: int = 128) -> torch.Tensor:
    """The Wan T5 encoder written out from its description, on the file's tensors in fp32:
    RMS norms, unscaled attention with a per-block bidirectional relative-position bias,
    and a tanh-GELU-gated feed-forward. [1, L] ids -> [1, L, D]."""
    sd = {k: v.float() for k, v in sd.items()}
    L = ids.shape[1]

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def bucket(rel):  # key position minus query position -> bucket index
        half = WAN_BUCKETS // 2
        exact = half // 2
        far = rel.abs().clamp(min=1).float()
        log_bucket = exact + (torch.log(far / exact) / math.log(max_dist / exact) * (half - exact)).long()
        near_or_far = torch.where(rel.abs() < exact, rel.abs(), log_bucket.clamp(max=half - 1))
        return near_or_far + half * (rel > 0).long()

    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # [L, L]
    x = sd["token_embedding.weight"][ids[0]]  # [L, D]
    for i in range(WAN_LAYERS):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{n}.weight"].T).view(L, WAN_HEADS, -1).transpose(0, 1) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket(rel)].permute(2, 0, 1)  # [H, L, L]
        scores = (q @ k.transpose(1, 2) + bias).masked_fill(mask[0].view(1, 1, L) == 0, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(L, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        g = h @ sd[p + "ffn.gate.0.weight"].T
        g = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * g) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])[None]


def test_umt5_reads_the_original_wan_file_and_folder(wan_t5_dir):
    """The Wan2.1 folder StreamDiffusionV2 reads (or its T5 file): same embeddings as the Wan T5
    encoder computes on that file, its tokenizer taken from google/umt5-xxl/."""
    enc = UMT5PromptEncoder(wan_t5_dir, max_length=MAX_LEN)
    assert enc.tokenizer_folder == wan_t5_dir / "google" / "umt5-xxl"
    assert enc.text_dim == D_MODEL
    prompt = "a watercolor painting of mountains at dawn"
    ids, mask = enc.tokenize(prompt_clean(prompt))
    seq_len = int(mask.sum())
    sd = torch.load(wan_t5_dir / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    ref = _wan_t5_states(sd, ids, mask)
    ref[:, seq_len:] = 0
    emb = enc.encode(prompt)
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    assert emb[0, :seq_len].abs().sum(-1).min() > 0 and 3 < seq_len < MAX_LEN
    other = enc.encode("a dog running through the snow")
    assert (other - emb).abs().max() > 0.1  # prompts differ: the weights are really used
    by_file = UMT5PromptEncoder(wan_t5_dir / "models_t5_umt5-xxl-enc-bf16.pth", max_length=MAX_LEN)
    torch.testing.assert_close(by_file.encode(prompt), emb, rtol=0, atol=0)

    weights = WeightsConfig(text_encoder=str(wan_t5_dir))  # as a config names it
    built = build_prompt_encoder(TextConfig(kind="umt5", max_length=MAX_LEN), weights, D_MODEL, "cpu", torch.float32)
    torch.testing.assert_close(built.encode(prompt), emb, rtol=0, atol=0)


def test_umt5_refuses_a_wan_file_that_is_not_a_complete_umt5_encoder(wan_t5_dir, tmp_path):
    from streamdiff.model.loading import WeightsError

    sd = torch.load(wan_t5_dir / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    tok = wan_t5_dir / "google" / "umt5-xxl"
    shared = {k: v for k, v in sd.items() if ".pos_embedding." not in k}  # plain T5: one shared table
    shared["pos_embedding.embedding.weight"] = sd["blocks.0.pos_embedding.embedding.weight"]
    torch.save(shared, tmp_path / "t5.pth")
    with pytest.raises(WeightsError, match="not an original Wan umT5 encoder"):
        UMT5PromptEncoder(tmp_path / "t5.pth", tok, max_length=MAX_LEN)
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.weight"}, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"lacks 1 tensor.*DenseReluDense\.wo\.weight"):
        UMT5PromptEncoder(tmp_path / "cut.pth", tok, max_length=MAX_LEN, min_match=0.9)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        UMT5PromptEncoder(empty, tok, max_length=MAX_LEN)
