"""`streamdiff train-demo`: rebuild the demo model's weights from scratch on a CPU.

Owns: the training recipe and its stages, each resumable from files in the work folder:
  1. data: clips of the training photographs (data.py) and the teacher's rendering of every
     frame in each of the eight styles (one .npy per photograph);
  2. pca: the principal components of every clip's 4-frame 8x8 patches (what one latent
     pixel stands for);
  3. vae encoder: the narrow TAEHV's encoder (configs/demo.yaml widths) regressed onto the
     PCA code of source and styled clips, through the streaming path's frame grouping;
  4. latents: every clip and its eight stylings encoded once with that encoder, now frozen;
  5. vae decoder and dit, independent of each other (side by side with --threads 2): the
     TAEHV decoder trained to rebuild the clips from the frozen code; the small
     CausalWanModel and the prompt table trained as a v2v flow-matching model on the latents
     (dit_train.py); both checkpointed every few dozen steps;
  6. export: safetensors files the runtime loads through its own loaders (configs/demo/).
Does not own: the data (data.py), the DiT's training forward (dit_train.py), the runtime.

Deterministic given the seed and each stage's thread count; step counts (not wall time) fix the recipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from streamdiff.config import Config, load_config
from streamdiff.demo.data import TRAIN_PHOTOS, Teacher, load_photo, make_clip
from streamdiff.model.loading import first_line
from streamdiff.model.style_prompts import PROMPT_NAMES
from streamdiff.model.taehv import TAEHV, decode_latents, encode_frames


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    size: int = 256  # frames are made and styled at the demo's resolution
    clip_frames: int = 9  # 1 + 4*2: three latent frames
    clips_per_photo: int = 6
    vae_code_scale: float = 0.5  # the encoder's target: the PCA code, channel i x 0.5 / var_i^(1/4)
    vae_encoder_steps: int = 1500  # the encoder regressed onto that code (stage_vae_encoder)
    vae_decoder_steps: int = 6000  # the decoder on the frozen code (stage_vae_decoder)
    vae_batch: int = 8
    vae_crop: int = 64  # the encoder's crops
    vae_decoder_crop: int = 48  # the decoder's: 6000 steps at 48 px take the time of 3500 at 64, and gain more
    vae_lr: float = 1.5e-3
    vae_chroma_weight: float = 4.0  # extra loss on colour (RGB minus its grey); see stage_vae_decoder
    vae_lowpass_weight: float = 4.0  # extra loss on 8x8 block means; see stage_vae_decoder
    vae_colour_fade: float = 0.5  # those two terms fade over this fraction of the decoder's steps
    vae_colour_floor: float = 0.1  # to this weight, kept to the end (colour of unseen photographs)
    dit_steps: int = 3500
    dit_batch: int = 16
    dit_crop: int = 16  # latent pixels (x8 in the image)
    dit_lr: float = 1e-3
    checkpoint_every: int = 50
    photos: int = len(TRAIN_PHOTOS)  # the first N training photographs (fewer only in smoke runs)


    @classmethod
    def smoke(cls) -> "Recipe":
        """A few steps of every stage on two photographs at 64x64: checks the trainer, not the result."""
        return replace(cls(), clips_per_photo=1, vae_encoder_steps=2, vae_decoder_steps=2, dit_steps=2, vae_batch=2,
                       dit_batch=2, checkpoint_every=1, photos=2, size=64, vae_crop=32, vae_decoder_crop=32, dit_crop=4)


class WorkError(ValueError):
    """The work folder cannot be used as it is (another run holds it, a damaged file, a stage's
    process that died): one line for the CLI, saying what to do."""


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a name of this process's own
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_work(path: Path, weights_only: bool = False):
    """One of the work folder's own files; a damaged one (a disk filled, a copy cut short) is
    said by name with what to do, not as torch's zip-reader traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - RuntimeError, OSError, EOFError, UnpicklingError, ...
        raise WorkError(f"{path} is damaged ({first_line(exc)}); delete it and rerun to redo that stage") from None


