"""Prompt encoder tests: umT5 loading from folders saved in the real formats (tiny random model,
tokenizer trained offline), the diffusers zero-padding rule, the LRU cache, placement/offload,
missing files, and the tiny built-in encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from streamdiff.config import TextConfig, WeightsConfig
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
    assert not torch.equal(cat, a.encode("sofa a on , cat A"))  # word order matters
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
