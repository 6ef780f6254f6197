"""Checks the command line runs before it builds anything: the weight paths a config names, the
output file's type, that result files and folders can be written, the device a config asks for,
and the address `serve` will listen on; and the argparse types of numbers and on/off values
(ranges, no NaN). One line each, so a typo in a path is reported before torch is even imported,
a port that is taken before the engine spends its warm-up, and a result path before the work.

Owns: those checks and their messages. Does not own: loading (model/loading.py re-checks paths
and formats as it reads) or the CLI's exit codes (cli.py turns these errors into exit 2).
No torch at import time; only `check_device` imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import re
import socket
import tempfile
from pathlib import Path

from streamdiff.config import Config, ConfigError, resolve_path

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")


def check_weight_paths(cfg: Config) -> None:
    """Every weights path the config names exists (random weights name none)."""
    w = cfg.weights
    named = []
    if w.format != "random":
        named.append(("weights.transformer", w.transformer))
    named += [("weights.vae", w.vae), ("weights.taehv", w.taehv), ("weights.text_encoder", w.text_encoder),
              ("weights.tokenizer", w.tokenizer)]
    for key, path in named:
        if path and not resolve_path(path).exists():
            raise FileNotFoundError(f"{key}={path} does not exist (config {cfg.name}; point it at local files "
                                    f"with --set {key}=PATH, or use --set weights.format=random to run without)")


def check_output_path(path: str) -> None:
    """`render --output`: a video file type we can write, at a place `check_writable` accepts."""
    out = Path(path)
    suffix = out.suffix.lower()
    if out.is_dir():  # (a CLI probe: a folder without a suffix was told its file type is unknown)
        raise ConfigError(f"--output {path} is a folder; name a video file in it, e.g. "
                          f"{out / ('render' + (suffix if suffix in VIDEO_SUFFIXES else '.mp4'))}")
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(f"--output {path}: unknown video file type {suffix or '(none)'!r}; use one of "
                          f"{', '.join(VIDEO_SUFFIXES)}")
    check_writable(path, "--output")


def check_writable(path: str, flag: str) -> None:
    """`flag`'s file can be written, checked before the work whose result it will hold: its
    folder is made if missing to try, and neither a file nor a folder that was not there before
    is left behind (the writer makes its folder when it writes; a probe found a failed render's
    `out/new/deep` left empty)."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; name a file")
    if (there := _nearest_existing(out.parent)) is not None and not there.is_dir():  # said "File exists"
        raise ConfigError(f"{flag} {path}: {there} is a file, so nothing can be written under it")
    existed = out.exists()
    with _tried_in(out.parent, flag, path):
        try:
            with open(out, "ab"):  # appends nothing: an existing file is left as it is
                pass
        finally:
            if not existed:
                out.unlink(missing_ok=True)


def check_folder(path: str, flag: str) -> None:
    """`flag` names a folder that exists or can be made (not a file) and written in. Nothing is
    left here: a run refused for another reason leaves no empty folder behind."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {path} is a file; name a folder")
    parent = _nearest_existing(folder)  # the nearest folder that is there holds what would be made
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so that folder cannot be made")
    # Tried, not judged from permission bits: as root os.access passed /proc/x, and train-demo
    # failed there after its whole training (a probe).
    with _tried_in(folder, flag, path):
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".streamdiff-write-check-"):
            pass


@contextlib.contextmanager
def _tried_in(folder: Path, flag: str, path: str):
    """Make `folder` and its missing parents for a write tried in it; an OSError (there or in
    the block) is `flag`'s one-line ConfigError; every folder made is removed again, deepest
    first (stopping at one that something else wrote into meanwhile)."""
    made = [p for p in (folder.absolute(), *folder.absolute().parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for made_folder in made:
            try:
                made_folder.rmdir()
            except OSError:
                break


def _nearest_existing(path: Path) -> Path | None:
    """`path` or its nearest ancestor that exists (a file or a folder); None if none does."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return None


