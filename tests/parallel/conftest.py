"""Fixtures of the pipeline-stage tests: the tiny model with 4 blocks at 64x48 on CPU, and the
engine test helpers (fake clock, feeder)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))

from streamdiff.config import load_config  # noqa: E402


@pytest.fixture(scope="session")
def cfg4():
    """Four blocks so that 2 and 3 stages both split the model; rebalancing off unless asked;
    lane stride 1 so outputs line up round for round with the local executor (the stride-D
    runs, which emit later, are in test_plans_in_flight.py)."""
    return load_config("tiny", ["video.width=64", "video.height=48", "runtime.device=cpu", "model.num_layers=4",
                                "parallel.rebalance=false", "parallel.lane_stride=1"])


@pytest.fixture(scope="session")
def comps4(cfg4):
    from streamdiff.model.build import build_components

    return build_components(cfg4)


@pytest.fixture(scope="session")
def cfg_auto(cfg4):
    """cfg4 with the automatic lane stride (D = stages): plans overlap."""
    from streamdiff.config import with_overrides

    return with_overrides(cfg4, parallel={"lane_stride": 0})
