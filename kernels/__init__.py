"""Triton kernels over the rolling KV cache, each beside its plain-torch oracle (`<op>_ref`).

Owns: the import-light entry points shared by the op files (`triton_available`,
`index_checks_enabled`). Does not own: the ops (one file each: sink_window_attention.py,
cache_write.py) or the choice of backend (streamdiff.model.attention).

Importing this package, or an op file, never imports triton: CPU machines without it use the
`_ref` ops. An op file imports triton and applies @triton.jit to its kernel on the first launch
(or first access of `_<op>_kernel`), so TRITON_INTERPRET is read then, not when the model
imports the `_ref` ops.
"""

from __future__ import annotations

import importlib.util
import os

CHECKS_ENV = "STREAMDIFF_KERNEL_CHECKS"


def triton_available() -> bool:
    """Triton is importable and can run: on CUDA, or in the interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def load_triton():
    """Import triton -> (triton, triton.language); a clear RuntimeError where it is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        raise RuntimeError("the Triton kernels need triton (pip install triton); the `_ref` ops run without it") from exc
    return triton, tl


def index_checks_enabled(device_type: str) -> bool:
    """Whether launchers validate slot / position *values* (not only shapes) before a launch.

    Value checks read device tensors back to the host: free on CPU, a synchronisation (and a
    CUDA-graph capture breaker) on GPU. So they are always on for CPU tensors and opt-in on GPU
    with STREAMDIFF_KERNEL_CHECKS=1; STREAMDIFF_KERNEL_CHECKS=0 turns them off everywhere.
    The kernels clamp slot indices either way, so a bad index never reads or writes outside
    the pool."""
    flag = os.environ.get(CHECKS_ENV)
    if flag is not None:
        return flag == "1"
    return device_type == "cpu"


def _hand_over_the_name() -> None:
    """Put Hugging Face's `kernels` in sys.modules in place of this folder.

    This folder is `streamdiff.kernels`. It is imported as a top-level `kernels` only when the
    repository root is on sys.path, as `python -m ...` and `python -c` put it when run in the
    checkout. That name belongs to Hugging Face's `kernels`, which transformers (≥ 5) depends on
    and imports, so from the checkout `import kernels` must give what it gives anywhere else:
    that package when installed, ModuleNotFoundError when not. The import system returns what
    sys.modules holds once this file has run, so replacing the entry is enough."""
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    spec = PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    module = module_from_spec(spec)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[__name__]
        raise


if __name__ == "kernels":
    _hand_over_the_name()
