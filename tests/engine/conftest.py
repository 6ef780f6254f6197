"""Fixtures of the engine tests: the tiny model at 64x48 on CPU, built once per session."""

from __future__ import annotations

import pytest

from engine_helpers import H, W
from streamdiff.config import load_config


@pytest.fixture(scope="session")
def cfg():
    return load_config("tiny", [f"video.width={W}", f"video.height={H}", "runtime.device=cpu"])


@pytest.fixture(scope="session")
def comps(cfg):
    from streamdiff.model.build import build_components

    return build_components(cfg)