def _exit_with_parent() -> None:
    """In a child process: exit when the parent dies (kill -9, the OOM killer), instead of
    training on as an orphan beside the rerun the user starts."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's sentinel closes
        os._exit(1)

    threading.Thread(target=watch, name="exit with parent", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# Stage 1: data
# ---------------------------------------------------------------------------------------------


def photo_clips(name: str, index: int, recipe: Recipe) -> np.ndarray:
    """The clips of one photograph: [clips, frames, size, size, 3] uint8 (seeded per photo)."""
    photo = load_photo(name)
    out = []
    for c in range(recipe.clips_per_photo):
        rng = np.random.default_rng([recipe.seed, index, c])
        clip = make_clip(photo, recipe.clip_frames, recipe.size, rng)
        if c % 2:  # every other clip in other colours (half the photographs are grey, the rest few
            # hues): RGB channels permuted, each scaled by 0.65-1.15 (tints the grey ones)
            gain = rng.uniform(0.65, 1.15, 3).astype(np.float32)
            clip = np.clip(clip[..., rng.permutation(3)] * gain, 0, 255).round().astype(np.uint8)
        out.append(clip)
    return np.stack(out)


_teacher: Teacher | None = None  # a data worker's own teacher (one per process)


def _ignore_ctrl_c() -> None:
    """In a child process: Ctrl-C reaches every process of the terminal's group; the parent
    stops its children, so they print nothing of their own (18 tracebacks before)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _children_deaf_to_ctrl_c():
    """Processes started inside it are born ignoring Ctrl-C (an ignored signal stays ignored
    across exec, and Python then leaves it so). A spawned child imports torch and the model code
    for seconds before its own `_ignore_ctrl_c` runs; a Ctrl-C in that time printed a traceback
    from its imports (a probe: ~30 lines before "interrupted"). The parent is deaf only while
    it starts them (milliseconds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_worker() -> None:
    _ignore_ctrl_c()
    _exit_with_parent()
    torch.set_num_threads(1)


def _render_indexed(job: tuple[Path, str, int, Recipe]) -> Path:
    global _teacher
    if _teacher is None:  # here, not in the pool's initializer: an initializer that fails is restarted for ever
        _teacher = Teacher(threads=1)
    return _render_photo(*job)


def _render_photo(folder: Path, name: str, index: int, recipe: Recipe, teacher: Teacher | None = None) -> Path:
    """One photograph's file: [clips, 9 prompts, frames, H, W, 3] uint8 (prompt 0: the input)."""
    teacher = teacher or _teacher
    clips = photo_clips(name, index, recipe)  # [C, n, H, W, 3]
    rows = [np.stack([teacher.render_prompt(clip, prompt) for prompt in PROMPT_NAMES]) for clip in clips]
    tmp, path = folder / f"{name}.{os.getpid()}.tmp.npy", folder / f"{name}.npy"
    try:
        np.save(tmp, np.stack(rows))  # [C, 9, n, H, W, 3]
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def stage_data(work: Path, recipe: Recipe, threads: int) -> list[Path]:
    """One file per photograph (`_render_photo`). With two or more threads the photographs are
    rendered in that many spawned processes, one ONNX thread each: on 2 cores that is 93 ms a
    frame per process against 63 ms for one process on two threads (docs/demo.md), and the
    teacher's output does not depend on its thread count."""
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    names = TRAIN_PHOTOS[: recipe.photos]
    files = [folder / f"{name}.npy" for name in names]
    todo = [(i, name) for i, name in enumerate(names) if not files[i].exists()]
    if todo and len(todo) < len(names):
        print(f"data: resuming: {len(names) - len(todo)} of {len(names)} photographs were rendered "
              f"by an earlier run ({folder})", file=sys.stderr)
    bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="data: teacher renders", unit="photo",
               disable=not todo)
    if threads < 2 or len(todo) < 2:
        teacher = Teacher(threads=threads) if todo else None
        for i, name in todo:
            _render_photo(folder, name, i, recipe, teacher)
            bar.update(1)
    else:
        import multiprocessing

        with _children_deaf_to_ctrl_c():
            pool = multiprocessing.get_context("spawn").Pool(min(threads, len(todo)), initializer=_start_worker)
        try:
            jobs = [(folder, name, i, recipe) for i, name in todo]
            for _ in pool.imap_unordered(_render_indexed, jobs):  # a worker's error is raised here
                bar.update(1)
            pool.close()
        except BaseException:  # an error or Ctrl-C: stop the renders now (a finished photo is kept)
            pool.terminate()
            raise
        finally:
            pool.join()
    bar.close()
    return files


def load_data(files: list[Path]) -> list[np.ndarray]:
    """Memory-mapped [clips, prompts, frames, H, W, 3] arrays, one per photograph."""
    out = []
    for f in files:
        try:
            out.append(np.load(f, mmap_mode="r"))
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty file (a disk that filled)
            raise WorkError(f"{f} is damaged ({first_line(exc)}); delete it and rerun to render it again") from None
    return out


def _clips_index(data: list[np.ndarray]) -> list[tuple[int, int]]:
    return [(i, c) for i, arr in enumerate(data) for c in range(arr.shape[0])]


def _to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, n, H, W, 3] -> [B, 3, n, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def _lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return float(peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))))


def _resume(path: Path, modules: dict, opt: torch.optim.Optimizer) -> int:
    if not path.exists():
        return 0
    ckpt = _load_work(path)  # our own work file
    for name, module in modules.items():
        if isinstance(module, torch.Tensor):
            module.data.copy_(ckpt[name])
        else:
            module.load_state_dict(ckpt[name])
    opt.load_state_dict(ckpt["opt"])
    return int(ckpt["step"])


