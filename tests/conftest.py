"""Shared fixtures: tiny configs and models built in-process (no downloads, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from streamdiff.config import load_config


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    """The tiny preset at a small frame size so tests stay fast."""
    return load_config("tiny", ["video.width=64", "video.height=48", "runtime.device=cpu"])
