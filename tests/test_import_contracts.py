"""The dependency rules of docs/architecture.md, checked mechanically:
- import-linter's contracts in pyproject.toml over the `streamdiff/` package folder (direct and
  indirect imports): the scheduler and config never import torch; only parallel/ (and the Ray
  hop bench) import ray; nothing below the engine imports the engine, parallel or the
  benchmarks; the engine never imports parallel (the executor is chosen where it is composed);
  parallel and the demo never import the benchmarks;
- by reading the import statements of the folders mapped into the namespace, which
  import-linter does not scan: kernels/ imports triton only inside functions and nothing above
  the model; the core packages never import the web stack; server/ never imports the benchmarks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ("aiortc", "aiohttp", "av", "websockets", "streamdiff.server", "streamdiff.client")
CORE = ["model", "cache", "sampling", "pipeline", "scheduler", "engine", "parallel"]


def _outside_functions(tree: ast.AST):
    """The nodes that run when the module is imported: all but function bodies (a guarded
    `try: import triton` or `if ...: import triton` at the top is an import at import time too)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node)
                     if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = _outside_functions(tree) if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def hits(names: set[str], banned: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == b or n.startswith(b + ".") for b in banned)}


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "5 kept, 0 broken" in result.stdout


def test_kernels_import_triton_lazily_and_nothing_above_the_model():
    paths = sorted((ROOT / "kernels").glob("*.py"))
    assert len(paths) >= 3, paths  # (an empty glob checked nothing)
    for path in paths:
        assert not hits(imports(path, top_level_only=True), ("triton",)), path.name
        assert not hits(imports(path), ("streamdiff.engine", "streamdiff.parallel", "streamdiff.pipeline",
                                        "streamdiff.bench", *WEB)), path.name


def test_core_packages_never_import_the_web_stack():
    files = [p for pkg in CORE for p in (ROOT / "streamdiff" / pkg).rglob("*.py")]
    files.append(ROOT / "streamdiff" / "config.py")
    assert len(files) > 30
    offenders = {str(p.relative_to(ROOT)): sorted(hits(imports(p), WEB)) for p in files if hits(imports(p), WEB)}
    assert not offenders


def test_the_server_never_imports_the_benchmarks():
    """bench is the top layer beside cli.py: the server is composed without it (client/bench.py, the
    end-to-end load generator, is its one user outside the package)."""
    files = sorted((ROOT / "server").glob("*.py"))
    assert len(files) > 5
    assert not {p.name: sorted(hits(imports(p), ("streamdiff.bench",))) for p in files if hits(imports(p), ("streamdiff.bench",))}


def test_ray_loads_after_the_environment_ray_executor_sets():
    """`parallel/ray_executor.py` sets Ray's environment (among it: no native stack dump when the
    process is stopped with SIGTERM) before it imports ray; a module that imports ray at its top
    imports ray_executor first (a probe: `bench --simulate` stopped with SIGTERM printed Ray's
    six-line crash dump and exited 134, its hop bench having loaded ray first)."""
    for folder in ("streamdiff", "server", "client"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "ray_executor.py":
                continue
            order = []
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    order += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    order.append(node.module)
            ray_at = next((k for k, name in enumerate(order) if name == "ray" or name.startswith("ray.")), None)
            if ray_at is not None:
                assert "streamdiff.parallel.ray_executor" in order[:ray_at], path
