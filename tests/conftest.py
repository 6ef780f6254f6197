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


@pytest.fixture
def cli_here(capsys, caplog):
    """`streamdiff ARGS` in this process, for what comes after the model is built (a child pays
    Python's and torch's start-up, 3-5 s a case): (exit code, stdout, stderr) as a user would see
    them, the WARNING and ERROR log records written into stderr the way `main`'s logging
    does in a shell (pytest's handlers hold the records here). The torch thread count a config
    applies is put back."""
    import logging

    from streamdiff.cli import main

    threads = torch.get_num_threads()

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            rc = main(list(args))
        out, err = capsys.readouterr()
        logged = "".join(f"{r.levelname} {r.name}: {r.getMessage()}\n" for r in caplog.records)
        return rc, out, logged + err

    yield call
    torch.set_num_threads(threads)
