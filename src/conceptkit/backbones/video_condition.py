"""What an image-to-video denoiser (Wan2.1-I2V, `wan21_i2v`) sees beside the text context.

Wan2.1-I2V takes 36 input channels: 16 noisy latent channels, then a 20-channel condition (a 4-channel
mask block, then 16 VAE latent channels), and a second context of CLIP image rows placed before the
text rows, of which the first `image_rows` go through the image K/V projections (add_k_proj /
add_v_proj) and the rest through the text ones. A method (BindWeave) that conditions the backbone this
way sets a `VideoCondition` on it (`Backbone.set_condition`); the backbone then builds every denoiser
input from it: reference slot frames before the video's latent frames (their noisy input is zeros, and
the denoiser's output there is dropped: samplers and losses see only the video frames, as BindWeave's
official DiT does), the video part's condition (the VAE latents of an all-zero video with a zero mask),
the image context (zero-padded rows go through Wan's image embedder too), and rows a method puts
before each prompt's text rows (BindWeave's MLLM states), padded to one length per batch with the
padded keys masked out of attention (`ContextKeyPadding`), so rows of different lengths share one
denoiser call and still attend exactly as if each ran alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

MASK_CHANNELS = 4  # Wan2.1-I2V's mask block: the first pixel frame's mask over the VAE's 4-frame stride


@dataclass
class VideoCondition:
    """Set by the method that owns it; row counts are 1 (shared by every row) or the batch's."""

    # (Bc, S, 4 + z, h, w): each reference slot's mask block and VAE latents (all zero for an unused
    # slot), S slot frames that sit before the video's latent frames
    slot_latents: torch.Tensor
    # (Bc, L_img, image_dim): the image context rows (CLIP hidden states), before the text rows
    image_context: torch.Tensor
    # (texts, unconditional flags) -> one (L_i, text_dim) tensor per text, put before its T5 rows (None:
    # no such rows); the flags say which texts are the negative rows of a guided batch
    text_prefix: Callable[[list[str], list[bool]], list[torch.Tensor]] | None = None

    @property
    def slots(self) -> int:
        return self.slot_latents.shape[1]


def rows_for(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A condition tensor of Bc rows for a batch of `batch` rows: shared (Bc = 1), per row (Bc = batch),
    or per prompt of a guided batch [negative rows | prompt rows] (batch = 2 Bc: both halves see the
    same references)."""
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if rows == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if batch == 2 * rows:
        return torch.cat([tensor, tensor])
    raise ValueError(f"a condition of {rows} rows cannot serve a batch of {batch}")


class ContextKeyPadding:
    """A `logit_bias` hook (conceptkit.attention): text-attention keys that are padding get -inf.

    `valid` (B, K) bool over the keys of the text attention (the context after the image split). Set
    per call by the backbone; None or all-valid adds nothing (the fast path stays unmasked)."""

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None

    def logit_bias(self, site, batch: int, queries: int, keys: int):
        valid = self.valid
        if valid is None or tuple(valid.shape) != (batch, keys) or bool(valid.all()):
            return None
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        return bias.masked_fill(~valid, float("-inf"))[:, None, None, :]  # (B, 1, 1, K)


def letterbox(picture: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference on a black (height, width) canvas, centred, scaled down to fit and never up (BindWeave's
    inference): ((3, H, W) in [-1, 1], (H, W) mask of the pasted rectangle)."""
    image = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    h, w = image.shape[1:]
    scale = min(1.0, height / h, width / w)
    if scale < 1.0:
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    canvas = torch.full((3, height, width), -1.0)
    mask = torch.zeros(height, width)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[:, top:top + h, left:left + w] = image.clamp(-1, 1)
    mask[top:top + h, left:left + w] = 1.0
    return canvas, mask


def canvas_picture(canvas: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """A canvas back as an (H, W, 3) uint8 picture, optionally resized (BindWeave's MLLM sees it at half size)."""
    from PIL import Image

    picture = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    if scale == 1.0:
        return picture
    height, width = picture.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
