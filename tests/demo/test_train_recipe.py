"""The demo trainer's recipe pieces that a smoke run cannot show: the TAEHV initialisation starts
every MemBlock as its skip path, the autoencoder's batches are whole streamed clips (1 + 4k
frames, some played backwards), every other training clip is recoloured, the encoder's target
(the scaled PCA code) groups frames as a stream's encoder does, and the decoder's block-mean
term sees colour that a per-pixel loss barely weighs, and fades out half way through."""

from __future__ import annotations

import numpy as np
import torch

from streamdiff.demo.train import Recipe, _block_means, colour_factor, init_taehv_, patch_rows, pca_code, photo_clips, stage_pca, vae_batch
from streamdiff.model.taehv import TAEHV, MemBlock


def test_init_starts_each_memblock_as_its_skip_path():
    net = init_taehv_(TAEHV(16, (8, 16, 16), (16, 16, 8, 8), blocks=2))
    blocks = [m for m in net.modules() if isinstance(m, MemBlock)]
    assert len(blocks) == 12
    x, memory = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    block = net.encoder[4]
    assert isinstance(block, MemBlock)
    # the residual branch is zero: the memory cannot change the output yet, the skip path passes x
    assert torch.equal(block(x, memory), torch.relu(block.skip(x)))
    # and the rest is He-initialised, not PyTorch's default (whose std is about 3x smaller)
    w = net.decoder[1].weight.detach()
    assert abs(float(w.std()) - (2 / w[0].numel()) ** 0.5) < 0.2 * (2 / w[0].numel()) ** 0.5


def test_vae_batches_are_whole_clips_some_backwards():
    recipe = Recipe(clips_per_photo=1, vae_batch=64, vae_crop=8, size=16, clip_frames=9)
    # one clip whose frame i is the constant i*20 in every prompt: the order shows in the batch
    clip = np.broadcast_to(np.arange(9, dtype=np.uint8)[:, None, None, None] * 20, (9, 16, 16, 3))
    data = [np.broadcast_to(clip, (1, 9, 9, 16, 16, 3))]
    x = vae_batch(data, recipe, torch.Generator().manual_seed(0))  # [B, 3, 9, 8, 8]
    assert x.shape[2] == 9  # 1 + 4k frames: the later latents run on the memory of earlier ones
    # recolouring scales channels, so read the order from the sign of the frame-to-frame change
    order = torch.sign(x[:, :, 1:].mean(dim=(1, 3, 4)) - x[:, :, :-1].mean(dim=(1, 3, 4)))  # [B, 8]
    forward = (order > 0).all(dim=1)
    backward = (order < 0).all(dim=1)
    assert bool((forward | backward).all())
    assert 10 < int(backward.sum()) < 54  # about half are played backwards


def test_the_decoder_crop_reaches_every_position_of_the_picture():
    """`vae_batch(..., crop=c)` cuts c-pixel windows anywhere in the picture (column 0 to
    size - c), not only where the encoder's larger crop fits."""
    recipe = Recipe(clips_per_photo=1, vae_batch=64, vae_crop=8, size=16, clip_frames=9)
    # pixel value 12 x its column: a window's mean over its span gives its first column
    # (both scale with the recolouring gain, and mirroring keeps them)
    cols = (np.arange(16, dtype=np.uint8) * 12)[None, None, :, None]
    data = [np.ascontiguousarray(np.broadcast_to(cols, (1, 9, 9, 16, 16, 3)))]
    x = vae_batch(data, recipe, torch.Generator().manual_seed(0), crop=4)
    assert x.shape == (64, 3, 9, 4, 4)
    px = (x + 1) * 127.5  # back to pixel values
    per_col = px.mean(dim=(2, 3))  # [B, 3, 4]: each channel's value per column of the window
    span = per_col.amax(dim=2) - per_col.amin(dim=2)  # 3 columns x 12 x gain
    first = (3 * per_col.mean(dim=2) / span - 1.5).mean(dim=1).round().long()
    assert bool(((first >= 0) & (first <= 12)).all())
    assert int(first.max()) > 8  # beyond where an 8-pixel crop can start
    assert len(set(first.tolist())) >= 8  # positions spread over the picture


def test_every_other_training_clip_is_recoloured():
    recipe = Recipe(clips_per_photo=4, clip_frames=1, size=32)
    clips = photo_clips("chelsea", 1, recipe)  # [4, 1, 32, 32, 3]
    means = clips.reshape(4, -1, 3).mean(axis=1)  # [4, 3]: mean RGB per clip
    # the cat photograph is warm (red > blue); permuted and scaled channels break that in some
    # recoloured clip, never in the plain ones
    assert all(means[c, 0] > means[c, 2] for c in (0, 2))
    plain_order = [tuple(np.argsort(means[c])) for c in (0, 2)]
    assert any(tuple(np.argsort(means[c])) not in plain_order for c in (1, 3))


