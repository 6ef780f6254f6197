"""Weight loading: checkpoint formats -> diffusers names -> a module (whole model or a stage).

Owns: reading the transformer weights of a diffusers folder (single or sharded safetensors),
an original Wan single file or folder (`.safetensors` / `.pth`, optional
`model.diffusion_model.` prefix) and a StreamDiffusionV2 / CausVid `model.pt`; renaming them
to diffusers' `WanTransformer3DModel` names with diffusers' own converters; loading any of them
into a module whose names are a subset of diffusers' (a pipeline stage holds `blocks.{i}` of its
range only) with a match report that refuses a checkpoint below `min_match`; reading the Wan
VAE (diffusers `vae/` folder or original `Wan2.1_VAE.pth`) and the umT5 text encoder in the
original Wan layout (`models_t5_umt5-xxl-enc-bf16.pth`); seeded random init (`format: random`).
Does not own: building the modules (causal_wan.py, vae.py, build.py), devices, or dtype policy
beyond casting each loaded tensor to the dtype of the tensor it replaces. Never downloads.

Tensors are read lazily: a `StateDict` maps names to the place a tensor lives (an mmapped
safetensors file or an mmapped torch file), so a stage reads only the tensors it holds and
loading copies one tensor at a time into the module's existing storage.

SDV2 checkpoints: `{"generator": ..., "generator_ema": ...}`. StreamDiffusionV2's inference
(`load_generator_state_dict`, `SingleGPUInferencePipeline.load_model`) takes `generator` first,
then `generator_ema`, then `state_dict`; `prefer="generator"` reproduces it, and
`prefer="generator_ema"` picks the EMA weights when a file holds both.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors import safe_open

from streamdiff.config import ConfigError, resolve_path  # resolve_path: callers import it from here too

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SDV2_WRAPPERS = ("generator", "generator_ema", "state_dict", "model", "module")
# Infixes of training wrappers (torch.compile, FSDP, activation checkpointing), removed anywhere.
WRAPPER_INFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
LEADING_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")
# Top-level groups of the DiT that a stage may leave out (embeddings / head), besides blocks.
STAGE_GROUPS = ("patch_embedding", "condition_embedder", "norm_out", "proj_out", "scale_shift_table")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_INDEX = re.compile(r"\.\d+(?=\.|$)")
MAX_KINDS = 10


class WeightsError(ConfigError):
    """A weights file the config names that cannot be used (a ConfigError, so a ValueError: the
    CLI reports it in one line)."""


class WeightsFileError(WeightsError):
    """A weights file that cannot be read: truncated, empty, not the format its name says."""


class WeightsMismatchError(WeightsError):
    """A checkpoint does not fit the module; `.report` says how (None for shape mismatches)."""

    def __init__(self, message: str, report: "LoadReport | None" = None):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------
# A lazily read state dict
# ---------------------------------------------------------------------------------------------


class _Safetensors:
    def __init__(self, path: Path):
        try:
            self.handle = safe_open(str(path), framework="pt", device="cpu")  # mmapped, read on get
        except Exception as exc:  # safetensors' SafetensorError (truncated, empty, not safetensors), OSError
            raise unreadable_safetensors(path, exc) from None

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(key).get_shape())

    def is_float(self, key: str) -> bool:
        return self.handle.get_slice(key).get_dtype().startswith(("F", "BF"))  # F32, F16, BF16, F8_E4M3, ...


class _Tensors:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return [k for k, v in self.tensors.items() if isinstance(v, torch.Tensor)]

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def is_float(self, key: str) -> bool:
        return self.tensors[key].is_floating_point()


class StateDict(Mapping[str, torch.Tensor]):
    """Read-only name -> tensor mapping; a tensor is read from its file when indexed.

    `config` is the folder's config.json (None when there is none), `source` names the file(s).
    """

    def __init__(self, entries: dict[str, tuple[Any, str]], source: str, config: dict | None = None):
        self._entries = entries  # name -> (reader, name inside the reader)
        self.source = source
        self.config = config

    @classmethod
    def of(cls, reader: Any, source: str, config: dict | None = None) -> "StateDict":
        return cls({k: (reader, k) for k in reader.keys()}, source, config)

    def __getitem__(self, key: str) -> torch.Tensor:
        reader, inner = self._entries[key]
        return reader.get(inner)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        reader, inner = self._entries[key]
        return reader.shape(inner)

    def is_float(self, key: str) -> bool:
        """From the file's header where it has one: nothing is read."""
        reader, inner = self._entries[key]
        return reader.is_float(inner)

    def renamed(self, new_to_old: Mapping[str, str]) -> "StateDict":
        return StateDict({new: self._entries[old] for new, old in new_to_old.items()}, self.source, self.config)


