"""Packaging a newcomer meets (issue 16, items 11-12): building the package prints no setuptools
deprecation banners, and the Dockerfile is one a stock Docker host builds and runs (read here:
no Docker on the test machines)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_building_the_wheel_prints_no_setuptools_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("streamdiff", "kernels", "server", "client", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    out.mkdir()
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=src, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="default"))
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    for banner in ("SetuptoolsDeprecationWarning", "is absent from the `packages`", "_Warning"):
        assert banner not in log, log[-3000:]
    wheel = next(out.glob("*.whl"))
    listing = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout
    assert "streamdiff/client/web/viewer.html" in listing and "streamdiff/client/web/app.js" in listing
    assert ".dist-info/licenses/LICENSE" in listing  # the licence pyproject names (an install probe: no file)
    # An install probe: a plain `pip install .` found no preset ("unknown preset 'demo' (known: )"),
    # the demo's weights were not in the wheel. The wheel unpacked as pip installs it, imported
    # from another folder: the demo preset loads with its weights from inside the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json; from streamdiff.config import CONFIG_DIR, load_config, resolve_path; "
             "cfg = load_config('demo'); print(json.dumps([str(CONFIG_DIR), str(resolve_path(cfg.weights.transformer)), "
             "str(resolve_path(cfg.weights.vae)), [p for p in ('tiny', 'wan-1.3b') if load_config(p)]]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAMDIFF_CONFIG_DIR")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=str(site)))
    assert done.returncode == 0, done.stderr[-2000:]
    config_dir, transformer, vae, others = json.loads(done.stdout)
    assert Path(config_dir) == site / "streamdiff" / "configs" and others == ["tiny", "wan-1.3b"]
    for weights in (transformer, vae):
        assert Path(weights).is_file() and Path(weights).is_relative_to(site), weights


def test_dockerfile_builds_without_nvcc_and_serves():
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", make).group(1)
    assert f"TORCH_VERSION={torch_pin}" in docker  # the torch the Makefile pins
    base = re.search(r"^FROM (\S+)", docker, re.M).group(1)
    installs = " ".join(re.findall(r"pip install [^\n]*", docker))
    if "runtime" in base:  # no nvcc there: nothing may be built from CUDA sources
        assert "flash-attn" not in installs and "[gpu]" not in installs
    assert re.search(r"^EXPOSE 8000$", docker, re.M)
    assert re.search(r'^CMD \["serve"', docker, re.M)
    health = re.search(r"^HEALTHCHECK.*\n.*", docker, re.M).group(0)
    assert "/healthz" in health and ":8000" in health


def test_readme_says_how_to_change_the_port_and_how_long_the_first_run_takes():
    readme = (ROOT / "README.md").read_text()
    assert "RUN_ARGS" in readme and "--port" in readme
    assert re.search(r"first `make run`[^\n]*(minute|seconds)", readme)


IMPORT_KERNELS = "import kernels; print(getattr(kernels, 'MARK', kernels.__name__ + ' ' + str(kernels.__file__)))"


def _python(code: str, *flags: str, pythonpath: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -c code`, by default in the repository root: the root is first on sys.path, where
    the kernels/ folder lies under the name of Hugging Face's `kernels` (which transformers imports)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("from kernels.sub import MARK\n")
    (other / "sub.py").write_text("MARK = 'the installed kernels'\n")
    done = _python(IMPORT_KERNELS, pythonpath=str(other.parent))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the installed kernels"


def test_the_kernels_folder_is_no_top_level_package_where_none_is_installed():
    done = _python(IMPORT_KERNELS, "-S")  # no site-packages: no installed `kernels`
    assert done.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in done.stderr


def test_after_import_streamdiff_a_probe_for_kernels_sees_no_folder(tmp_path):
    """transformers 5.x (before `kernels` became its dependency) asks find_spec("kernels") and
    imports what it finds; in the checkout with no `kernels` installed that was our folder, and
    every diffusers model failed to import. After `import streamdiff` the probe answers as it
    would anywhere else: nothing (-S: no site-packages), or the installed package."""
    probe = ("import streamdiff, importlib.util; spec = importlib.util.find_spec('kernels'); "
             "print(spec.origin if spec else None); importlib.invalidate_caches(); "
             "print(importlib.util.find_spec('kernels') is spec or importlib.util.find_spec('kernels'))")
    bare = _python(probe, "-S")
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert bare.stdout.split() == ["None", "True"]  # still hidden after the caches are dropped
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 1\n")
    installed = _python(probe, "-S", pythonpath=str(other.parent))
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert Path(installed.stdout.split()[0]) == other / "__init__.py"


def test_an_installed_streamdiff_leaves_the_kernels_package_beside_it_alone(tmp_path):
    """Installed from a wheel, streamdiff/ and Hugging Face's kernels/ are neighbours in
    site-packages: only the checkout's own folder is hidden, never that package."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "streamdiff", site / "streamdiff", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("MARK = 'the installed kernels'\n")
    done = _python("import streamdiff, kernels; print(kernels.MARK)", "-S", pythonpath=str(site), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the installed kernels"


def test_the_mapped_kernels_package_still_imports_from_the_checkout():
    code = ("import kernels, streamdiff.kernels as k; "
            "print(k.__name__, kernels is not k, hasattr(k, 'triton_available'), k.__file__)")
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    name, distinct, ours, path = done.stdout.split()
    assert (name, distinct, ours) == ("streamdiff.kernels", "True", "True")  # our package, not the handed-over one
    assert Path(path).resolve() == ROOT / "kernels" / "__init__.py"


def _make(folder: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"PATH": path} if path else {}))
    return subprocess.run(["make", "-C", str(folder), *args], capture_output=True, text=True, timeout=60, env=env)


def test_make_sets_up_a_venv_again_when_its_python_is_gone_and_names_a_python_too_old(tmp_path):
    """An install probe: with .venv's python removed, `make run` failed on "exec: .venv/bin/python:
    not found" every time until `make clean`; with python3 3.9 it failed in pip's conflict message."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)  # a working venv python (this one has pip)
    (tmp_path / ".venv" / ".installed").touch()
    os.utime(tmp_path / "pyproject.toml", (1, 1))  # older than the stamp: set up already
    assert "Nothing to be done" in _make(tmp_path, "-n", "setup").stdout
    (bin_dir / "python").unlink()
    (bin_dir / "python").symlink_to(tmp_path / "gone")  # its python removed
    plan = _make(tmp_path, "-n", "setup").stdout
    assert 'rm -rf ".venv" && python3 -m venv ".venv"' in plan and "pip install" in plan, plan
    # a broken environment of one's own, given as VENV=, is said, never removed
    own = tmp_path / "mine"
    (own / "bin").mkdir(parents=True)
    done = _make(tmp_path, "setup", "VENV=mine")
    assert done.returncode != 0 and "mine has no working python 3.10+ with pip" in done.stderr, done.stderr
    assert own.is_dir()
    # a python3 older than the project's floor: said first, nothing made
    fake = tmp_path / "old"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.9.2' && exit 0\nexit 1\n")
    (fake / "python3").chmod(0o755)
    done = _make(tmp_path, "setup", path=f"{fake}:{os.environ['PATH']}")
    assert done.returncode != 0 and "StreamDiff needs Python 3.10 or newer; python3 here is Python 3.9.2" in done.stderr
    assert not (tmp_path / ".venv" / ".installed").exists() and (bin_dir / "python").is_symlink()