def test_pca_code_reads_each_latent_pixels_own_frames_and_patch():
    # a "PCA" that picks single patch entries: (time, y, x, RGB) -> column (t*64 + y*8 + x)*3 + c
    picks = [(0, 0, 0, 0), (3, 7, 0, 2), (1, 2, 5, 1), (2, 6, 3, 0)]
    basis = torch.zeros(768, len(picks))
    for j, (t, y, x, c) in enumerate(picks):
        basis[((t * 8 + y) * 8 + x) * 3 + c, j] = 1.0
    var = torch.tensor([16.0, 1.0, 81.0, 0.0625])
    pca = {"mean": torch.zeros(768), "basis": basis, "var": var}
    clip = torch.rand(2, 3, 9, 16, 24) * 2 - 1  # [B, 3, 1 + 4*2, H, W]
    code = pca_code(clip, pca, 0.5)  # [B, C, 3, 2, 3]
    assert code.shape == (2, len(picks), 3, 2, 3)
    for j, (t, y, x, c) in enumerate(picks):
        gain = 0.5 / float(var[j]) ** 0.25  # 0.25, 0.5, 1/6, 1
        for k in range(3):  # latent 0 is frame 0 alone (front-padded); latent k >= 1 is frames 4k-3..4k
            frame = 0 if k == 0 else 4 * k - 3 + t
            for i in range(2):
                for w in range(3):
                    assert torch.allclose(code[:, j, k, i, w], gain * clip[:, c, frame, 8 * i + y, 8 * w + x])


def test_stage_pca_finds_the_training_patches_main_directions(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (2, 1, 9, 16, 16, 3)).astype(np.float32)
    data = [np.clip(base + rng.normal(0, 20, (2, 3, 9, 16, 16, 3)), 0, 255).astype(np.uint8)]  # [clips, prompts, ...]
    pca = stage_pca(tmp_path, data, 6)
    assert (tmp_path / "pca.pt").exists()
    assert torch.all(pca["var"][:-1] >= pca["var"][1:]) and torch.all(pca["var"] > 0)  # descending
    assert torch.allclose(pca["basis"].T @ pca["basis"], torch.eye(6), atol=1e-4)  # orthonormal
    rows = torch.cat([patch_rows(data[0][c, p]) for c in range(2) for p in range(3)])  # [N, 768]
    assert rows.shape == (2 * 3 * 2 * 2 * 2, 768)
    proj = (rows - pca["mean"]) @ pca["basis"]  # each component's variance over the patches is its eigenvalue
    assert torch.allclose(proj.var(0, unbiased=False), pca["var"], rtol=1e-3)
    assert torch.equal(stage_pca(tmp_path, [], 6)["var"], pca["var"])  # resumed from the file
    # the encoder's target reads the patches in the order the components were fitted in
    clip = data[0][1, 2]  # [9, 16, 16, 3]
    code = pca_code(torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1, pca, 1.0)  # [1, 6, 3, 2, 2]
    want = ((patch_rows(clip) - pca["mean"]) @ pca["basis"]) / pca["var"].pow(0.25)  # [2*2*2, 6], latents 1..2
    torch.testing.assert_close(code[0, :, 1:].permute(1, 2, 3, 0).reshape(-1, 6), want, atol=1e-4, rtol=1e-4)


def test_block_means_weigh_colour_that_pixels_barely_do():
    # a grey clip against the same clip with a faint colour cast plus strong grey noise: per
    # pixel the noise dominates the error, in 8x8 block means the cast does
    gen = torch.Generator().manual_seed(0)
    grey = torch.rand(1, 1, 5, 16, 16, generator=gen).expand(1, 3, 5, 16, 16)
    cast = torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1, 1)
    noise = 0.5 * torch.randn(1, 1, 5, 16, 16, generator=gen).expand(1, 3, 5, 16, 16)
    err_pixels = torch.nn.functional.mse_loss(grey + noise, grey)
    cast_pixels = torch.nn.functional.mse_loss(grey + cast, grey)
    err_blocks = torch.nn.functional.mse_loss(_block_means(grey + noise), _block_means(grey))
    cast_blocks = torch.nn.functional.mse_loss(_block_means(grey + cast), _block_means(grey))
    assert _block_means(grey).shape == (1, 3, 5, 2, 2)
    assert cast_pixels < 0.1 * err_pixels and cast_blocks > err_blocks


