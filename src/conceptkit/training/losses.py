"""Losses as plain functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the denoiser's prediction and its target (eps, v or flow velocity), mean over all."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
