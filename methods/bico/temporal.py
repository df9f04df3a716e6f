"""Temporal disentanglement's stage-1 data: a video concept's clips taken apart into frames, each frame
a training image of its own (the official code extracts every frame of the 81-frame clip and trains
on them as images before it trains on the clip).

The frames are the ones the clip itself is made of (`data.frames` frames per clip, chosen by
conceptkit.data), each encoded by the backbone's VAE alone, as a one-frame video: exactly how an
image concept's images are encoded, so stage 1 sees what an image concept sees.
"""

from __future__ import annotations

import torch

from conceptkit.errors import UserError
from conceptkit.method import TrainingData


def frame_pixels(data: TrainingData) -> torch.Tensor:
    """(N * F, 3, 1, H, W): clip n's frame k at row n * F + k."""
    if data.pixels is None:
        raise UserError("BiCo's temporal disentanglement trains a clip's frames as images and needs the clip's "
                        "pixels, which this training data lacks (build it with conceptkit.training.run.prepare_data), "
                        "or set method.temporal_disentanglement=false")
    n, channels, frames, height, width = data.pixels.shape
    return data.pixels.permute(0, 2, 1, 3, 4).reshape(n * frames, channels, 1, height, width)


def frames_as_images(backbone, data: TrainingData) -> TrainingData:
    """The clips of `data` as one-frame items: names `<clip>#<k>`, each frame with its clip's caption."""
    latents = backbone.encode_media(frame_pixels(data))
    frames = data.frames
    return TrainingData(latents=latents, captions=[c for c in data.captions for _ in range(frames)],
                        names=[f"{name}#{k}" for name in data.names for k in range(frames)], frames=1)


def frame_images(data: TrainingData) -> list:
    """Every frame as a PIL image (what the VLM looks at to write that frame's prompt)."""
    from PIL import Image

    pixels = ((frame_pixels(data)[:, :, 0] + 1) * 127.5).clamp(0, 255).round().byte()
    return [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in pixels]
