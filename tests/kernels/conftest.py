"""Kernel tests: the Triton interpreter on CPU, compiled kernels on a GPU.

Without CUDA the kernels run in the interpreter on CPU tensors (fp32, tiny shapes). With CUDA
(and TRITON_INTERPRET not set by the caller) the same tests run the compiled kernels on the
GPU, and the `gpu`-marked tests add bf16 / fp16 at model shapes.

TRITON_INTERPRET must be set before triton is imported: triton jits its own library (tl.sum,
tl.zeros, ...) on import, and the interpreter cannot run those if they were jitted for the
compiler. It is set here, first thing; our op files import triton only at the first launch.
But torch._dynamo (which diffusers imports) imports triton as well, so when other test folders
are collected first (`pytest tests`) it must be set earlier: in tests/conftest.py or the
environment. The `device` fixture fails with that advice when it was set too late.
"""

import os
import sys

import torch  # does not import triton

_SET_TOO_LATE = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def device() -> str:
    """Where the kernels run in this session: 'cpu' (interpreter) or 'cuda' (compiled)."""
    if INTERPRET and _SET_TOO_LATE:
        pytest.fail("triton was imported (e.g. by torch._dynamo via diffusers, while another test folder was "
                    "collected) before tests/kernels/conftest.py set TRITON_INTERPRET=1, so the interpreter "
                    "cannot run triton's own library functions: set TRITON_INTERPRET=1 in the environment "
                    "or at the top of tests/conftest.py when CUDA is absent")
    return DEVICE


@pytest.fixture
def compiled_gpu() -> None:
    """Skip unless compiled kernels can run on a GPU (the `gpu`-marked tests)."""
    if INTERPRET or not torch.cuda.is_available():
        pytest.skip("needs CUDA and compiled kernels (TRITON_INTERPRET unset)")


@pytest.fixture(scope="session")
def aot_reports() -> list[dict]:
    """`python -m streamdiff.kernels.aot --capability N --json -`: every kernel compiled for
    sm_90 and sm_80 at model shapes, with its resources and SASS counts; a skip where Triton's
    NVIDIA backend or its bundled ptxas / cuobjdump is missing. One subprocess per capability,
    side by side (the compiles are CPU-bound and independent), without TRITON_INTERPRET: the
    interpreter patches triton.language in this one."""
    from streamdiff.kernels import aot

    if not aot.available():
        pytest.skip("Triton's NVIDIA backend / ptxas / cuobjdump is not available: cannot compile without a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-m", "streamdiff.kernels.aot", "--capability",
                               str(capability), "--json", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for capability in (90, 80)]
    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"streamdiff.kernels.aot failed:\n{err[-4000:]}")
            reports += json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports
