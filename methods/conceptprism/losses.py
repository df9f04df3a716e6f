"""ConceptPrism's own losses, as plain functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exclusion_loss(residual_prediction: torch.Tensor, null_prediction: torch.Tensor) -> torch.Tensor:
    """The cross-image exclusion: a residual token of image i, applied to another image j, should
    predict what the null prompt predicts there. The null prediction is a fixed target
    (stop-gradient), so only the residual side moves."""
    return F.mse_loss(residual_prediction.float(), null_prediction.detach().float(), reduction="mean")


def sample_others(index: int, count: int, k: int, generator: torch.Generator) -> list[int]:
    """k distinct images j != index, drawn without replacement (the exclusion loss's anchors)."""
    others = [j for j in range(count) if j != index]
    if not others:
        raise ValueError("the exclusion loss needs at least 2 images (j != i)")
    k = min(k, len(others))
    order = torch.randperm(len(others), generator=generator)[:k]
    return [others[int(o)] for o in order]
