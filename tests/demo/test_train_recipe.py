"""The demo trainer's recipe pieces that a smoke run cannot show: the TAEHV initialisation starts
every MemBlock as its skip path, the autoencoder's batches are whole streamed clips (1 + 4k
frames, some played backwards), and every other training clip is recoloured."""

from __future__ import annotations

import numpy as np
import torch

from streamdiff.demo.train import Recipe, init_taehv_, photo_clips, vae_batch
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


def test_every_other_training_clip_is_recoloured():
    recipe = Recipe(clips_per_photo=4, clip_frames=1, size=32)
    clips = photo_clips("chelsea", 1, recipe)  # [4, 1, 32, 32, 3]
    means = clips.reshape(4, -1, 3).mean(axis=1)  # [4, 3]: mean RGB per clip
    # the cat photograph is warm (red > blue); permuted and scaled channels break that in some
    # recoloured clip, never in the plain ones
    assert all(means[c, 0] > means[c, 2] for c in (0, 2))
    plain_order = [tuple(np.argsort(means[c])) for c in (0, 2)]
    assert any(tuple(np.argsort(means[c])) not in plain_order for c in (1, 3))
