"""The prompt encoder: text prompt -> conditioning embeddings `[1, max_length, text_dim]`.

Owns: turning a prompt string into the cross-attention context the DiT reads, the per-prompt
LRU cache of those embeddings, loading the umT5 encoder and its tokenizer from local files,
where the encoder lives (compute device, CPU, or offloaded between prompts), and the built-in
tiny encoder of the tiny preset.
Does not own: cross-attention K/V (the DiT computes and caches them from these embeddings),
blending between prompts (pipeline / engine), or downloading anything (never).

Wan2.1 conditions on umT5-XXL encoder states exactly as diffusers' `WanPipeline`
(`_get_t5_prompt_embeds`) prepares them, which `UMT5PromptEncoder` reproduces:

1. clean the prompt (`prompt_clean`: HTML-unescape twice, collapse whitespace, strip);
2. tokenize to `max_length` tokens (pad to max_length, truncate, add `</s>`), with a mask;
3. run the encoder on ids + mask and take `last_hidden_state`;
4. keep the states of the real tokens (mask sum) and set every later position to exactly zero.

No guidance and no negative prompt: one prompt gives one `[1, max_length, text_dim]` tensor.
(diffusers also runs `ftfy.fix_text` when ftfy is installed; we do the same, so embeddings
match a diffusers install with or without ftfy.)
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from streamdiff.config import TextConfig, WeightsConfig, resolve_path
from streamdiff.model.loading import WAN_T5_FILE, WeightsFileError, WeightsMismatchError, first_line, load_wan_t5

log = logging.getLogger(__name__)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean`: ftfy (if installed), HTML-unescape twice, collapse whitespace."""
    try:
        import ftfy  # optional, as in diffusers

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def zero_pad_states(states: torch.Tensor, seq_len: int, max_length: int) -> torch.Tensor:
    """Keep the first `seq_len` rows of `states` [n, D] and zero-fill up to `max_length` rows."""
    kept = states[:seq_len]  # [seq_len, D]
    pad = kept.new_zeros(max_length - kept.shape[0], kept.shape[1])  # [max_length - seq_len, D]
    return torch.cat([kept, pad], dim=0)[None]  # [1, max_length, D]


class PromptEncoder:
    """Base class: prompt cleaning, the LRU cache and the device/dtype of the result.

    Subclasses implement `_encode(cleaned_prompt) -> [1, max_length, text_dim]` on any device
    and dtype. `encode` returns a fresh tensor on `device` in `dtype` (callers may modify it);
    the cache keeps one copy per cleaned prompt, so "a  cat" and "a cat" share an entry.
    Thread-safe: a lock serializes encodes and cache access.
    """

    def __init__(self, text_dim: int, max_length: int, device: torch.device | str, dtype: torch.dtype,
                 cache_size: int = 64) -> None:
        if max_length < 1:
            raise ValueError(f"text.max_length={max_length} must be at least 1")
        if cache_size < 0:
            raise ValueError(f"text.cache_size={cache_size} must be >= 0")
        self._text_dim = int(text_dim)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @property
    def text_dim(self) -> int:
        return self._text_dim

    def encode(self, prompt: str) -> torch.Tensor:
        """Embeddings of `prompt`: `[1, max_length, text_dim]` on `self.device` in `self.dtype`."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        key = prompt_clean(prompt)
        with self._lock:
            # 1. cache hit: move the entry to the most-recent end.
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return cached.clone()
            # 2. miss: encode, check the shape, convert outside inference mode (a normal tensor).
            self._misses += 1
            emb = self._encode(key)  # [1, max_length, text_dim]
            expected = (1, self.max_length, self.text_dim)
            if tuple(emb.shape) != expected:
                raise RuntimeError(f"{type(self).__name__} produced {tuple(emb.shape)}, expected {expected}")
            emb = emb.to(device=self.device, dtype=self.dtype).clone()  # [1, L, D]
            # 3. store, evicting the least recently used prompt beyond cache_size.
            if self.cache_size > 0:
                self._cache[key] = emb
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                return emb.clone()
            return emb

    def cache_info(self) -> dict:
        """Counters of the prompt cache: hits, misses, size (entries now), capacity."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "size": len(self._cache),
                    "capacity": self.cache_size}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _encode(self, prompt: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# umT5 (transformers) from local folders
# ---------------------------------------------------------------------------------------------


def find_text_encoder(source: str | Path) -> Path:
    """What holds the encoder: a transformers folder (config.json + weights; a diffusers root with
    text_encoder/ also works), or the original Wan file `models_t5_umt5-xxl-enc-bf16.pth` (given
    itself or as the Wan2.1 folder holding it, as StreamDiffusionV2 reads it)."""
    expected = ("a transformers UMT5EncoderModel folder (config.json + model.safetensors) or an original "
                f"Wan2.1 folder with {WAN_T5_FILE}")
    if not str(source):
        raise FileNotFoundError(f"no text encoder given (set weights.text_encoder to {expected})")
    path = resolve_path(source)
    if path.is_file():
        return path  # an original Wan file; load_wan_t5 checks what it holds
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder not found: {path} (expected {expected})")
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        path = path / "text_encoder"  # a diffusers pipeline folder
    if not (path / "config.json").is_file():
        if (path / WAN_T5_FILE).is_file():
            return path / WAN_T5_FILE
        raise FileNotFoundError(f"text encoder folder {path} has neither config.json nor {WAN_T5_FILE} "
                                f"(expected {expected})")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"text encoder folder {path} has no weights (expected one of "
                                f"{', '.join(_WEIGHT_FILES)})")
    return path


