"""Triton kernels over the rolling KV cache, each beside its plain-torch oracle (`<op>_ref`).

Importing this package never imports triton: CPU machines without it use the `_ref` ops.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """Triton is importable and can run: on CUDA, or in the interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()
