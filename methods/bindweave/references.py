"""BindWeave's reference canvases: what the CLIP, VAE and MLLM streams see of each reference.

Every stream sees the same canvas, a picture of the video's size holding the subject (official code):
  - inference: the reference letterboxed on black, never upscaled; its mask is the pasted rectangle
  - training: the subject cut from the clip's annotated frame (its box; outside its mask white), rotated
    by a whole number of degrees in [-45, 45) (bicubic, the canvas grown to hold it, new corners
    transparent), scaled by exp(U(-1.5, 1.5)) but never past the canvas (so it may grow), centred on
    black; its mask is where the pasted subject is opaque (alpha > 127)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from conceptkit.backbones.video_condition import letterbox


def inference_canvas(picture: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return letterbox(picture, height, width)


def training_canvas(image: np.ndarray, mask: np.ndarray, height: int, width: int, generator: torch.Generator,
                    rotation: int = 45, log_scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """((3, H, W) in [-1, 1], (H, W) float mask) of one subject, augmented as above from `generator`."""
    from PIL import Image

    rows, columns = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    cut = np.where(mask[..., None], image, np.uint8(255))[top:bottom, left:right]
    alpha = (mask[top:bottom, left:right] * 255).astype(np.uint8)
    subject = Image.fromarray(np.dstack([cut, alpha]), mode="RGBA")
    if rotation:
        angle = int(torch.randint(0, 2 * rotation, (), generator=generator)) - rotation
        subject = subject.rotate(angle, resample=Image.BICUBIC, expand=True)
    scale = math.exp(float(torch.empty(()).uniform_(-log_scale, log_scale, generator=generator)))
    scale = min(scale, height / subject.height, width / subject.width)
    size = (max(1, round(subject.width * scale)), max(1, round(subject.height * scale)))
    subject = subject.resize(size, Image.LANCZOS)
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    canvas.paste(subject, ((width - subject.width) // 2, (height - subject.height) // 2))
    rgba = np.asarray(canvas)
    # The pasted subject over black: transparent pixels are black, as the official padding.
    rgb = np.where(rgba[..., 3:] > 0, rgba[..., :3], 0).astype(np.float32)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1
    return pixels, torch.from_numpy((rgba[..., 3] > 127).astype(np.float32))
