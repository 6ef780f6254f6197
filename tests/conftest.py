"""Shared fixtures: tiny configs and models built in-process (no downloads, CPU, fp32)."""

from __future__ import annotations

import os

import torch

# Triton fixes its interpreter mode when first imported (diffusers imports it through
# torch._dynamo during collection), so on machines without CUDA set it before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from streamdiff.config import load_config


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    """The tiny preset at a small frame size so tests stay fast."""
    return load_config("tiny", ["video.width=64", "video.height=48", "runtime.device=cpu"])