def _rename_with(state: StateDict, convert: Callable[[dict], dict], what: str) -> StateDict:
    """Apply a diffusers key converter to the names only: it moves values without looking at
    them, so we feed it name -> name and get new name -> old name back."""
    converted = convert({k: k for k in state})
    if len(converted) != len(state) or not all(isinstance(v, str) for v in converted.values()):
        raise WeightsMismatchError(f"{what}: renaming {state.source} did not map names one to one")
    return state.renamed(converted)


def _strip_wrappers(state: StateDict) -> StateDict:
    new_to_old = {}
    for old in state:
        new = old
        for infix in WRAPPER_INFIXES:
            new = new.replace(infix, "")
        while prefix := next((p for p in LEADING_PREFIXES if new.startswith(p)), None):
            new = new[len(prefix):]
        if new in new_to_old:
            raise WeightsMismatchError(f"{state.source}: {old!r} and {new_to_old[new]!r} both become {new!r}")
        new_to_old[new] = old
    return state.renamed(new_to_old)


def _has_original_wan_names(keys: list[str]) -> bool:
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)
    original = any(k.startswith(("text_embedding.", "time_embedding.", "head.")) or ".self_attn." in k for k in keys)
    return original and not diffusers


def _to_diffusers_transformer_names(state: StateDict) -> StateDict:
    """Original Wan names -> diffusers names (diffusers' converter); diffusers names pass through.
    The converter is not idempotent (it swaps norm2/norm3), hence the check."""
    if not _has_original_wan_names(list(state)):
        return state
    if any("motion_encoder" in k or "face_adapter" in k for k in state):  # converters that touch values
        tensors = convert_wan_transformer_to_diffusers({k: state[k] for k in state})
        return StateDict.of(_Tensors(tensors), state.source, state.config)
    return _rename_with(state, convert_wan_transformer_to_diffusers, "transformer")


# ---------------------------------------------------------------------------------------------
# Containers: files and folders
# ---------------------------------------------------------------------------------------------


class UntrustedPickleError(ConfigError):
    """A .pt file needs full unpickling (it carries objects, not only tensors) and was not trusted."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def unreadable_safetensors(path: str | Path, exc: BaseException) -> WeightsFileError:
    """The error for a file safetensors cannot open (truncated, empty, another format)."""
    return WeightsFileError(f"{path} is not a readable safetensors file ({first_line(exc)})")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load on CPU, weights only (mmapped when the file format allows it)."""
    not_readable = f"{path} is not a readable torch file"
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be mmapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not objects in a good file: a broken one
            lines = [line.strip() for line in str(exc).split("WeightsUnpickler error:")[-1].splitlines()]
            raise WeightsFileError(f"{not_readable} (truncated or not a checkpoint: "
                                   f"{next((line for line in lines if line), 'unreadable')[:120]})") from None
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} holds more than tensors and cannot be read with weights_only=True; full unpickling "
                f"runs code from the file: set weights.trust_pickle: true (--set weights.trust_pickle=true) "
                f"only if you trust it") from None
        log.warning("%s holds more than tensors (weights_only=True failed: %s); loading it with full "
                    "pickle, which runs code from the file: use only files you trust", path, str(exc).splitlines()[0])
        return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, OSError, RuntimeError) as exc:  # empty, truncated, not a torch file
        raise WeightsFileError(f"{not_readable} ({first_line(exc) if str(exc).strip() else 'it ends early'})") from None
    except Exception as exc:  # other bytes read as pickle opcodes: KeyError, IndexError, struct.error, ...
        raise WeightsFileError(f"{not_readable} (not a checkpoint: pickle failed with "
                               f"{type(exc).__name__} {first_line(exc)})") from None