def test_colour_terms_fade_to_their_floor_half_way_through_the_decoder_stage():
    recipe = Recipe(vae_decoder_steps=1000, vae_colour_fade=0.5, vae_colour_floor=0.1)
    weights = [colour_factor(step, recipe) for step in range(1000)]
    assert weights[0] == 1.0 and abs(weights[250] - 0.5) < 1e-9
    assert all(a >= b for a, b in zip(weights, weights[1:]))  # never grows back
    assert weights[450] == 0.1 and min(weights) == 0.1 and set(weights[500:]) == {0.1}  # the floor to the end
    assert Recipe().vae_colour_floor > 0  # the shipped recipe keeps the colour terms on
    none = Recipe(vae_decoder_steps=1000, vae_colour_fade=0.5, vae_colour_floor=0.0)
    assert colour_factor(500, none) == 0.0  # no floor: plain MSE from half way
    assert colour_factor(0, Recipe(vae_colour_fade=0.0, vae_colour_floor=0.0)) == 0.0  # plain MSE throughout


def test_a_rebuild_on_other_cpu_kernels_says_it_will_not_be_byte_identical(tmp_path, monkeypatch):
    from streamdiff.demo.train import kernel_note

    made = tmp_path / "training.json"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    made.write_text('{"cpu_capability": "AVX2"}')
    note = kernel_note(made)
    assert "AVX512 kernels" in note and "AVX2 ones" in note and "will not be byte-identical" in note
    made.write_text('{"cpu_capability": "AVX512"}')
    assert kernel_note(made) is None  # the same kernels: nothing to say
    made.write_text('{"torch": "2.13.0+cpu"}')
    assert kernel_note(made) is None  # weights that did not record their kernels
    assert kernel_note(tmp_path / "missing.json") is None


def test_vae_batches_mix_source_and_styled_clips_mirrored_and_recoloured():
    """2 in 5 clips of a batch are source clips, the rest styled; half are mirrored; 4 in 5 get
    their channels permuted and scaled."""
    recipe = Recipe(clips_per_photo=1, vae_batch=400, vae_crop=8, size=16, clip_frames=9)
    ramp = 40 + 10 * np.arange(16, dtype=np.uint8)  # 40 .. 190: times 1.2 at most still a pixel value
    data = np.empty((1, 9, 9, 16, 16, 3), np.uint8)  # grey frames
    data[0, 0] = ramp[None, None, :, None]  # the source varies along x
    data[0, 1:] = ramp[None, None, :, None, None]  # the styled prompts along y
    x = vae_batch([data], recipe, torch.Generator().manual_seed(0))  # [B, 3, 9, 8, 8]
    dx = (x[..., 1:] - x[..., :-1]).mean(dim=(1, 2, 3, 4))  # [B]
    dy = (x[..., 1:, :] - x[..., :-1, :]).mean(dim=(1, 2, 3, 4))
    source = dx.abs() > 0.01
    assert bool((source ^ (dy.abs() > 0.01)).all())  # each clip is one prompt's
    assert 0.3 < float(source.float().mean()) < 0.5
    assert 0.35 < float((dx[source] < 0).float().mean()) < 0.65  # mirrored: x runs the other way
    recoloured = (x - x.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2, 3, 4)) > 0.01  # channels differ
    assert 0.7 < float(recoloured.float().mean()) < 0.9


def test_every_photograph_gets_camera_motions_of_its_own():
    """The clips are seeded by (seed, photograph, clip): two photographs do not share one set of
    pans and zooms, and the same index always makes the same clips (a rebuild's data)."""
    recipe = Recipe(clips_per_photo=2, clip_frames=3, size=32)
    first = photo_clips("chelsea", 0, recipe)
    assert np.array_equal(photo_clips("chelsea", 0, recipe), first)
    assert not np.array_equal(photo_clips("chelsea", 1, recipe), first)


def test_clips_of_a_wide_photograph_keep_square_pixels():
    """make_clip scales x and y alike: on a photograph twice as wide as high, one output pixel
    covers as many photograph pixels across as down."""
    from streamdiff.demo.data import make_clip

    photo = np.zeros((100, 200, 3), np.uint8)
    photo[..., 0] = np.arange(200)[None, :]  # red: the photograph's column
    photo[..., 1] = 2 * np.arange(100)[:, None]  # green: twice its row
    for seed in range(3):
        clip = make_clip(photo, 2, 64, np.random.default_rng(seed), speed_px=0).astype(np.float32)
        across = np.abs(np.diff(clip[0, :, :, 0], axis=1)).mean()  # photograph columns per output pixel
        down = np.abs(np.diff(clip[0, :, :, 1], axis=0)).mean() / 2  # photograph rows per output pixel
        assert 0.8 < across / down < 1.25, (seed, across, down)
