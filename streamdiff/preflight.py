"""Checks the command line runs before it builds anything: the weight paths a config names, the
output file's type, and the device a config asks for. One line each, in that order, so a typo
in a path is reported before torch is even imported and before any device is probed.

Owns: those checks and their messages. Does not own: loading (model/loading.py re-checks paths
and formats as it reads) or the CLI's exit codes (cli.py turns these errors into exit 2).
No torch at import time; only `check_device` imports it.
"""

from __future__ import annotations

from pathlib import Path

from streamdiff.config import Config, ConfigError, resolve_path

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")


def check_weight_paths(cfg: Config) -> None:
    """Every weights path the config names exists (random weights name none)."""
    w = cfg.weights
    named = []
    if w.format != "random":
        named.append(("weights.transformer", w.transformer))
    named += [("weights.vae", w.vae), ("weights.text_encoder", w.text_encoder), ("weights.tokenizer", w.tokenizer)]
    for key, path in named:
        if path and not resolve_path(path).exists():
            raise FileNotFoundError(f"{key}={path} does not exist (config {cfg.name}; point it at local files "
                                    f"with --set {key}=PATH, or use --set weights.format=random to run without)")


def check_output_path(path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(f"--output {path}: unknown video file type {suffix or '(none)'!r}; use one of "
                          f"{', '.join(VIDEO_SUFFIXES)}")


def check_device(cfg: Config) -> None:
    """A config that asks for CUDA needs a CUDA device here."""
    if cfg.runtime.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"config {cfg.name} asks for a GPU (runtime.device: cuda) and this machine has none "
                          f"that torch can use: add --set runtime.device=cpu (slow for real models), or use "
                          f"--config tiny")
