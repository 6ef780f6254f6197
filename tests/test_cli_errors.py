"""CLI errors a user meets first (issue 16, item 10): one line, exit 2, paths checked before the
device, and errors that need no model reported before torch is imported."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from streamdiff.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}))
"""


def run(*args: str, hide_gpus: bool = False) -> tuple[dict, str]:
    """`streamdiff ARGS` in a child; `hide_gpus`: as on a machine without CUDA devices."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **({"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else {}))
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip()


@pytest.mark.parametrize("args, words", [
    (["render", "--input", "synthetic", "--prompt", "p", "--output", "out.xyz"], ["unknown video file type", ".mp4"]),
    (["render", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", "--set", "weights.format=sdv2",
      "--set", "weights.transformer=/nowhere/model.pt"], ["weights.transformer=/nowhere/model.pt does not exist"]),
    # a GPU preset whose files are missing: the paths are reported, not the missing GPU
    (["serve", "--config", "wan-1.3b"], ["does not exist", "weights.transformer"]),
    # a probe: a missing TAEHV file was found after the DiT and the Wan VAE were built
    (["render", "--config", "tiny", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", "--set",
      "vae.decoder=taehv", "--set", "weights.taehv=/nowhere/taew2_1.pth"],
     ["weights.taehv=/nowhere/taew2_1.pth does not exist"]),
    # a probe: mistyped bench lists failed after torch's 1.5-4.7 s import
    (["bench", "--config", "tiny", "--resolution", "10x"], ["--resolution '10x' must look like 512x512"]),
    (["bench", "--config", "tiny", "--streams", "0"], ["--streams '0'"]),
    (["bench", "--config", "tiny", "--steps", "9"], ["--steps"]),
    (["bench", "--config", "tiny", "--streams", ""], ["--streams '' must be a comma-separated list"]),  # was 1
    # a probe: the pool of 4 streams turned the second of --max-sessions 8 away
    (["serve", "--config", "tiny", "--max-sessions", "8"], ["--max-sessions 8: the KV cache holds cache.max_streams=4",
                                                            "--set cache.max_streams=8"]),
    # a probe: both were tracebacks from the model build
    (["render", "--config", "tiny", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", "--set",
      "runtime.device=cpu", "--set", "runtime.cuda_graphs=true"], ["runtime.cuda_graphs", "needs runtime.device=cuda"]),
    # a probe: a wrong Ray address was found after "the page opens now" and the warm-up began
    (["serve", "--config", "tiny", "--ray-address", "127.0.0.1:1"], ["Ray cluster at 127.0.0.1:1: nothing answers"]),
])
def test_errors_that_need_no_model_come_before_torch(args, words):
    out, err = run(*args)
    assert out == {"rc": 2, "torch": False}, err
    assert len(err.splitlines()) == 1 and err.startswith("streamdiff: error:"), err
    for word in words:
        assert word in err


def test_an_output_that_cannot_be_written_is_refused_before_the_model(tmp_path):
    """Found by trying: an unwritable --output used to fail after the model was built, in a bare
    OS error that did not name the path; a folder named like a video failed the same way."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out, err = run("render", "--input", "synthetic", "--prompt", "p", "--output", str(blocker / "o.mp4"))
    assert out == {"rc": 2, "torch": False}, err
    assert len(err.splitlines()) == 1 and f"--output {blocker / 'o.mp4'}: {blocker} is a file" in err, err
    folder = tmp_path / "clips.mp4"
    folder.mkdir()
    out, err = run("render", "--input", "synthetic", "--prompt", "p", "--output", str(folder))
    assert out == {"rc": 2, "torch": False} and "is a folder" in err, err
    # a CLI probe: a folder without a suffix was told "unknown video file type '(none)'"
    from streamdiff.config import ConfigError
    from streamdiff.preflight import check_output_path

    with pytest.raises(ConfigError, match=f"is a folder; name a video file in it, e.g. {tmp_path / 'render.mp4'}"):
        check_output_path(str(tmp_path))


def test_a_flag_a_command_does_not_take_points_at_that_commands_help(capsys):
    """A CLI probe: `render ... --bogus` said "(see: streamdiff --help)", which lists no render flag."""
    from streamdiff.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["render", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", "--bogus"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == "streamdiff: error: unrecognized arguments: --bogus (see: streamdiff render --help)"


def test_the_output_check_leaves_no_file_behind_and_keeps_an_existing_one(tmp_path):
    """Nor a folder it made (a probe: a failed render to out/new/deep/x.mp4 left out/new/deep)."""
    from streamdiff.preflight import check_output_path

    fresh = tmp_path / "new" / "deep" / "o.mp4"
    check_output_path(str(fresh))
    assert not fresh.exists() and not (tmp_path / "new").exists()
    (tmp_path / "have").mkdir()
    check_output_path(str(tmp_path / "have" / "sub" / "o.mp4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["have"] and not any((tmp_path / "have").iterdir())
    kept = tmp_path / "old.mp4"
    kept.write_bytes(b"earlier render")
    check_output_path(str(kept))
    assert kept.read_bytes() == b"earlier render"
    check_output_path(str(tmp_path / "CLIP.MP4"))  # a suffix in capitals names the same file type


def test_a_gpu_config_without_a_gpu_is_one_line():
    out, err = run("serve", "--config", "tiny", "--set", "runtime.device=cuda", hide_gpus=True)
    assert out["rc"] == 2 and len(err.splitlines()) == 1 and "runtime.device=cpu" in err, err


def test_bench_with_a_gpu_config_without_a_gpu_is_one_line_before_torch():
    """Found by following docs/benchmarks.md on a CPU: `bench --config wan-1.3b ...` (model mode,
    --simulate) ended in a 19-line traceback after torch loaded; serve and render said it in one."""
    for args in (["--config", "wan-1.3b", "--random-weights", "--duration", "1"],
                 ["--simulate", "--config", "wan-1.3b", "--random-weights", "--stages", "1,2"]):
        out, err = run("bench", *args, hide_gpus=True)
        assert out["rc"] == 2 and len(err.splitlines()) == 1 and "runtime.device=cpu" in err, (args, err)
    out, err = run("bench", "--config", "tiny", "--set", "runtime.device=cuda", "--duration", "1", hide_gpus=True)
    assert "--config tiny" not in err, err  # not the config already in use


def test_a_ray_address_where_nothing_answers_is_one_line_not_ten_minutes():
    """Found by following docs/scaling.md: `serve --ray-address HOST:PORT` with no head there sat in
    ray.init for ten minutes, ignoring SIGTERM; 'auto' with no cluster was a 62-line traceback."""
    import socket

    from streamdiff.config import ConfigError
    from streamdiff.preflight import check_reachable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConfigError, match=f"Ray cluster at 127.0.0.1:{port}: nothing answers there"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    with pytest.raises(ConfigError, match="expected 'auto', HOST:PORT"):
        check_reachable("my-cluster")
    for address in ("10.0.0.7:port", "[::1]"):  # one line, not a ValueError's traceback
        with pytest.raises(ConfigError, match="expected 'auto', HOST:PORT"):
            check_reachable(address)
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        check_reachable(f"ray://127.0.0.1:{head.getsockname()[1]}")  # answers: no error


JOIN_NOT_A_HEAD = """
import socket, sys, threading, time
from streamdiff.parallel.ray_executor import ClusterError, connect
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
def accept():  # answers TCP, speaks no Ray (a dashboard port, another service)
    while True:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.close()
threading.Thread(target=accept, daemon=True).start()
t0 = time.monotonic()
try:
    connect(f"127.0.0.1:{server.getsockname()[1]}", 2)
except ClusterError as exc:
    print(round(time.monotonic() - t0), exc)
"""


def test_joining_a_port_that_answers_but_is_no_ray_head_ends_in_seconds_and_says_what_may_help():
    """A stage probe: an address where something answers TCP but no Ray head (the reachability
    check passes) retried for 14 minutes, deaf to SIGTERM; and joining a `ray start --head`
    cluster by HOST:PORT failed as "Failed to connect" while the cause, Ray >= 2.59's token
    authentication, was only in a hidden warning."""
    # One connect attempt of 1 s instead of the 10 s serve sets (the one-line refusal is the point), and
    # Ray's GCS client waits 1 s, not its default 5 s, for its RPC channel and again for its pubsub
    # channel before that attempt (gcs_rpc_server_connect_timeout_s: 10 of the 14 s the join took).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_py_gcs_connect_timeout_s": "1",
           "RAY_gcs_rpc_server_connect_timeout_s": "1"}
    # the timeout is the bound (it was 14 minutes), not a timing
    done = subprocess.run([sys.executable, "-c", JOIN_NOT_A_HEAD], capture_output=True, text=True, timeout=300,
                          env=env)
    _, _, said = done.stdout.strip().partition(" ")
    assert said.startswith("--ray-address 127.0.0.1:") and "Failed to connect" in said, done.stdout + done.stderr
    assert "RAY_AUTH_MODE=token" in said and len(said.splitlines()) == 1, said


def test_a_port_in_use_is_one_line_before_the_engine_warms_up():
    """A second `make run` used to warm the engine up, then die in a traceback from the bind."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out, err = run("serve", "--config", "tiny", "--port", str(port))
    assert out == {"rc": 2, "torch": False}, err
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err, err


def test_a_port_a_socket_no_longer_holds_is_free_again():
    """Address reuse, as aiohttp binds: the check refuses only a port something listens on."""
    import socket

    from streamdiff.preflight import check_listen

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    check_listen("127.0.0.1", port)  # raises if it were judged taken
    # the last run's connections keep its port in TIME_WAIT for a minute: not taken either
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server's side closes first: its end waits in TIME_WAIT
    check_listen("127.0.0.1", port)


@pytest.mark.parametrize("port", ["0", "65536", "eighty"])
def test_a_port_out_of_range_is_refused_by_the_parser(port):
    done = subprocess.run([sys.executable, "-m", "streamdiff.cli", "serve", "--port", port],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a TCP port" in done.stderr and "1 to 65535" in done.stderr, done.stderr


@pytest.mark.parametrize("args, words", [
    (["serve", "--max-sessions", "0"], ["--max-sessions", "'0' is not a whole number from 1 to 1024"]),
    (["serve", "--target-fps", "-1"], ["--target-fps", "from 0.1 to 240"]),
    (["serve", "--target-fps", "nan"], ["--target-fps", "'nan' is not a number"]),
    (["serve", "--deadline-ms", "0"], ["--deadline-ms", "from 1 to 3600000"]),
    (["serve", "--bitrate-kbps", "0"], ["--bitrate-kbps", "from 50 to 100000"]),
    (["render", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", "--frames", "-3"], ["--frames"]),
    (["bench", "--url", "http://127.0.0.1:9", "--sessions", "0"], ["--sessions"]),
    (["bench", "--url", "http://127.0.0.1:9", "--fps", "0"], ["--fps"]),
    (["serve", "--allow-host", "https://video.example.org:8443"], ["--allow-host", "not a host name", "no scheme, port"]),
])
def test_numbers_out_of_range_are_refused_by_the_parser(args, words, capsys):
    """Found by trying: these were taken as given: a server that admits no session (--max-sessions 0),
    a service level of -1 fps, a render of -3 frames ending in a traceback."""
    from streamdiff.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2, err
    for word in words:
        assert word in err, err


def test_allow_host_takes_names_and_any():
    """`--allow-host '*'` answers to any Host name, as the message for a wrong name offers."""
    from streamdiff.cli import build_parser

    args = build_parser().parse_args(["serve", "--allow-host", "*", "--allow-host", "video.example.org"])
    assert args.allow_host == ["*", "video.example.org"]


@pytest.mark.parametrize("size", ["0x16", "16x-16"])
def test_a_frame_size_must_be_positive(size):
    out, err = run("render", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", f"--size={size}")
    assert out == {"rc": 2, "torch": False} and "width and height must be positive" in err, err


@pytest.mark.parametrize("key, damage, words", [
    ("transformer", "cut", "is not a readable safetensors file"),
    ("vae", "empty", "is not a readable safetensors file"),
    ("text_encoder", "cut", "is not a readable safetensors file"),
    ("vae", "swap", "taehv: 0/"),  # the DiT's file given as the VAE: its keys do not match
])
def test_a_broken_weights_file_is_one_line_naming_it(tmp_path, key, damage, words, cli_here):
    """Found by trying: the demo with a truncated or swapped weights file ended in a traceback."""
    from streamdiff.config import load_config, resolve_path

    weights = load_config("demo").weights
    source = resolve_path(getattr(weights, key))
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "cut":
        bad.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes(resolve_path(weights.transformer).read_bytes())
    rc, _, err = cli_here("render", "--input", "synthetic", "--frames", "5", "--prompt", "a photo", "--output",
                   str(tmp_path / "o.mp4"), "--set", f"weights.{key}={bad}")
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("streamdiff: error:"), err
    assert words in err and (damage == "swap" or str(bad) in err), err
    assert "other stages" not in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("setting, words", [
    ("text.max_length=5", "text.max_length=5, but the prompt table"),  # was a ValueError traceback
    ("weights.text_encoder=", "text.kind=styles needs weights.text_encoder"),  # was random styles, silently
    ("model.num_layers=3", "has 4 blocks but the model has 3"),  # was loaded at "100 %", one block unused
])
def test_settings_the_demo_weights_cannot_serve_are_one_line(tmp_path, setting, words, cli_here):
    """Found by a CLI probe: each of these ended in a traceback or ran with the wrong weights."""
    rc, _, err = cli_here("render", "--input", "synthetic", "--frames", "5", "--prompt", "a photo", "--output",
                   str(tmp_path / "o.mp4"), "--set", setting)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("streamdiff: error:"), err
    assert words in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_result_paths_are_checked_before_the_work(tmp_path):
    """Found by trying: `bench --json FOLDER` failed after the whole benchmark, `train-demo
    --output FILE` after every training stage (24-67 minutes), `serve --token ""` served with
    authentication off."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, words in (
        (["bench", "--config", "tiny", "--json", str(tmp_path)], f"--json {tmp_path} is a folder"),
        (["bench", "--config", "tiny", "--plot", str(a_file / "p.png")], "--plot"),
        (["plan", "--config", "tiny", "--json", str(tmp_path)], f"--json {tmp_path} is a folder"),
        (["train-demo", "--smoke", "--work", str(a_file)], f"--work {a_file} is a file"),
        (["train-demo", "--smoke", "--work", str(tmp_path / "w"), "--output", str(a_file)], f"--output {a_file} is a file"),
        # a probe: "cannot write there (File exists)" for a path through a file
        (["bench", "--config", "tiny", "--json", str(a_file / "r.json")], f"{a_file} is a file, so nothing can be written"),
        # a probe: as root, permission bits said yes to /proc (train-demo failed after its training)
        (["train-demo", "--smoke", "--work", str(tmp_path / "w"), "--output", "/proc/streamdiff-out"],
         "--output /proc/streamdiff-out: cannot write there"),
        (["serve", "--config", "tiny", "--token", ""], "--token is empty"),
    ):
        out, err = run(*args)
        assert out == {"rc": 2, "torch": False}, (args, err)
        assert len(err.splitlines()) == 1 and words in err, (args, err)


@pytest.mark.parametrize("args, words", [
    (["bench", "--duration", "nan"], "argument --duration: 'nan' is not a number"),
    (["bench", "--sessions", "0"], "argument --sessions"),
    (["render", "--input", "x.mp4"], "the following arguments are required: --prompt, --output"),
    # a probe: a --size that was given was answered "resize on the way in with --size"
    (["render", "--input", "synthetic", "--prompt", "p", "--output", "o.mp4", "--size", "100x100"],
     "--size 100x100: width and height must be multiples of 16 (the VAE and patching), e.g. --size 96x96"),
    (["bench", "--sessions", "3"], "--sessions applies to end-to-end mode only"),
    (["bench", "--warmup", "1"], "--warmup applies to end-to-end mode only"),
    (["bench", "--url", "http://127.0.0.1:8000", "--streams", "2"],
     "--streams is a model-mode flag; end-to-end mode (--url) measures whatever the server runs; --sessions N opens"),
    (["bench", "--ray"], "--ray needs --stages LIST"),
    (["bench", "--simulate", "--streams", "1,2"], "--simulate takes one --streams value"),
    (["bench", "--plot", "cdf.txt"], "--plot cdf.txt: the plot is an image"),
    # a CLI probe: taken and ignored
    (["bench", "--simulate", "--duration", "5"], "--duration does not apply to --simulate"),
    (["bench", "--simulate", "--plot", "p.png"], "--plot does not apply to --simulate"),
    (["bench", "--hop-ms", "1"], "--hop-ms is the per-hop latency --simulate projects with"),
    (["bench", "--stages", "1,2", "--plot", "p.png"], "--plot draws one-process model mode"),
    (["bench", "--simulate", "--peak-tflops", "5"], "--peak-tflops does not apply to --simulate"),
    (["bench", "--stages", "1", "--peak-tflops", "5"], "--peak-tflops gives one-process model mode its MFU"),
    (["bench", "--json", "r.png", "--plot", "./r.png"], "--json and --plot both name ./r.png"),
    (["plan", "--gpu-mem", "24"], "--gpu-mem '24' is not a device's memory"),
    (["plan", "--gpu-mem", ""], "--gpu-mem is empty"),  # a probe: the default size, silently
    (["bench", "--url", "notaurl"], "--url 'notaurl' is not a server address"),
    (["bench", "--url", "http://h:port"], "is not a server address"),
    # a probe: the flag's value named by a config key the user never typed, and "config . is a folder"
    (["serve", "--config", "tiny", "--stages", "99"], "--stages 99 is out of range"),
    (["serve", "--config", "tiny", "--stages", "3"], "--stages 3 exceeds model.num_layers=2"),
    (["plan", "--config", "tiny", "--stages", "3"], "--stages 3 exceeds model.num_layers=2"),
    (["serve", "--config", ""], "the config name is empty: give a preset (demo, tiny"),
    # a probe: an empty value (an unset variable) was taken as left out: --url "" measured the demo model in
    # model mode, --config "" the demo, --json "" wrote no report
    (["bench", "--url", ""], "--url is empty (an unset variable?)"),
    (["bench", "--config", ""], "--config is empty"),
    (["bench", "--json", ""], "--json is empty"),
    (["plan", "--config", "tiny", "--json", " "], "--json is empty"),
])
def test_flag_mistakes_are_one_line_before_any_work(args, words, capsys):
    """A probe: argparse printed its usage block (4-11 lines) above the error; --sessions without
    --url was ignored; --plot with a name matplotlib cannot write failed after the whole run."""
    from streamdiff.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("streamdiff: error: ") and words in err[0], err


def test_the_token_variable_is_for_end_to_end_mode_only(monkeypatch, capsys):
    """A bench probe: with STREAMDIFF_TOKEN exported (as the README says, for serve and bench
    --url) every model-mode and --simulate bench was refused: "--token applies to end-to-end
    mode only". The variable is read where a token is used; a --token given is still refused."""
    from streamdiff.cli import main

    monkeypatch.setenv("STREAMDIFF_TOKEN", "s3cret")
    assert main(["bench", "--steps", "9"]) == 2  # past the mode's checks: its own mistake is named
    err = capsys.readouterr().err
    assert "--steps" in err and "--token" not in err, err
    assert main(["bench", "--token", "x", "--steps", "1"]) == 2
    assert "--token applies to end-to-end mode only" in capsys.readouterr().err


def test_a_report_never_replaces_the_config_it_measured(tmp_path, capsys):
    """A bench probe: `--config my.yaml --json my.yaml` replaced the config with the report."""
    from streamdiff.cli import main

    mine = tmp_path / "my.yaml"
    mine.write_text((Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text())
    before = mine.read_text()
    assert main(["bench", "--config", str(mine), "--json", f"{tmp_path}/./my.yaml"]) == 2  # (pathlib drops a "." part)
    assert "is the --config file" in capsys.readouterr().err and mine.read_text() == before


def test_sigterm_during_a_render_removes_its_partial_file(tmp_path):
    """A CLI probe: `timeout` (SIGTERM) in the middle of a render left the hidden partial file
    behind; SIGTERM now ends a render as Ctrl-C does (exit 143)."""
    import signal
    import time

    out = tmp_path / "o.mp4"
    partial = tmp_path / ".o.partial.mp4"
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "render", "--config", "tiny", "--input", "synthetic",
                             "--frames", "2000", "--prompt", "p", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    deadline = time.monotonic() + 240
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert partial.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert json.loads(stdout.strip().splitlines()[-1])["rc"] == 143, stderr
    assert "streamdiff: terminated (SIGTERM)" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_token_may_come_from_the_environment(monkeypatch):
    """`--token` shows in `ps` to every user of the machine; STREAMDIFF_TOKEN does not. A flag
    still wins, and an empty variable is no token."""
    from streamdiff.cli import build_parser

    from streamdiff.cli import main
    from streamdiff.client import bench

    monkeypatch.setenv("STREAMDIFF_TOKEN", "s3cret")
    parser = build_parser()
    assert parser.parse_args(["serve"]).token == "s3cret"
    assert parser.parse_args(["control", "--session", "k", "--seed", "1"]).token == "s3cret"
    assert parser.parse_args(["serve", "--token", "flag"]).token == "flag"
    used = []  # bench reads it in end-to-end mode only (model mode takes no token)
    monkeypatch.setattr(bench, "run_from_args", lambda args: used.append(args.token) or 0)
    assert main(["bench", "--url", "http://127.0.0.1:8000"]) == 0
    assert main(["bench", "--url", "http://127.0.0.1:8000", "--token", "flag"]) == 0
    assert used == ["s3cret", "flag"]
    monkeypatch.setenv("STREAMDIFF_TOKEN", "")
    assert build_parser().parse_args(["serve"]).token is None


def test_a_file_the_muxer_refuses_is_one_line_and_leaves_nothing(tmp_path, cli_here, monkeypatch):
    """A probe: an .avi render of a file claiming 30000 fps ended in FFmpeg's traceback from the
    writer's close (its partial file was removed)."""
    import av

    from streamdiff.client import video_io

    def refuse(self):  # as the muxer does in close(), after every frame was written
        raise av.error.ArgumentError(22, "Invalid argument", str(self.partial))

    monkeypatch.setattr(video_io.VideoWriter, "close", refuse)
    out = tmp_path / "o.avi"
    rc, _, err = cli_here("render", "--input", "synthetic", "--frames", "5", "--prompt", "a photo", "--output", str(out), "-q")
    assert rc == 2 and len(err.splitlines()) == 1 and f"writing {out} failed: " in err, err
    assert list(tmp_path.iterdir()) == []  # no output, no partial file


def test_what_runs_on_a_gpu_only_is_one_line_on_a_cpu(cli_here, monkeypatch, tmp_path):
    """A probe: the Triton attention, CUDA graphs on a machine without CUDA (runtime.device auto)
    and `bench --simulate --stages` past the model's blocks were tracebacks or an empty table."""
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the tests' own interpreter mode)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    render = ("render", "--config", "tiny", "--input", "synthetic", "--frames", "5", "--prompt", "p", "--output",
              str(tmp_path / "o.mp4"), "--set")
    for setting, words in (("model.attention_backend=triton", "runs Triton kernels on a GPU"),
                           ("runtime.cuda_graphs=true", "needs runtime.device=cuda")):
        rc, _, err = cli_here(*render, setting)
        assert rc == 2 and err.splitlines()[-1].startswith("streamdiff: error:") and words in err, err
    rc, out, err = cli_here("bench", "--config", "tiny", "--simulate", "--stages", "1,3")
    assert rc == 2 and "--stages 3: the model has only 2 blocks" in err and not out, (out, err)
    assert not (tmp_path / "o.mp4").exists()


def test_a_gpu_config_that_joins_a_ray_cluster_is_not_refused_for_this_machines_gpu(monkeypatch):
    """The stages of a config that joins a Ray cluster run on the cluster's GPUs (checked when they
    start): a CPU-only machine may start `serve --ray-address`. The Triton attention runs on a CPU
    in Triton's interpreter (TRITON_INTERPRET=1)."""
    import torch

    from streamdiff.config import ConfigError, load_config
    from streamdiff.preflight import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = ["runtime.device=cuda", "parallel.backend=ray"]
    check_device(load_config("tiny", [*cuda, "parallel.ray_address=10.0.0.7:6379"]))
    with pytest.raises(ConfigError, match="asks for a GPU"):
        check_device(load_config("tiny", cuda))
    triton = load_config("tiny", ["runtime.device=cpu", "model.attention_backend=triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_device(triton)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="runs Triton kernels on a GPU"):
        check_device(triton)


def test_a_model_larger_than_the_machine_is_refused_before_it_is_made(cli_here, monkeypatch, tmp_path):
    """A probe: model.num_heads=64, head_dim=256 grew for minutes and was killed (exit 137, no word)."""
    from streamdiff.model import build

    monkeypatch.setattr(build, "available_bytes", lambda device, total=False: 2**16)  # a 64 KiB machine
    rc, _, err = cli_here("render", "--config", "tiny", "--input", "synthetic", "--frames", "5", "--prompt", "p",
                          "--output", str(tmp_path / "o.mp4"), "-q")
    assert rc == 2 and "the DiT:" in err and "this machine has 0.0 GiB in all" in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_an_allocation_that_fails_is_one_line(cli_here, monkeypatch, tmp_path):
    """What the probe's 8 TB noise-schedule table ended in: a traceback of torch's CPU allocator."""
    from streamdiff.sampling import noise_schedule

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 8000008000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(noise_schedule.FlowMatchSchedule, "__init__", refuse)
    rc, _, err = cli_here("render", "--config", "tiny", "--input", "synthetic", "--frames", "5", "--prompt", "p",
                          "--output", str(tmp_path / "o.mp4"), "-q")
    said = err.splitlines()[-1]
    assert rc == 1 and said.startswith("streamdiff: error: out of memory (one tensor of 7450.6 GiB)"), err
    assert "streamdiff plan" in said and not (tmp_path / "o.mp4").exists()


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """A docs probe: `streamdiff gpu-check --dry-run | head` ended in a BrokenPipeError traceback once
    `head` had its lines (and Python's own "Exception ignored" on the flush at exit)."""
    read, write = os.pipe()
    os.close(read)  # a reader that has gone: every write fails (as once `head` has its lines)
    try:
        done = subprocess.run([sys.executable, "-m", "streamdiff.cli", "gpu-check", "--dry-run"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


TAKEN_MEANWHILE = """
import socket, sys
from streamdiff.cli import main
import streamdiff.cli as cli
holder = socket.socket()
holder.bind(("127.0.0.1", 0))
holder.listen()
port = holder.getsockname()[1]
cli.check_listen = lambda host, port: None  # as if another server bound the port after the check
sys.exit(main(["serve", "--config", "tiny", "--port", str(port)]))
"""


def test_a_port_taken_between_the_check_and_the_bind_is_one_line():
    """An install probe: a second server started seconds after the first passed the port check
    (the first had not bound yet) and ended 13 s later in aiohttp's bind traceback."""
    done = subprocess.run([sys.executable, "-c", TAKEN_MEANWHILE], capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last.startswith("streamdiff: error: cannot listen on 127.0.0.1:") and "is in use" in last, last


def test_a_url_given_as_host_is_told_to_drop_its_scheme_and_the_version_is_printed(capsys):
    """An install probe: `--host http://127.0.0.1` said "not an address of this machine" (it is one,
    without its scheme), and `streamdiff --version` was an error."""
    from streamdiff.config import ConfigError
    from streamdiff.preflight import check_listen

    for given in ("http://127.0.0.1", "https://127.0.0.1:8000/"):
        with pytest.raises(ConfigError, match=r"without scheme, port or path \(--host 127\.0\.0\.1 --port 8011\)"):
            check_listen(given, 8011)
    with pytest.raises(ConfigError, match="not an address of this machine"):
        check_listen("nothing.invalid", 8011)
    from importlib.metadata import version

    from streamdiff.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"streamdiff {version('streamdiff')}"


def test_serve_hands_the_session_limit_and_the_bitrate_to_the_server_as_given(monkeypatch):
    """`--max-sessions` equal to the KV pool's size is taken, and `--bitrate-kbps 1500` is 1.5 Mbit/s
    (a review): refusing a limit the pool holds, or a bitrate off by a factor of 1000, would
    change what an operator asked for without a word."""
    from streamdiff.cli import main
    from streamdiff.server import app

    with socket.socket() as sock:  # a port free now (serve checks it before it would start)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    got = []
    monkeypatch.setattr(app, "serve", lambda cfg, host, port, settings: got.append(settings) or 0)
    assert main(["serve", "--config", "tiny", "--port", str(port), "--max-sessions", "4",
                 "--bitrate-kbps", "1500", "--max-viewers", "3"]) == 0
    assert [(s.max_sessions, s.bitrate_bps, s.max_viewers) for s in got] == [(4, 1_500_000, 3)]


def test_bench_hands_its_flags_to_the_end_to_end_run(monkeypatch, capsys):
    """`--warmup 0` measures from the start (not the default 2 s warm-up), and the other
    end-to-end flags arrive as given; without them, the defaults."""
    from streamdiff.cli import main
    from streamdiff.client import bench

    seen = []

    async def measured(url, sessions, duration_s, **kwargs):
        seen.append((url, sessions, duration_s, kwargs["warmup_s"], kwargs["fps"], kwargs["size"]))
        raise bench.BenchError("stopped by the test")

    monkeypatch.setattr(bench, "run_e2e", measured)
    assert main(["bench", "--url", "http://127.0.0.1:8000", "--warmup", "0", "--sessions", "3", "--duration", "5",
                 "--fps", "12", "--size", "64x48"]) == 2
    assert main(["bench", "--url", "http://127.0.0.1:8000"]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    assert seen == [("http://127.0.0.1:8000", 3, 5.0, 0.0, 12.0, (64, 48)),
                    ("http://127.0.0.1:8000", 1, 10.0, 2.0, 15.0, None)]


def test_bench_lists_take_their_bounds_and_measure_a_value_once():
    from streamdiff.cli import _parse_int_list, _parse_resolutions

    assert _parse_int_list("--steps", "4,1,4", 1, 4) == (4, 1)
    assert _parse_int_list("--streams", "64", 1, 64) == (64,)
    assert _parse_resolutions("512x512,832x480,512x512") == ((512, 512), (832, 480))