def _on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def check_device(cfg: Config) -> None:
    """A config that asks for CUDA, or for what runs on CUDA only (CUDA graphs, the Triton
    attention), needs a CUDA device here (not when its stages run on a Ray cluster it joins: the
    cluster's GPUs are checked when the stages start)."""
    if cfg.parallel.backend == "ray" and cfg.parallel.ray_address:
        return
    gpu_only = cfg.runtime.cuda_graphs or cfg.model.attention_backend == "triton"
    if gpu_only and _on_cpu(cfg.runtime.device):  # (a probe: each was a traceback from the model build)
        if cfg.runtime.cuda_graphs:
            raise ConfigError("runtime.cuda_graphs replays CUDA graphs: it needs runtime.device=cuda (on a CPU "
                              "leave it out, or try runtime.compile=true)")
        if cfg.model.attention_backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("model.attention_backend=triton runs Triton kernels on a GPU: on a CPU use "
                              "model.attention_backend=torch (or auto)")
    if cfg.runtime.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        other = "" if cfg.name == "tiny" else ", or use --config tiny"
        raise ConfigError(f"config {cfg.name} asks for a GPU (runtime.device: cuda) and this machine has none "
                          f"that torch can use: add --set runtime.device=cpu (slow for real models){other}")


def check_listen(host: str, port: int) -> None:
    """`serve` can listen on host:port: bound once and let go, as aiohttp will bind it (address
    reuse on, so a socket still in TIME_WAIT from the last run does not count as taken)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        if "://" in host or host.endswith("/"):  # a URL pasted where an address goes (an install probe)
            bare = host.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
            raise ConfigError(f"--host {host}: give the address alone, without scheme, port or path "
                              f"(--host {bare or '127.0.0.1'} --port {port})") from None
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ConfigError(cannot_listen(host, port, exc)) from None


LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """One line for a failed bind: by `check_listen`, or by the server itself when another one
    took the port between that check and its bind (two started seconds apart: an install probe)."""
    if exc.errno == errno.EADDRINUSE:
        why = (f"port {port} is in use (another server, perhaps an earlier streamdiff serve or "
               "make run): stop it, or pick another port with --port N "
               "(make run RUN_ARGS=\"--config demo --port N\")")
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges; use --port 8000 or above)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this machine (127.0.0.1: this machine only; 0.0.0.0: all)"
    else:
        why = exc.strerror or str(exc)
    return f"cannot listen on {host}:{port}: {why}"


def loopback_only(host: str) -> bool:
    """Whether `--host` binds loopback addresses only (127.0.0.1, localhost, ::1): then only this
    machine's browsers reach the server, by an IP address or localhost, and `serve` refuses other
    Host names (DNS rebinding) unless `--allow-host` names them."""
    try:
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(address[4][0].split("%")[0]).is_loopback for address in addresses)


def allowed_hosts(bind: str, allow: list[str] | None) -> tuple[str, ...]:
    """The Host names `serve` answers to without a token, besides IP addresses and localhost:
    those given with --allow-host; else none when it binds loopback only (DNS rebinding), any
    (`*`) when it binds the network (the names other machines use for it are not known here)."""
    return tuple(allow) if allow else () if loopback_only(bind) else ("*",)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A Ray cluster's HOST:PORT (or ray://HOST:PORT) answers TCP: `serve` checks it before it
    announces the page and warms up, and the Ray executor before `ray.init`, which on an address
    where nothing listens retries for about ten minutes and ignores SIGTERM meanwhile."""
    where = address.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"parallel.ray_address {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"Ray cluster at {address}: nothing answers there ({exc.strerror or exc}); start its "
                          f"head with `ray start --head --port {port}`, or leave out --ray-address to run the "
                          f"stages in a local Ray") from None


def port_number(text: str) -> int:
    """argparse type for --port: an integer in 1-65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: use a number from 1 to 65535, e.g. --port 8080")
    return port


_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?", re.I)


def host_name_arg(text: str) -> str:
    """argparse type for --allow-host: a DNS name (no port, no scheme) or '*'."""
    if text != "*" and not _HOST_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a host name: give the name alone, e.g. "
                                         f"--allow-host video.example.org (no scheme, port or path), or '*'")
    return text


def number_in(kind: type, lo: float, hi: float, example: str):
    """argparse type for a number flag: `kind` (int or float) in [lo, hi], refused in one line
    that gives the range and an example, e.g. ``type=number_in(int, 1, 64, "4")``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or not lo <= value <= hi:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'} "
                                             f"from {_plain(lo)} to {_plain(hi)}, e.g. {example}")
        return value
    return parse


def on_off(text: str) -> bool:
    """argparse type for an on/off flag value: on/off, true/false, 1/0, yes/no (any case)."""
    word = text.strip().lower()
    if word in ("on", "true", "1", "yes"):
        return True
    if word in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not on or off (also true/false, 1/0, yes/no)")


def _plain(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)
