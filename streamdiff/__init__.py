"""StreamDiff: a real-time streaming video-diffusion server (module map: the README's Layout; how it works: docs/architecture.md).

Importing the package hides the checkout's `kernels/` folder (our `streamdiff.kernels`) from
top-level imports, so that `kernels` means Hugging Face's package, installed or not, as it does
anywhere else (kernels/__init__.py says why the name matters).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _hide_the_kernels_folder() -> None:
    """Where the repository root is on sys.path (`python -m` / `-c` / pytest in the checkout),
    give it a path-entry finder that does not see the top-level name `kernels`.

    transformers probes `importlib.util.find_spec("kernels")` and, finding our folder with no
    installed distribution behind it, imports it and fails (transformers 5.x before `kernels`
    became its dependency, e.g. 5.17). kernels/__init__.py's hand-over covers an import made
    before this package's; this covers the probe, which no import-time code can answer. A path
    hook rather than a cache entry, because importlib.invalidate_caches() drops the cache entry
    of a relative sys.path item ('' under `python -c`)."""
    root = Path(__file__).resolve().parent.parent
    if not ((root / "pyproject.toml").is_file() and (root / "kernels" / "sink_window_attention.py").is_file()):
        return  # installed (a wheel): the `kernels` beside us, if any, is Hugging Face's own

    class _WithoutKernels:
        def __init__(self, finder):
            self._finder = finder

        def find_spec(self, fullname, target=None):
            return None if fullname == "kernels" else self._finder.find_spec(fullname, target)

        def __getattr__(self, name):  # invalidate_caches, path, ...
            return getattr(self._finder, name)

    def hook(entry: str):
        if Path(entry or ".").resolve() != root:
            raise ImportError("not the checkout's root")  # the next hook takes this entry
        for other in sys.path_hooks:
            if other is not hook:
                try:
                    return _WithoutKernels(other(entry))
                except ImportError:
                    continue
        raise ImportError("no path hook takes the checkout's root")

    if any(getattr(h, "__name__", "") == "_streamdiff_hides_kernels" for h in sys.path_hooks):
        return
    hook.__name__ = "_streamdiff_hides_kernels"
    sys.path_hooks.insert(0, hook)
    for entry in list(sys.path_importer_cache):
        if Path(entry or ".").resolve() == root:
            del sys.path_importer_cache[entry]  # made again through the hook on the next lookup


_hide_the_kernels_folder()
