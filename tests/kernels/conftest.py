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
def aot():
    """`aot_compile_many`, or a skip where Triton's NVIDIA backend or its bundled ptxas is missing."""
    if not aot_available():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available: cannot compile without a GPU")
    return aot_compile_many


_AOT_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.stdin.read())
fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
results = []
for case in spec["cases"]:
    signature = {}
    for name in fn.arg_names:
        if name in case["constexprs"]:
            signature[name] = "constexpr"
        elif name in case["pointers"]:
            signature[name] = case["pointers"][name]
        else:
            signature[name] = "fp32" if name in case["floats"] else "i32"
    try:
        source = ASTSource(fn, signature, case["constexprs"])
        target = GPUTarget("cuda", case["capability"], 32)
        compiled = triton.compile(source, target=target, options=case["options"])
        results.append({"shared": compiled.metadata.shared})
    except Exception as exc:  # reported per case by the test
        results.append({"error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(results))
"""


def aot_compile_many(module: str, kernel: str, cases: list[dict]) -> list[dict]:
    """Compile `module.kernel` for NVIDIA targets without a GPU (Triton's bundled ptxas).

    Each case: pointers {arg: '*bf16'}, floats [arg], constexprs {arg: value} (integer args
    equal to 1, i.e. unit strides, are listed there as the launcher's specialisation would make
    them), capability (80, 90), options (num_warps, num_stages); other args are i32. Runs in a
    subprocess without TRITON_INTERPRET: the interpreter patches triton.language in this one.
    Returns per case {"shared": bytes of shared memory} or {"error": message}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"module": module, "kernel": kernel, "cases": cases})
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], input=spec, capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def aot_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return False
    if os.environ.get("TRITON_PTXAS_PATH"):
        return True
    nvidia_dir = os.path.dirname(importlib.util.find_spec("triton.backends.nvidia").origin)
    return os.path.exists(os.path.join(nvidia_dir, "bin", "ptxas"))