def _unwrap(obj: Any, wrappers: tuple[str, ...], path: Path) -> tuple[Mapping, str]:
    """Descend through {wrapper: {...}} nesting (first wrapper in `wrappers` order that holds a
    dict) to the dict of tensors; returns it and the path taken, e.g. "['generator']"."""
    chosen = []
    for _ in range(4):
        key = next((k for k in wrappers if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        chosen.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsFileError(f"{path}: found no dict of tensors under any of {wrappers} (top level: {top})")
    return obj, "".join(f"[{k!r}]" for k in chosen)


def _read_file(path: Path, trust_pickle: bool = False) -> StateDict:
    if path.suffix == ".safetensors":
        return StateDict.of(_Safetensors(path), str(path))
    if path.suffix in TORCH_SUFFIXES:
        obj, where = _unwrap(_torch_load(path, trust_pickle), ("state_dict", "model", "module"), path)
        return StateDict.of(_Tensors(obj), f"{path}{where}")
    raise WeightsFileError(f"{path}: unknown weights file type (expected .safetensors or one of {TORCH_SUFFIXES})")


def _require(path: str | Path, expected: str) -> Path:
    if not str(path):
        raise FileNotFoundError(f"no path given: expected {expected}")
    p = resolve_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: expected {expected}")
    return p


def _read_json_object(path: Path) -> dict:
    """A JSON file holding an object; WeightsFileError (one line) for anything else."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsFileError(f"{path} is not readable JSON ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise WeightsFileError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _read_folder(folder: Path, expected: str) -> StateDict:
    """A diffusers model folder: config.json + single or sharded safetensors (or a .bin)."""
    config_path = folder / "config.json"
    config = _read_json_object(config_path) if config_path.is_file() else None
    index_path = folder / DIFFUSERS_INDEX
    if index_path.is_file():
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsFileError(f"{index_path} has no weight_map of tensor names to shard files")
        readers = {}
        for name in sorted(set(weight_map.values())):
            readers[name] = _Safetensors(_require(folder / name, f"a shard listed in {index_path}"))
        held = {name: set(reader.keys()) for name, reader in readers.items()}
        if wrong := [(key, name) for key, name in weight_map.items() if key not in held[name]]:
            key, name = wrong[0]  # a half-updated download: the shards of one version, the index of another
            raise WeightsFileError(f"{index_path} maps {key} to {name}, which does not hold it"
                                   + (f" ({len(wrong) - 1} more such tensors)" if len(wrong) > 1 else ""))
        entries = {key: (readers[name], key) for key, name in weight_map.items()}
        return StateDict(entries, f"{folder} ({len(readers)} shards)", config)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no {DIFFUSERS_WEIGHTS} (or sharded *.safetensors with "
                                f"{DIFFUSERS_INDEX}): expected {expected}")
    parts = [_read_file(f) for f in files]
    entries = {k: v for part in parts for k, v in part._entries.items()}
    return StateDict(entries, ", ".join(part.source for part in parts), config)


def read_transformer_state_dict(
    fmt: Literal["diffusers", "wan", "sdv2"],
    path: str | Path,
    *,
    prefer: Literal["generator", "generator_ema"] = "generator",
    trust_pickle: bool = False,
) -> StateDict:
    """The DiT weights at `path` in diffusers `WanTransformer3DModel` names (read lazily).

    diffusers: a pipeline folder with transformer/, or the transformer folder itself.
    wan: an original Wan file (.safetensors / .pth / .pt, `model.diffusion_model.` allowed) or
    an original Wan folder of safetensors. sdv2: a StreamDiffusionV2 / CausVid model.pt.
    `result.config` is the folder's config.json (diffusers / wan folders) for architecture checks.
    `.pt`/`.pth` files are read with weights_only=True; one that needs full unpickling is refused
    (UntrustedPickleError) unless `trust_pickle` (config `weights.trust_pickle`).
    """
    if fmt == "diffusers":
        p = _require(path, "a diffusers folder with transformer/ or a transformer folder (config.json + safetensors)")
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a folder: format=diffusers expects a folder (use format=wan for a file)")
        folder = p / "transformer" if (p / "transformer").is_dir() else p
        state = _read_folder(folder, "diffusers transformer weights")
    elif fmt == "wan":
        p = _require(path, "an original Wan .safetensors/.pth file or folder")
        state = _read_folder(p, "original Wan weights") if p.is_dir() else _read_file(p, trust_pickle)
    elif fmt == "sdv2":
        p = _require(path, "a StreamDiffusionV2 model.pt (or the folder holding it)")
        if p.is_dir():
            p = _require(p / "model.pt", "model.pt inside the StreamDiffusionV2 checkpoint folder")
        state = _read_sdv2(p, prefer, trust_pickle)
    else:
        raise ValueError(f"weights.format={fmt!r} has no transformer file to read (diffusers, wan or sdv2)")
    return _to_diffusers_transformer_names(_strip_wrappers(state))


# A transformer folder's config.json: diffusers' names (WanTransformer3DModel) or the original
# Wan's (WanModel), each against the config's `model:` field.
_DIFFUSERS_FIELDS = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim", "ffn_dim": "ffn_dim",
                     "num_layers": "num_layers", "in_channels": "in_channels", "out_channels": "out_channels",
                     "text_dim": "text_dim", "freq_dim": "freq_dim", "eps": "eps",
                     "cross_attn_norm": "cross_attn_norm", "rope_max_seq_len": "rope_max_seq_len"}
_WAN_FIELDS = {"num_heads": "num_heads", "ffn_dim": "ffn_dim", "num_layers": "num_layers", "in_dim": "in_channels",
               "out_dim": "out_channels", "text_dim": "text_dim", "freq_dim": "freq_dim", "eps": "eps",
               "cross_attn_norm": "cross_attn_norm"}
# Values the model has no setting for (the first is what it takes): another one is another architecture.
_FIXED = {"patch_size": ([1, 2, 2],), "qk_norm": ("rms_norm_across_heads", True), "model_type": ("t2v",),
          "image_dim": (None,), "added_kv_proj_dim": (None,)}


def transformer_config_disagreements(config: Mapping | None, model_cfg) -> list[str]:
    """Where a transformer folder's config.json and the config's `model:` (a ModelConfig)
    disagree, each said with the `--set` that follows the file; [] without a config.json. Shapes
    cannot tell heads from head width (a 12 x 128 model and a 24 x 64 one hold the same tensors),
    nor the eps or RoPE length: only the file's config can."""
    if not config:
        return []
    wan = config.get("_class_name") == "WanModel" or ("dim" in config and "num_attention_heads" not in config)
    said = []
    for name, field_name in (_WAN_FIELDS if wan else _DIFFUSERS_FIELDS).items():
        if name not in config:
            continue
        ours, theirs = getattr(model_cfg, field_name), config[name]
        if field_name == "eps" and isinstance(theirs, float):  # written as 1e-06 or 0.000001
            theirs = ours if math.isclose(theirs, ours, rel_tol=1e-9) else theirs
        if theirs != ours:
            said.append(f"{name}={theirs!r} (model.{field_name}={ours!r}: --set model.{field_name}={theirs})")
    if wan and "dim" in config and config["dim"] != model_cfg.num_heads * model_cfg.head_dim:
        said.append(f"dim={config['dim']!r} (model.num_heads x model.head_dim = {model_cfg.num_heads} x "
                    f"{model_cfg.head_dim})")
    for name, allowed in _FIXED.items():
        if name in config and config[name] not in allowed:
            said.append(f"{name}={config[name]!r} (this model takes {allowed[0]!r})")
    return said


def _read_sdv2(path: Path, prefer: str, trust_pickle: bool) -> StateDict:
    if prefer not in ("generator", "generator_ema"):
        raise ValueError(f"prefer={prefer!r}: expected 'generator' or 'generator_ema'")
    other = "generator_ema" if prefer == "generator" else "generator"
    order = (prefer, other) + tuple(k for k in SDV2_WRAPPERS if k not in (prefer, other))
    obj, where = _unwrap(_torch_load(path, trust_pickle), order, path)
    log.info("sdv2: using %s%s", path, where)
    return StateDict.of(_Tensors(obj), f"{path}{where}")


# ---------------------------------------------------------------------------------------------
# Loading into a module
# ---------------------------------------------------------------------------------------------


def key_kinds(keys: list[str], limit: int = MAX_KINDS) -> list[str]:
    """Group names by collapsing indices: `blocks.*.attn1.norm_q.weight (30 keys)`."""
    counts = Counter(_INDEX.sub(".*", k) for k in keys)
    kinds = [f"{kind} ({n} key{'s' if n > 1 else ''})" for kind, n in counts.most_common()]
    return kinds[:limit] + ([f"... {len(kinds) - limit} more kinds"] if len(kinds) > limit else [])


@dataclass
class LoadReport:
    what: str
    matched: int
    expected: int
    n_missing: int = 0
    n_unexpected: int = 0
    missing: list[str] = field(default_factory=list)  # kinds, see key_kinds
    unexpected: list[str] = field(default_factory=list)
    skipped_for_stage: int = 0  # checkpoint keys of blocks / embeddings this module does not hold
    source: str = ""
    matched_keys: list[str] = field(default_factory=list, repr=False)  # what a copy takes from the checkpoint
    missing_keys: list[str] = field(default_factory=list, repr=False)  # the module's tensors it does not fill

    @property
    def ratio(self) -> float:
        return self.matched / self.expected if self.expected else 1.0

    def __str__(self) -> str:
        line = (f"{self.what}: {self.matched}/{self.expected} keys matched ({100 * self.ratio:.1f}%), "
                f"{self.n_unexpected} unexpected")
        return line + (f", {self.skipped_for_stage} for other stages" if self.skipped_for_stage else "")

    def details(self) -> str:
        parts = [str(self)]
        if self.n_missing:
            parts.append(f"missing {self.n_missing}: " + ", ".join(self.missing))
        if self.n_unexpected:
            parts.append(f"unexpected {self.n_unexpected}: " + ", ".join(self.unexpected))
        return "; ".join(parts)


def _total_blocks(module: nn.Module) -> int | None:
    for holder in (getattr(module, "cfg", None), getattr(module, "config", None)):
        n = getattr(holder, "num_layers", None)
        if isinstance(n, int):
            return n
    return None


@torch.no_grad()
def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    min_match: float = 0.99,
    what: str = "transformer",
    num_blocks: int | None = None,
) -> LoadReport:
    """Copy `state` into `module` in place (each tensor cast to the dtype it replaces).

    Keys of blocks the module does not hold (and of embeddings / head it leaves out) are for
    other stages. `num_blocks` (default: the module's `cfg.num_layers` / `config.num_layers`)
    makes block indices beyond the model unexpected rather than "other stage".
    Raises WeightsMismatchError (a ValueError) below `min_match` or on any shape mismatch;
    nothing is copied then.
    """
    report = check_fit(module, state, min_match, what, num_blocks)
    copy_into(module, state, report)
    return report


@torch.no_grad()
def copy_into(module: nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """The copy `check_fit` allowed: its matched tensors, one at a time, into the module's storage."""
    targets = module.state_dict()
    for key in report.matched_keys:
        targets[key].copy_(state[key])
    if report.n_missing:
        log.warning("%s left at init: %s", report.what, ", ".join(report.missing))
    if report.n_unexpected:
        log.warning("%s: %d unexpected key(s) of %s ignored: %s", report.what, report.n_unexpected,
                    report.source or "the checkpoint", ", ".join(report.unexpected))


def check_fit(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    min_match: float = 0.99,
    what: str = "transformer",
    num_blocks: int | None = None,
) -> LoadReport:
    """`load_into`'s checks, without the copy: the module may be on the meta device, and of the
    checkpoint only names, shapes and dtypes are read (a file's header). Raises
    WeightsMismatchError where `load_into` would; the report lists what a copy takes."""
    # 1. The module's persistent tensors and which blocks / groups it holds.
    targets = module.state_dict()  # name -> detached tensor sharing the module's storage
    held_blocks = {int(m.group(1)) for k in targets if (m := _BLOCK.match(k))}
    held_groups = {k.split(".", 1)[0] for k in targets}
    num_blocks = num_blocks if num_blocks is not None else _total_blocks(module)

    def for_other_stage(key: str) -> bool:
        if not held_blocks and num_blocks is None:  # not a DiT (a VAE): no stage holds the rest
            return False
        if m := _BLOCK.match(key):
            i = int(m.group(1))
            return i not in held_blocks and (num_blocks is None or i < num_blocks)
        group = key.split(".", 1)[0]
        return group in STAGE_GROUPS and group not in held_groups

    # 2. Sort the checkpoint's keys.
    matched, unexpected, skipped = [], [], 0
    for key in state:
        if key in targets:
            matched.append(key)
        elif for_other_stage(key):
            skipped += 1
        else:
            unexpected.append(key)
    matched_set = set(matched)
    missing = [k for k in targets if k not in matched_set]
    report = LoadReport(what, len(matched), len(targets), len(missing), len(unexpected), key_kinds(missing),
                        key_kinds(unexpected), skipped, str(getattr(state, "source", "")), matched, missing)

    # 3. Refuse a checkpoint that does not fit: too few of the module's keys, blocks the model
    #    does not have (a bigger model), or more unexpected keys than min_match allows missing ones.
    if report.ratio < min_match:
        raise WeightsMismatchError(
            f"{report.details()} — below min_match={min_match} (from {report.source or 'a state dict'}); "
            "is this the right format and model size?", report)
    # A DiT's embeddings, time modulation and output head are a few keys of hundreds: a file that
    # lacks them passed the ratio and streamed noise from a random head (a review: a 1.3B file
    # without proj_out, scale_shift_table and patch_embedding.bias matched 99.5%).
    if held_blocks and (outside := [k for k in missing if not _BLOCK.match(k)]):
        raise WeightsMismatchError(
            f"{what}: {report.source or 'the checkpoint'} lacks {', '.join(key_kinds(outside))}, outside the "
            "blocks (embeddings and output head are never left at random init); is it a complete checkpoint?",
            report)
    beyond = sorted({i for k in unexpected if (m := _BLOCK.match(k)) and num_blocks is not None
                     and (i := int(m.group(1))) >= num_blocks})
    if beyond:
        raise WeightsMismatchError(
            f"{what}: {report.source or 'the checkpoint'} has {beyond[-1] + 1} blocks but the model has "
            f"{num_blocks} (model.num_layers={num_blocks}): a checkpoint of a bigger model?", report)
    if report.n_unexpected > (1 - min_match) * max(1, report.expected):
        raise WeightsMismatchError(
            f"{report.details()} — more unexpected keys than min_match={min_match} allows (from "
            f"{report.source or 'a state dict'}); is this the right format and model?", report)
    shape_of = state.shape if isinstance(state, StateDict) else (lambda k: tuple(state[k].shape))
    bad = [(k, shape_of(k), tuple(targets[k].shape)) for k in matched if shape_of(k) != tuple(targets[k].shape)]
    if bad:
        lines = "; ".join(f"{k}: checkpoint {src} vs model {dst}" for k, src, dst in bad[:MAX_KINDS])
        more = f" (and {len(bad) - MAX_KINDS} more)" if len(bad) > MAX_KINDS else ""
        raise WeightsMismatchError(f"{what}: {len(bad)} shape mismatch(es): {lines}{more}")
    is_float = state.is_float if isinstance(state, StateDict) else (lambda k: state[k].is_floating_point())
    if ints := [k for k in matched if targets[k].is_floating_point() and not is_float(k)]:
        raise WeightsMismatchError(f"{what}: {len(ints)} tensor(s) of {report.source or 'the checkpoint'} are not "
                                   f"floating point (e.g. {ints[0]}); is this a weights file?")
    return report


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def load_vae(path: str | Path, config: dict | None = None, min_match: float = 0.99):
    """The Wan VAE (`AutoencoderKLWan`, fp32, CPU, eval) from a diffusers vae/ folder (or the
    pipeline folder above it) or an original Wan2.1_VAE .pth / .safetensors (or the original Wan2.1
    folder holding `Wan2.1_VAE.pth`, as StreamDiffusionV2 reads it). For an original file
    `config` gives the architecture (default: diffusers' defaults, the real Wan2.1 VAE).

    Folder weights go through `load_into` too (rather than from_pretrained) so the same match
    report and min_match apply. diffusers' converter assumes num_res_blocks=2 (the real VAE)."""
    from diffusers import AutoencoderKLWan

    p = _require(path, "a diffusers vae/ folder or an original Wan2.1_VAE.pth / .safetensors")
    if p.is_dir() and (p / WAN_VAE_FILE).is_file() and not (p / "vae").is_dir():
        p = p / WAN_VAE_FILE  # an original Wan2.1 folder
    if p.is_dir():
        folder = p / "vae" if (p / "vae").is_dir() else p
        state = _read_folder(folder, "diffusers VAE weights")
        if state.config is None:
            raise FileNotFoundError(f"{folder} has no config.json: expected a diffusers vae/ folder")
        kind = state.config.get("_class_name", "AutoencoderKLWan")
        if kind != "AutoencoderKLWan":  # another model's folder (the transformer/ beside vae/, ...)
            raise WeightsFileError(f"{folder / 'config.json'} describes a {kind}, not the Wan VAE "
                                   f"(AutoencoderKLWan): expected the vae/ folder")
        if state.config.get("patch_size") is not None:
            raise WeightsFileError(f"{folder} is the Wan2.2 VAE (patch_size={state.config['patch_size']}); "
                                   f"StreamDiff runs Wan2.1 models and their VAE (patch_size none)")
        try:
            vae = AutoencoderKLWan.from_config(state.config)
        except (TypeError, ValueError, RuntimeError) as exc:  # a config.json of other or impossible sizes
            raise WeightsFileError(f"{folder / 'config.json'} does not describe a Wan VAE ({first_line(exc)})") from None
    else:
        state = _strip_wrappers(_read_file(p))
        if any(k.startswith(("encoder.conv1.", "encoder.downsamples.", "decoder.upsamples.")) for k in state):
            state = _rename_with(state, convert_wan_vae_to_diffusers, "vae")
        vae = AutoencoderKLWan(**(config or {}))
    report = load_into(vae, state, min_match=min_match, what="vae")
    log.info("%s", report)
    return vae.eval()


# ---------------------------------------------------------------------------------------------
# The umT5 text encoder in the original Wan layout (models_t5_umt5-xxl-enc-bf16.pth)
# ---------------------------------------------------------------------------------------------

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # in an original Wan2.1 folder, beside google/umt5-xxl/
WAN_VAE_FILE = "Wan2.1_VAE.pth"
# Inside block i: the original Wan T5 encoder's names -> transformers' UMT5EncoderModel's.
# Wan's feed-forward is fc2(fc1(x) * gelu_tanh(gate(x))); transformers' gated-gelu is
# wo(gelu_new(wi_0(x)) * wi_1(x)), so gate -> wi_0 and fc1 -> wi_1.
_WAN_T5_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_T5_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def find_wan_file(path: str | Path, name: str) -> Path | None:
    """`path` itself when it is a file, `path/name` when `path` is a folder holding it, else None."""
    p = resolve_path(path)
    if p.is_file():
        return p
    return p / name if (p / name).is_file() else None


def wan_t5_file(path: str | Path, trust_pickle: bool = False) -> StateDict:
    """The original Wan umT5 encoder file's tensors (read lazily), in its own names."""
    return _strip_wrappers(_read_file(resolve_path(path), trust_pickle))


def wan_t5_config(state: Mapping[str, torch.Tensor]) -> dict:
    """transformers `UMT5Config` arguments read off an original Wan T5 encoder's tensor shapes
    (umT5-XXL: vocab 256384, d_model 4096, 24 layers, 64 heads of 64, d_ff 10240, 32 buckets)."""
    shape = state.shape if isinstance(state, StateDict) else (lambda k: tuple(state[k].shape))
    needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight", "norm.weight")
    if missing := [k for k in needed if k not in state]:
        source = getattr(state, "source", "the file")
        raise WeightsMismatchError(f"{source} is not an original Wan umT5 encoder (no {missing[0]}; expected "
                                   f"{WAN_T5_FILE} from a Wan2.1 folder)")
    vocab, d_model = shape("token_embedding.weight")
    buckets, heads = shape("blocks.0.pos_embedding.embedding.weight")
    layers = 1 + max(int(m.group(1)) for k in state if (m := _WAN_T5_BLOCK.match(k)))
    return dict(vocab_size=vocab, d_model=d_model, d_kv=shape("blocks.0.attn.q.weight")[0] // heads,
                d_ff=shape("blocks.0.ffn.fc1.weight")[0], num_layers=layers, num_heads=heads,
                relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                is_encoder_decoder=False, use_cache=False)


def wan_t5_to_umt5_names(state: StateDict) -> StateDict:
    """The original Wan T5 encoder's state dict in `UMT5EncoderModel` names (unknown names kept,
    so the match report counts them as unexpected)."""
    new_to_old = {}
    for old in state:
        if old == "token_embedding.weight":  # tied: the encoder's embedding is the shared one
            new_to_old["shared.weight"] = new_to_old["encoder.embed_tokens.weight"] = old
        elif old == "norm.weight":
            new_to_old["encoder.final_layer_norm.weight"] = old
        elif (m := _WAN_T5_BLOCK.match(old)) and m.group(2) in _WAN_T5_BLOCK_NAMES:
            new_to_old[f"encoder.block.{m.group(1)}.{_WAN_T5_BLOCK_NAMES[m.group(2)]}"] = old
        else:
            new_to_old[old] = old
    return state.renamed(new_to_old)


def load_wan_t5(path: str | Path, dtype: torch.dtype = torch.float32, min_match: float = 0.99,
                trust_pickle: bool = False):
    """transformers' `UMT5EncoderModel` (CPU, eval, `dtype`) from the original Wan umT5 encoder
    file StreamDiffusionV2 reads (`models_t5_umt5-xxl-enc-bf16.pth`, or a Wan2.1 folder holding
    it). The architecture comes from the file's shapes; the model is built on the meta device and
    filled from the file, so a missing tensor is refused rather than left uninitialised."""
    from transformers import UMT5Config, UMT5EncoderModel

    p = _require(path, f"an original Wan {WAN_T5_FILE} (or the Wan2.1 folder holding it)")
    file = find_wan_file(p, WAN_T5_FILE)
    if file is None:
        raise FileNotFoundError(f"{p} has no {WAN_T5_FILE}: expected an original Wan2.1 folder or the file")
    raw = wan_t5_file(file, trust_pickle)
    config = UMT5Config(**wan_t5_config(raw))
    state = wan_t5_to_umt5_names(raw)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    if missing := [k for k in model.state_dict() if k not in state]:  # nothing would fill them
        raise WeightsMismatchError(f"text encoder: {file} lacks {len(missing)} tensor(s) of a complete umT5 "
                                   f"encoder of its own shapes: {', '.join(key_kinds(missing))}")
    model = model.to(dtype=dtype).to_empty(device="cpu")
    report = load_into(model, state, min_match=min_match, what="text encoder")
    model.tie_weights()
    log.info("%s", report)
    return model.eval().requires_grad_(False)


def load_taehv(path: str | Path, vae_cfg, min_match: float = 0.99):
    """TAEHV (model/taehv.py, fp32, CPU, eval) from a `taew2_1.pth` / .safetensors in the public
    key layout, with the widths of `vae_cfg`. Refuses below `min_match` and on unexpected keys
    beyond 1% (a Wan VAE or a DiT file matches nothing). A TGrow of the file with more output
    channels than the model (older files grow time in the first stage too) keeps its last ones,
    as the public loader does. A file lacking any tensor is refused (all of them are the picture's)."""
    from streamdiff.model.taehv import TAEHV, TGrow

    p = _require(path, "a TAEHV file (taew2_1.pth or .safetensors)")
    if p.is_dir():
        raise FileNotFoundError(f"{p} is a folder: weights for TAEHV are one .pth / .safetensors file")
    state = _strip_wrappers(_read_file(p))
    net = TAEHV.from_config(vae_cfg)
    targets = net.state_dict()
    for i, layer in enumerate(net.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in state and state.shape(key)[0] > targets[key].shape[0]:
            rows = targets[key].shape[0]
            state = StateDict({**state._entries, key: (_Tensors({key: state[key][-rows:]}), key)}, state.source)
    report = load_into(net, state, min_match=min_match, what="taehv")
    # Every tensor is a convolution the picture goes through: one the file lacks, left at its
    # init, passed the ratio (127 of 128) and garbled every frame.
    if report.n_missing:
        raise WeightsMismatchError(f"taehv: {p} lacks {report.n_missing} of the {report.expected} tensors "
                                   f"({', '.join(report.missing)}); is it a complete TAEHV file?", report)
    log.info("%s", report)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Seeded random init (format: random)
# ---------------------------------------------------------------------------------------------


def _param_seed(seed: int, name: str) -> int:
    # 32 bits: torch's CPU generator (mt19937) ignores the high half of a 64-bit seed.
    return zlib.crc32(f"{seed}/{name}".encode())


def _random_values(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "scale_shift_table":  # AdaLN tables: diffusers' randn / sqrt(dim)
        return noise / shape[-1] ** 0.5
    if leaf == "gamma" or (leaf == "weight" and len(shape) == 1):  # norm scales around 1
        return 1.0 + 0.02 * noise
    if leaf == "weight" and len(shape) >= 2:  # Linear / Conv: fan-in scaled
        fan_in = max(1, torch.Size(shape[1:]).numel())
        return noise / fan_in**0.5
    return 0.02 * noise  # biases and anything else: small, not zero


@torch.no_grad()
def random_init_(module: nn.Module, seed: int = 0, only: set[str] | None = None) -> nn.Module:
    """Deterministic init in place (of the parameters named in `only`, when given). Each
    parameter's values depend only on (seed, its name, its shape), drawn on CPU in fp32: a stage
    holding blocks 10..19 gets exactly the tensors the whole model would, on any device or dtype."""
    for name, param in module.named_parameters():
        if only is not None and name not in only:
            continue
        gen = torch.Generator().manual_seed(_param_seed(seed, name))
        param.copy_(_random_values(name, tuple(param.shape), gen))
    return module