def _resolve_tokenizer_folder(tokenizer_folder: str | Path | None, encoder: Path) -> Path:
    """The tokenizer folder: the one given, else beside the encoder (its folder, a diffusers
    sibling tokenizer/, or an original Wan2.1 folder's google/umt5-xxl/)."""
    if tokenizer_folder:
        candidates = [resolve_path(tokenizer_folder)]
        if not candidates[0].is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {candidates[0]} (expected a transformers "
                                    f"tokenizer folder with {' or '.join(_TOKENIZER_FILES)})")
    elif encoder.is_file():
        candidates = [encoder.parent / "google" / "umt5-xxl", encoder.parent]
    else:
        candidates = [encoder, encoder.parent / "tokenizer"]
    for path in candidates:
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no tokenizer files in {tried} (expected {' or '.join(_TOKENIZER_FILES)} "
                            f"with tokenizer_config.json; set weights.tokenizer)")


class UMT5PromptEncoder(PromptEncoder):
    """umT5 encoder + tokenizer loaded from local files (`local_files_only`), as Wan2.1 uses them.

    The encoder is a transformers folder (the Diffusers repository's text_encoder/) or the
    original Wan file StreamDiffusionV2 reads, `models_t5_umt5-xxl-enc-bf16.pth` (the file or the
    Wan2.1 folder holding it; its tokenizer then comes from the folder's google/umt5-xxl/):
    the same weights in other names (`loading.load_wan_t5`).

    Placement: `encoder_device="same"` keeps the encoder on `device`; `"cpu"` keeps it on the
    CPU for good (the embeddings are then moved to `device`). `offload_after_encode` loads the
    encoder on the CPU, moves it to `device` for each encode and back to the CPU afterwards.
    The encoder runs in `dtype`, except float16 runs in bfloat16 (T5 overflows in fp16).
    """

    def __init__(self, source: str | Path, tokenizer_folder: str | Path | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 512, encoder_device: str = "same", offload_after_encode: bool = False,
                 cache_size: int = 64, text_dim: int | None = None, min_match: float = 0.99,
                 trust_pickle: bool = False) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        if encoder_device not in ("same", "cpu"):
            raise ValueError(f"text.device={encoder_device!r} must be 'same' or 'cpu'")
        # 1. find the files; every missing piece is a FileNotFoundError naming the path.
        self.source = find_text_encoder(source)  # a folder, or an original Wan file
        self.tokenizer_folder = _resolve_tokenizer_folder(tokenizer_folder, self.source)
        # 2. load the tokenizer and the encoder (CPU first), refusing a checkpoint that misses keys.
        # transformers' own errors (a broken config.json or tokenizer.json, a truncated safetensors)
        # are said in one line naming the folder, as the other loaders' are
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, KeyError, TypeError, ... from the files
            raise WeightsFileError(f"tokenizer folder {self.tokenizer_folder} cannot be read "
                                   f"({type(exc).__name__}: {first_line(exc)})") from None
        if self.tokenizer.pad_token_id is None:  # every prompt is padded to max_length
            raise WeightsFileError(f"the tokenizer in {self.tokenizer_folder} has no padding token (is its "
                                   f"tokenizer_config.json / special_tokens_map.json missing?)")
        self.tokenizer.padding_side = "right"  # the zero-padding rule keeps the first seq_len rows
        self.encoder_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        if self.source.is_file():
            model = load_wan_t5(self.source, self.encoder_dtype, min_match, trust_pickle)
        else:
            try:
                model, info = UMT5EncoderModel.from_pretrained(str(self.source), local_files_only=True,
                                                               dtype=self.encoder_dtype, output_loading_info=True)
            except Exception as exc:  # noqa: BLE001 - as above
                raise WeightsFileError(f"text encoder {self.source} cannot be read "
                                       f"({type(exc).__name__}: {first_line(exc)})") from None
            total = max(len(model.state_dict()), 1)
            matched = 1.0 - len(info["missing_keys"]) / total
            log.info("text encoder: %d/%d keys matched (%.1f%%), %d unexpected", total - len(info["missing_keys"]),
                     total, 100 * matched, len(info.get("unexpected_keys", ())))
            if matched < min_match:
                missing = sorted(info["missing_keys"])
                raise WeightsMismatchError(f"text encoder {self.source}: only {matched:.1%} of {total} keys matched "
                                           f"(min {min_match:.0%}); missing e.g. {missing[:5]}")
        self.model = model.eval().requires_grad_(False)
        d_model = int(model.config.d_model)
        if text_dim is not None and int(text_dim) != d_model:
            raise WeightsMismatchError(f"text encoder {self.source} has d_model={d_model} but model.text_dim={text_dim}")
        # a tokenizer of another model: ids past the embedding table crash the first prompt, and a
        # much smaller vocabulary (T5's 32k with umT5's 256k) gives other embeddings without a word
        tokens, vocab = len(self.tokenizer), int(model.config.vocab_size)
        if not 0.9 * vocab <= tokens <= vocab:
            raise WeightsMismatchError(
                f"the tokenizer in {self.tokenizer_folder} has {tokens} tokens but the text encoder {self.source} "
                f"embeds {vocab}: not this encoder's tokenizer (umT5-XXL's has 256300 for 256384; set weights.tokenizer)")
        super().__init__(d_model, max_length, device, dtype, cache_size)
        # 3. placement.
        self.offload_after_encode = bool(offload_after_encode) and encoder_device == "same"
        self.compute_device = torch.device("cpu") if encoder_device == "cpu" else self.device
        self._move(torch.device("cpu") if self.offload_after_encode else self.compute_device)

    @property
    def encoder_device(self) -> torch.device:
        """Where the encoder's parameters are now."""
        return next(self.model.parameters()).device

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        if device.type == "cpu" and self.compute_device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of a cleaned prompt, exactly as diffusers' Wan pipeline makes them."""
        batch = self.tokenizer([prompt], padding="max_length", max_length=self.max_length, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return batch.input_ids, batch.attention_mask  # [1, L], [1, L]

    def _encode(self, prompt: str) -> torch.Tensor:
        ids, mask = self.tokenize(prompt)  # [1, L], [1, L]
        seq_len = int(mask.gt(0).sum())
        if self.offload_after_encode:
            self._move(self.compute_device)
        try:
            with torch.inference_mode():
                dev = self.compute_device
                states = self.model(ids.to(dev), mask.to(dev)).last_hidden_state  # [1, L, D]
                return zero_pad_states(states[0], seq_len, self.max_length)  # [1, L, D]
        finally:
            if self.offload_after_encode:
                self._move(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The tiny built-in encoder (tiny preset: no files, seeded random weights)
# ---------------------------------------------------------------------------------------------


class TinyPromptEncoder(PromptEncoder):
    """A small deterministic stand-in for umT5: hashed words -> seeded embeddings -> one mixing layer.

    Tokens: lower-cased words and punctuation marks, each hashed with blake2b (stable across
    processes, unlike Python's `hash`) into `vocab_size - 2` ids, then an end token, truncated to
    `max_length` like the umT5 tokenizer. Weights come from a `torch.Generator` seeded with
    `seed`. Mixing: every token sees the prompt mean through a low-rank tanh layer, then a
    LayerNorm; positions past the token count are zero, as with umT5.
    """

    EOS_ID = 1

    def __init__(self, text_dim: int, *, max_length: int = 512, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_size: int = 64, vocab_size: int = 4096,
                 rank: int = 64) -> None:
        super().__init__(text_dim, max_length, device, dtype, cache_size)
        self.seed = int(seed)
        self.vocab_size = int(vocab_size)
        gen = torch.Generator().manual_seed(self.seed)
        d, r = self.text_dim, min(int(rank), self.text_dim)
        self.table = torch.randn(self.vocab_size, d, generator=gen)  # [V, D]
        self.pos = 0.1 * torch.randn(self.max_length, d, generator=gen)  # [L, D]
        self.w_in = torch.randn(2 * d, r, generator=gen) / (2 * d) ** 0.5  # [2D, r]
        self.w_out = torch.randn(r, d, generator=gen) / r**0.5  # [r, D]

    def token_ids(self, prompt: str) -> list[int]:
        """Hashed word ids of a cleaned prompt plus the end token, at most `max_length` ids."""
        words = re.findall(r"\w+|[^\w\s]", prompt.lower())
        ids = [2 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
               % (self.vocab_size - 2) for w in words]
        return ids[: self.max_length - 1] + [self.EOS_ID]

    def _encode(self, prompt: str) -> torch.Tensor:
        ids = torch.tensor(self.token_ids(prompt), dtype=torch.long)  # [n]
        n = ids.numel()
        e = self.table[ids] + self.pos[:n]  # [n, D]
        ctx = e.mean(dim=0, keepdim=True).expand(n, -1)  # [n, D]
        h = e + torch.tanh(torch.cat([e, ctx], dim=-1) @ self.w_in) @ self.w_out  # [n, D]
        h = F.layer_norm(h, (self.text_dim,))  # [n, D]
        return zero_pad_states(h, n, self.max_length)  # [1, L, D]


# ---------------------------------------------------------------------------------------------


def build_prompt_encoder(text_cfg: TextConfig, weights_cfg: WeightsConfig, text_dim: int,
                         device: torch.device | str, dtype: torch.dtype) -> PromptEncoder:
    """The prompt encoder the config asks for, producing `[1, text_cfg.max_length, text_dim]`."""
    if text_cfg.kind == "tiny":
        return TinyPromptEncoder(text_dim, max_length=text_cfg.max_length, seed=weights_cfg.seed, device=device,
                                 dtype=dtype, cache_size=text_cfg.cache_size)
    if text_cfg.kind == "umt5":
        return UMT5PromptEncoder(weights_cfg.text_encoder, weights_cfg.tokenizer or None, device=device, dtype=dtype,
                                 max_length=text_cfg.max_length, encoder_device=text_cfg.device,
                                 offload_after_encode=text_cfg.offload_after_encode,
                                 cache_size=text_cfg.cache_size, text_dim=text_dim, min_match=weights_cfg.min_match,
                                 trust_pickle=weights_cfg.trust_pickle)
    raise ValueError(f"text.kind={text_cfg.kind!r} is not one of ['tiny', 'umt5']")


__all__ = [
    "PromptEncoder",
    "TinyPromptEncoder",
    "UMT5PromptEncoder",
    "build_prompt_encoder",
    "find_text_encoder",
    "prompt_clean",
    "zero_pad_states",
]
