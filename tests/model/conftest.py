"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def dynamo():
    """A fresh torch._dynamo (no compiled code, counters at zero): its `counters`, so that a test
    counts only its own graphs and graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters
