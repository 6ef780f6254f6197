"""`streamdiff train-demo --smoke`: every stage runs a couple of steps, checkpoints, resumes, and
the exported files load through the runtime's own loaders into a working pipeline; with two
threads the teacher renders in two processes and the decoder trains in a child process beside
the DiT, to the same files and weights; the recorded training time adds up every run; a work
folder resumes only under the recipe that made it."""

from __future__ import annotations

import contextlib
import json
import shutil

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
    # the same decoder stage in this process, on one thread, from the same encoder and latents
    shutil.copytree(work, tmp_path / "again", ignore=shutil.ignore_patterns("vae.ckpt"))
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
                        (["--output", str(a_file)], f"--output {a_file} is a file")):
        with pytest.raises(SystemExit) if "--threads" in args else contextlib.nullcontext():
            assert main(["train-demo", "--smoke", "--work", str(tmp_path / "w"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, (args, err)
        assert not (tmp_path / "w").exists(), args  # refused before anything was made