def _descend(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> None:
    """One optimizer step on `loss`, gradients clipped to norm 1 (every stage's step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _steps_done(path: Path) -> int:
    """The step a stage's checkpoint file reached (0 when there is none)."""
    return int(_load_work(path)["step"]) if path.exists() else 0


def _checkpoint(path: Path, modules: dict, opt: torch.optim.Optimizer, step: int) -> None:
    state = {name: (m.detach().clone() if isinstance(m, torch.Tensor) else m.state_dict()) for name, m in modules.items()}
    _save_atomic({**state, "opt": opt.state_dict(), "step": step}, path)


# ---------------------------------------------------------------------------------------------
# Stage 2: the TAEHV
# ---------------------------------------------------------------------------------------------


def vae_batch(data: list[np.ndarray], recipe: Recipe, gen: torch.Generator, crop: int | None = None) -> torch.Tensor:
    """A batch of whole clips as a stream's first call sees them (1 + 4k frames, so the later
    latents run on the memory of earlier ones, as in streaming), random crop (`crop`, default
    `recipe.vae_crop`), mirror and time reversal: [B, 3, n, crop, crop] in [-1, 1]. 2 in 5
    clips are source clips, the rest styled."""
    crop = crop or recipe.vae_crop
    index = _clips_index(data)
    out = []
    for _ in range(recipe.vae_batch):
        i, c = index[int(torch.randint(len(index), (1,), generator=gen))]
        prompt = 0 if float(torch.rand(1, generator=gen)) < 0.4 else int(torch.randint(1, len(PROMPT_NAMES), (1,), generator=gen))
        y, x = (int(torch.randint(recipe.size - crop + 1, (1,), generator=gen)) for _ in range(2))
        frames = data[i][c, prompt, :, y : y + crop, x : x + crop]  # [n, crop, crop, 3]
        if float(torch.rand(1, generator=gen)) < 0.5:
            frames = frames[:, :, ::-1]
        if float(torch.rand(1, generator=gen)) < 0.5:  # the camera moving the other way
            frames = frames[::-1]
        out.append(_recolour(frames, gen))
    return _to_pixels(np.stack(out))


def _recolour(frames: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """Colour augmentation for the autoencoder: half the photographs are grey and the rest
    cover few hues, so most clips get their RGB channels permuted and each channel a gain in
    0.8-1.2 (the frames stay a plausible picture; an autoencoder's target is its input)."""
    if float(torch.rand(1, generator=gen)) < 0.2:
        return frames
    perm = torch.randperm(3, generator=gen).tolist()
    gain = (0.8 + 0.4 * torch.rand(3, generator=gen)).numpy()
    return np.clip(frames[..., perm].astype(np.float32) * gain, 0, 255).astype(np.uint8)


def init_taehv_(net: TAEHV) -> TAEHV:
    """He-normal convolutions, and every MemBlock's last convolution at zero so that each block
    starts as its skip path: a deep stack without normalisation then trains from step one
    instead of waiting for its signal to grow through default-initialised layers."""
    from streamdiff.model.taehv import MemBlock

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for m in net.modules():
        if isinstance(m, MemBlock):
            torch.nn.init.zeros_(m.conv[-1].weight)
    return net


def _patches(x: torch.Tensor) -> torch.Tensor:
    """Frames [B, 3, 4m, H, W] -> every 4-frame 8x8 patch as one row [B, m, H/8, W/8, 768],
    ordered (time, y, x, RGB): what one latent pixel stands for."""
    b, _, n, h, w = x.shape
    rows = x.reshape(b, 3, n // 4, 4, h // 8, 8, w // 8, 8).permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, m, h, w, 4, 8, 8, 3]
    return rows.reshape(b, n // 4, h // 8, w // 8, 768)


def patch_rows(frames: np.ndarray) -> torch.Tensor:
    """uint8 clip [1 + 4k, H, W, 3] -> the patches (`_patches`) of frames 1..4k, one row each
    [k*H/8*W/8, 768] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames[1:])).float() / 127.5 - 1  # [4k, H, W, 3]
    return _patches(x.permute(3, 0, 1, 2)[None]).reshape(-1, 768)


def stage_pca(work: Path, data: list[np.ndarray], channels: int) -> dict:
    """The principal components of every training clip's 4-frame 8x8 patches (source and
    styled): mean [768], the top `channels` directions [768, C] and their variances [C]."""
    path = work / "pca.pt"
    if path.exists():
        return _load_work(path, weights_only=True)
    gram, total, n = torch.zeros(768, 768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64), 0
    for arr in tqdm(data, desc="pca: patch statistics", unit="photo"):
        for c in range(arr.shape[0]):
            for prompt in range(arr.shape[1]):
                rows = patch_rows(np.array(arr[c, prompt])).double()
                gram += rows.T @ rows
                total += rows.sum(0)
                n += len(rows)
    mean = total / n
    var, vec = torch.linalg.eigh(gram / n - torch.outer(mean, mean))  # ascending
    pca = {"mean": mean.float(), "basis": vec[:, -channels:].flip(1).float().contiguous(),
           "var": var[-channels:].flip(0).float().contiguous()}
    _save_atomic(pca, path)
    return pca


def pca_code(x: torch.Tensor, pca: dict, scale: float) -> torch.Tensor:
    """Clips [B, 3, 1 + 4k, H, W] in [-1, 1] -> each latent pixel's PCA code, its frames grouped
    as a stream's encoder groups them (frame 0 alone, front-padded to 4; then 4 at a time):
    [B, C, 1 + k, H/8, W/8]. Channel i is scaled by `scale` / var_i^(1/4), half way between the
    plain projection (the first component, mean brightness, has 140x the variance of the 16th)
    and whitening (every channel variance 1): so the DiT's noise and loss weigh the channels
    more as the picture does, while no channel is too small for them or too large for the
    decoder's soft clamp at +-3."""
    x = torch.cat([x[:, :, :1].expand(-1, -1, 3, -1, -1), x], 2)  # [B, 3, 4(1 + k), H, W]
    code = ((_patches(x) - pca["mean"]) @ pca["basis"]) * (scale / pca["var"].pow(0.25))  # [B, 1 + k, h, w, C]
    return code.permute(0, 4, 1, 2, 3)  # [B, C, 1 + k, h, w]


def _vae_net(cfg: Config, recipe: Recipe) -> TAEHV:
    torch.manual_seed(recipe.seed)
    return init_taehv_(TAEHV.from_config(cfg.vae)).channels_last_()


def stage_vae_encoder(work: Path, cfg: Config, data: list[np.ndarray], recipe: Recipe, pca: dict) -> TAEHV:
    """The TAEHV encoder regressed onto the PCA code of its input (`pca_code`); the decoder
    keeps its initialisation for `stage_vae_decoder`.

    Why not an autoencoder from the start: trained end to end for 5000 steps, the narrow TAEHV
    reached 18.1 dB on the held-out clip, while a linear code of the same 16 numbers (this PCA)
    gives 23.0 dB, and a linear read-out of that TAEHV's latents only 18.4: its encoder was the
    limit (docs/demo.md). Regressed onto the PCA code, the encoder reaches a code the PCA basis
    reads back at about 22 dB in 1500 steps. (In 4500 it reads 22.8, but the decoder then trained
    on it decodes 0.9-1.7 dB worse: docs/demo.md, "The encoder's steps".)"""
    path = work / "vae_encoder.ckpt"
    net = _vae_net(cfg, recipe)
    params = list(net.encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vae_lr, weight_decay=0.0)
    step = _resume(path, {"net": net}, opt)
    n_enc = TAEHV.num_memblocks(net.encoder)
    bar = tqdm(total=recipe.vae_encoder_steps, initial=step, desc="vae: TAEHV encoder -> PCA code", unit="step")
    while step < recipe.vae_encoder_steps:
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        x = vae_batch(data, recipe, gen)  # [B, 3, n, c, c]
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.vae_encoder_steps, recipe.vae_lr)
        z = encode_frames(net, x, [None] * n_enc, first=True)  # [B, 16, F, c/8, c/8]
        loss = F.mse_loss(z, pca_code(x, pca, recipe.vae_code_scale))
        _descend(opt, params, loss)
        step += 1
        bar.update(1)
        bar.set_postfix(code_mse=f"{loss.item():.4f}")
        if step % recipe.checkpoint_every == 0 or step == recipe.vae_encoder_steps:
            _checkpoint(path, {"net": net}, opt, step)
    bar.close()
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    return net.eval()


def _block_means(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, n, H, W] -> the mean of every 8x8 block of every frame [B, 3, n, H/8, W/8]."""
    return F.avg_pool3d(x, (1, 8, 8))


def colour_factor(step: int, recipe: Recipe) -> float:
    """The weight of the decoder's colour and block-mean terms at `step`: 1 at the start, falling
    linearly to `vae_colour_floor` at `vae_colour_fade` of the steps, then that floor. Faded to
    zero, nothing held the colour of a photograph the decoder had not seen: one of three builds
    of that recipe (other CPU kernels, same seeds) cast the held-out clip blue by 22 levels, 1.8 dB
    on `a photo`; a floor of 0.1 took it back to 19.65 dB and left a good build as it was
    (docs/demo.md, fourteenth session)."""
    end = recipe.vae_colour_fade * recipe.vae_decoder_steps
    fade = max(0.0, 1.0 - step / end) if end > 0 else 0.0
    return max(recipe.vae_colour_floor, fade)


def stage_vae_decoder(work: Path, net: TAEHV, data: list[np.ndarray], recipe: Recipe, bar_position: int = 0) -> TAEHV:
    """The TAEHV decoder trained to rebuild whole streamed clips (1 + 4 + 4 frames, source and
    styled) from the frozen encoder's code, with a little noise on it so that it tolerates the
    DiT's error.

    Loss: MSE, plus `vae_chroma_weight` x the MSE of the colour part (RGB minus its grey), plus
    `vae_lowpass_weight` x the MSE of the 8x8 block means. A fresh decoder on a fixed code
    learns colour last; the block means weigh it more (on the held-out clip after 500 steps of
    a 1000-step run, 40% of the colour energy came back without that term, 66% with it; after
    750 steps 13.8 dB against 17.4 dB; docs/demo.md). Both terms fade over the first
    `vae_colour_fade` of the steps to a small floor (`colour_factor`): once colour is learnt
    they mostly pull away from plain MSE, but without them the colour of unseen photographs
    can drift. Crops of `vae_decoder_crop` pixels: smaller than the encoder's, so that the
    stage takes more steps in the same time (docs/demo.md, eleventh session)."""
    path = work / "vae.ckpt"
    params = list(net.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vae_lr, weight_decay=0.0)
    step = _resume(path, {"net": net}, opt)
    n_enc, n_dec = TAEHV.num_memblocks(net.encoder), TAEHV.num_memblocks(net.decoder)
    bar = tqdm(total=recipe.vae_decoder_steps, initial=step, desc="vae: TAEHV decoder", unit="step",
               position=bar_position)
    while step < recipe.vae_decoder_steps:
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + 5_000_000 + step)
        x = vae_batch(data, recipe, gen, recipe.vae_decoder_crop)  # [B, 3, n, c, c]
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.vae_decoder_steps, recipe.vae_lr)
        with torch.no_grad():
            z = encode_frames(net, x, [None] * n_enc, first=True)  # [B, 16, F, c/8, c/8]
        z_in = z + 0.02 * torch.randn(z.shape, generator=gen)  # a decoder that tolerates DiT error
        y = decode_latents(net, z_in, [None] * n_dec, first=True, clamp=False)  # [B, 3, n, c, c]
        mse = F.mse_loss(y, x)
        chroma = F.mse_loss(y - y.mean(dim=1, keepdim=True), x - x.mean(dim=1, keepdim=True))
        lowpass = F.mse_loss(_block_means(y), _block_means(x))
        loss = mse + colour_factor(step, recipe) * (recipe.vae_chroma_weight * chroma + recipe.vae_lowpass_weight * lowpass)
        _descend(opt, params, loss)
        step += 1
        bar.update(1)
        bar.set_postfix(psnr=f"{10 * np.log10(4 / max(mse.item(), 1e-10)):.1f}dB")
        if step % recipe.checkpoint_every == 0 or step == recipe.vae_decoder_steps:
            _checkpoint(path, {"net": net}, opt, step)
    bar.close()
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Stage 3: latents
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def stage_latents(work: Path, net: TAEHV, data: list[np.ndarray]) -> torch.Tensor:
    """Every clip in every prompt, encoded as a stream would be: [clips, 9, 16, F, h, w]."""
    path = work / "latents.pt"
    if path.exists():
        return _load_work(path, weights_only=True)
    n_enc = TAEHV.num_memblocks(net.encoder)
    out = []
    for arr in tqdm(data, desc="latents: encode clips", unit="photo"):
        for c in range(arr.shape[0]):
            x = _to_pixels(arr[c])  # [9 prompts, 3, n, H, W]
            out.append(encode_frames(net, x, [None] * n_enc, first=True))  # [9, 16, F, h, w]
    latents = torch.stack(out)
    _save_atomic(latents, path)
    return latents


# ---------------------------------------------------------------------------------------------
# Stage 4: the DiT and the prompt table
# ---------------------------------------------------------------------------------------------


def stage_dit(work: Path, cfg: Config, latents: torch.Tensor, recipe: Recipe):
    """The DiT and the prompt table on the encoder's latents times `vae.latent_scale`, the
    latents a stream's DiT is given (`StreamingTAEHV`)."""
    from streamdiff.demo.dit_train import make_batch, train_forward
    from streamdiff.model.causal_wan import CausalWanModel
    from streamdiff.model.loading import random_init_
    from streamdiff.sampling.noise_schedule import FlowMatchSchedule

    path = work / "dit.ckpt"
    if cfg.vae.latent_scale != 1:
        latents = latents * cfg.vae.latent_scale
    model = CausalWanModel(cfg.model)
    random_init_(model, recipe.seed)
    with torch.no_grad():  # start at flow 0, i.e. x0 = x_t
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    gen = torch.Generator().manual_seed(recipe.seed)
    table = torch.nn.Parameter(torch.randn(len(PROMPT_NAMES), cfg.text.max_length, cfg.model.text_dim, generator=gen))
    params = list(model.parameters()) + [table]
    opt = torch.optim.AdamW(params, lr=recipe.dit_lr, weight_decay=0.0)
    step = _resume(path, {"model": model, "table": table}, opt)
    schedule = FlowMatchSchedule(cfg.sampling.shift, cfg.sampling.num_train_timesteps)
    bar = tqdm(total=recipe.dit_steps, initial=step, desc="dit: v2v flow matching", unit="step")
    ema = None
    while step < recipe.dit_steps:
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + 7 + step)
        b = make_batch(latents, table, schedule, recipe.dit_batch, recipe.dit_crop, gen)
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.dit_steps, recipe.dit_lr)
        flow = train_forward(model, b["x"], b["timestep"], b["text"], b["frame_pos"], b["chunk_ids"], b["offset"])
        x0 = b["x"] - b["sigma"].view(-1, 1, 1, 1, 1) * flow  # [B, 16, F, c, c]
        loss = F.mse_loss(x0, b["target"])
        _descend(opt, params, loss)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(x0_mse=f"{ema:.4f}")
        if step % recipe.checkpoint_every == 0 or step == recipe.dit_steps:
            _checkpoint(path, {"model": model, "table": table}, opt, step)
    bar.close()
    return model.eval(), table.detach()


# ---------------------------------------------------------------------------------------------
# Stage 5: export, and the whole run
# ---------------------------------------------------------------------------------------------


def export(out_dir: Path, net: TAEHV, model, table: torch.Tensor, recipe: Recipe, seconds: float, threads: int,
           config_name: str = "demo") -> None:
    """The runtime's files: safetensors in the names its loaders read, and how they were made
    (`train_seconds`: the wall time of every run on the work folder, interrupted ones too)."""
    from safetensors.torch import save_file

    from streamdiff.model.style_prompts import TABLE_KEY

    out_dir.mkdir(parents=True, exist_ok=True)
    contiguous = lambda sd: {k: v.detach().contiguous() for k, v in sd.items()}  # noqa: E731
    info = {"recipe": asdict(recipe), "config": config_name, "prompts": list(PROMPT_NAMES),
            "train_seconds": round(seconds, 1), "threads": threads, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    # Written under names of their own, then renamed: an export interrupted half way left a new
    # TAEHV beside the old DiT (with --output configs/demo, the shipped files)
    tmp = {name: out_dir / f".{name}.{os.getpid()}.tmp" for name in
           ("taehv.safetensors", "transformer.safetensors", "prompts.safetensors", "training.json")}
    try:
        save_file(contiguous(net.to(memory_format=torch.contiguous_format).state_dict()), str(tmp["taehv.safetensors"]))
        save_file(contiguous(model.state_dict()), str(tmp["transformer.safetensors"]))
        save_file({TABLE_KEY: table.contiguous()}, str(tmp["prompts.safetensors"]))
        tmp["training.json"].write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.values():  # safetensors writes 0600; the shipped files are 0644 (a server
            path.chmod(0o666 & ~_umask())  # run as another user could not read a rebuild: a probe)
        for name, path in tmp.items():
            path.replace(out_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def kernel_note(made_with: Path) -> str | None:
    """Why a rebuild will not be byte-identical to the weights whose `training.json` is
    `made_with`, where that is knowable before it starts: torch picks its CPU kernels by the
    instruction set (AVX2, AVX512, …), their float sums differ in the last bits, and training
    grows those into other weights, which can measure differently (`a photo` 18.1 to 20.0 dB
    over three builds: docs/demo.md). None when the kernels are the same, or the file says
    nothing about them."""
    try:
        theirs = json.loads(made_with.read_text()).get("cpu_capability")
    except (OSError, ValueError):
        return None
    mine = torch.backends.cpu.get_cpu_capability()
    if theirs is None or theirs == mine:
        return None
    return (f"this CPU runs torch's {mine} kernels and {made_with.parent} was made with {theirs} ones: the rebuild "
            f"will not be byte-identical, and can measure differently (docs/demo.md)")


def _add_seconds(work: Path, seconds: float) -> float:
    """Add one invocation's wall time to the work folder's total (`seconds.json`); returns it.
    A total that cannot be read is said and started again: it never stops the export."""
    path = work / "seconds.json"
    try:
        before = float(json.loads(path.read_text())["train_seconds"]) if path.exists() else 0.0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"train-demo: {path} is damaged ({first_line(exc)}); the wall-time total starts again",
              file=sys.stderr)
        before = 0.0
    total = before + seconds
    tmp = path.with_name(f"seconds.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"train_seconds": total}) + "\n")  # unrounded: a resume can take under 0.05 s
    tmp.replace(path)
    return total


def architecture(cfg: Config) -> dict:
    """What of a config decides the trained tensors (their shapes, the DiT's timesteps)."""
    return {"model": {k: v for k, v in asdict(cfg.model).items() if k not in ("dtype", "attention_backend")},
            "vae": asdict(cfg.vae), "text_max_length": cfg.text.max_length,
            "sampling": {"shift": cfg.sampling.shift, "num_train_timesteps": cfg.sampling.num_train_timesteps}}


def _flat(d: dict, prefix: str = "") -> dict:
    """A JSON object's leaves by dotted key ({"a": {"b": 1}} -> {"a.b": 1})."""
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# Stages whose result depends on --threads (they run on all of them); data does not (the teacher),
# and the decoder and the DiT run on one thread each at --threads 1 and 2 alike.
THREADED_STAGES = ("pca.pt", "vae_encoder.ckpt")
THREADED_DONE = "latents.pt"


def claim_threads(work: Path, threads: int) -> int:
    """The thread count the folder's weights are made with (`threads.json`): this run's, unless
    a stage that depends on it was begun with another and is not finished (a probe: Ctrl-C in
    the encoder at --threads 2, resumed at 1, made weights neither would); once those stages are
    done, either count finishes the run to the same weights (tested)."""
    path = work / "threads.json"
    try:
        theirs = int(json.loads(path.read_text())["threads"]) if path.exists() else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WorkError(f"{path} is damaged ({first_line(exc)}); pass another --work") from None
    begun = any((work / name).exists() for name in THREADED_STAGES)
    if theirs is not None and theirs != threads and begun:
        if (work / THREADED_DONE).exists():
            return theirs
        raise WorkError(f"{work} was started with --threads {theirs} and its pca / encoder stages are not finished "
                        f"(their weights depend on the thread count): rerun with --threads {theirs} or pass another --work")
    if theirs != threads:  # a new folder, or one whose threaded stages have not begun
        path.write_text(json.dumps({"threads": threads}) + "\n")
    return threads


def claim_work(work: Path, recipe: Recipe, arch: dict | None = None) -> None:
    """A work folder holds one run's stages (`recipe.json`: the recipe and the architecture it
    trains): resuming it with another, or over files an older trainer left without a record,
    would mix two runs' outputs into weights neither would make (a probe: --config with 3 heads
    of 32 resumed a run of 2 heads of 48, the same shapes, to rc 0)."""
    path = work / "recipe.json"
    # as JSON holds it (tuples become lists), so that it compares equal to what was written
    mine = json.loads(json.dumps({**asdict(recipe), **({"architecture": arch} if arch is not None else {})}))
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise WorkError(f"{path} is damaged ({first_line(exc)}); it records which run the folder holds: "
                            f"pass another --work") from None
        # a folder of an earlier trainer recorded the recipe only: what it lacks is taken as this run's
        theirs = {**{k: v for k, v in mine.items() if k == "architecture"}, **theirs}
        ours, recorded = _flat(mine), _flat(theirs)
        key = next((k for k in sorted(ours.keys() | recorded.keys()) if ours.get(k) != recorded.get(k)), None)
        if key is not None:
            smoke = asdict(Recipe.smoke())
            what = ("a --smoke run" if all(theirs.get(k) == v for k, v in smoke.items()) else
                    "a full run (this one is --smoke)" if all(mine.get(k) == v for k, v in smoke.items()) else
                    "a run of another config" if key.startswith("architecture.") else "a run of another recipe")
            raise WorkError(f"{work} holds {what} ({key}: {recorded.get(key)} there, {ours.get(key)} now); "
                            f"pass another --work")
        if theirs != mine:
            path.write_text(json.dumps(mine, indent=2) + "\n")
        return
    if any(work.glob("*.ckpt")) or any(work.glob("*.pt")):
        raise WorkError(f"{work} holds files of an older train-demo that recorded no recipe; pass another --work "
                        f"(its data/ folder of teacher renders can be copied over to save that stage)")
    path.write_text(json.dumps(mine, indent=2) + "\n")


class _WorkLock:
    """One train-demo at a time on a work folder (two wrote the same files: a probe's second run
    failed renaming the first's checkpoint). An flock on `WORK/.lock`, freed by the kernel when
    the process ends however it ends."""

    def __init__(self, work: Path):
        import fcntl

        self.path, self._fcntl = work / ".lock", fcntl
        self.file = open(self.path, "a+")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise WorkError(f"another train-demo (pid {pid}) is using {work}; wait for it, or pass another --work") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        self._fcntl.flock(self.file, self._fcntl.LOCK_UN)
        self.file.close()


def _decoder_process(work: str, config: str, recipe: Recipe, threads: int) -> None:
    """`stage_vae_decoder` in a child process (spawned: a fresh interpreter), from the work
    folder's finished encoder."""
    _ignore_ctrl_c()  # the parent terminates this process on Ctrl-C
    _exit_with_parent()  # and if the parent is killed outright, this one ends too (it trained on as an orphan)
    torch.set_num_threads(threads)
    cfg = load_config(config)
    data = load_data(stage_data(Path(work), recipe, threads))  # the files are there: nothing to make
    net = stage_vae_encoder(Path(work), cfg, data, recipe, stage_pca(Path(work), data, cfg.vae.z_dim))
    stage_vae_decoder(Path(work), net, data, recipe, bar_position=1)


def _decoder_beside(work: Path, config: str, recipe: Recipe, threads: int, run_dit):
    """Run the decoder stage in a child process with `threads` torch threads while `run_dit()`
    runs here; returns what `run_dit` returned once both have finished."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_decoder_process, args=(str(work), config, recipe, threads), name="train-demo: TAEHV decoder")
    with _children_deaf_to_ctrl_c():
        child.start()
    try:
        out = run_dit()
        child.join()
    finally:
        if child.is_alive():  # the DiT stage failed or was interrupted: stop the decoder too
            child.terminate()
            child.join()
    if child.exitcode != 0:
        raise WorkError(f"the TAEHV decoder stage (a child process) stopped with exit code {child.exitcode}"
                        f"{' (killed: out of memory?)' if child.exitcode == -9 else ''}; rerun to resume it")
    return out


def train_demo(work: Path, out_dir: Path, config: str = "demo", recipe: Recipe | None = None,
               threads: int = 2) -> Path:
    """Run (or resume) every stage; returns the folder with the exported weights. `threads`
    defaults to 2, as `streamdiff train-demo --threads` does.

    With two or more threads, the TAEHV decoder and the DiT (which only share the frozen
    encoder's latents) train side by side, the decoder in a child process, each on half the
    threads: on 2 CPUs one torch thread per stage is faster than two (docs/demo.md), so this
    takes the longer of the two stages instead of their sum. Either way each stage's result
    depends only on the seed and its own thread count."""
    recipe = recipe or Recipe()
    torch.set_num_threads(threads)
    cfg = load_config(config)
    check_trainable(cfg)
    work.mkdir(parents=True, exist_ok=True)
    lock = _WorkLock(work)
    try:
        claim_work(work, recipe, architecture(cfg))
        made_with = claim_threads(work, threads)
        return _train(work, out_dir, cfg, config, recipe, threads, made_with)
    finally:
        lock.release()


def check_trainable(cfg: Config) -> None:
    """train-demo trains a demo-kind model: a TAEHV both ways and a prompt table (a probe: --config
    tiny trained for its whole run into weights no config loads; wan-1.3b began a 1.3B on a CPU)."""
    wrong = [f"{key}: {value}" for key, value, want in (("vae.kind", cfg.vae.kind, "taehv"),
                                                         ("text.kind", cfg.text.kind, "styles")) if value != want]
    if wrong:
        raise WorkError(f"train-demo trains a demo-kind model (vae.kind: taehv, text.kind: styles, as "
                        f"configs/demo.yaml); config {cfg.name} has {', '.join(wrong)}")


def _train(work: Path, out_dir: Path, cfg: Config, config: str, recipe: Recipe, threads: int, made_with: int) -> Path:
    t0 = time.monotonic()
    try:
        files = stage_data(work, recipe, threads)
        data = load_data(files)
        pca = stage_pca(work, data, cfg.vae.z_dim)
        net = stage_vae_encoder(work, cfg, data, recipe, pca)
        latents = stage_latents(work, net, data)  # the encoder is final: the DiT's data

        def dit():
            return stage_dit(work, cfg, latents, recipe)

        if threads < 2:
            model, table = dit()
        else:  # the DiT here, the decoder (unless it is done) beside it
            torch.set_num_threads(threads - threads // 2)
            done = _steps_done(work / "vae.ckpt") >= recipe.vae_decoder_steps
            model, table = dit() if done else _decoder_beside(work, config, recipe, threads // 2, dit)
        net = stage_vae_decoder(work, net, data, recipe)  # trains here, or reads what the child finished
    finally:  # an interrupted run's time counts too: the next one resumes its work
        seconds = _add_seconds(work, time.monotonic() - t0)
    export(out_dir, net, model, table, recipe, seconds, made_with, cfg.name)
    return out_dir


__all__ = ["Recipe", "WorkError", "architecture", "check_trainable", "claim_work", "kernel_note", "train_demo"]
