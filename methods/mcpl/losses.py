"""MCPL's regularisers as plain functions of tensors: the attention mask, the masked denoising loss,
and the prompts contrastive loss (PromptCL) with adjective positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_KINDS = ("hard", "soft", "skip")

# A finite stand-in for -inf on the similarity diagonal: an all-masked row stays finite (no NaN
# gradients through rows that are dropped later).
_EXCLUDED = -1e9


def attention_mask(word_maps: torch.Tensor, kind: str, threshold: float) -> torch.Tensor:
    """word_maps (B, 1, F, H, W): the learned words' summed cross-attention on the latent grid.
    Each sample is normalised by its own maximum; `hard` keeps positions above `threshold` (0/1),
    `soft` keeps the normalised map. The mask is detached: it says where the loss is measured and
    is not itself optimised."""
    if kind not in ("hard", "soft"):
        raise ValueError(f"attention_mask kind must be 'hard' or 'soft', got {kind!r}")
    maps = word_maps.detach().float()
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (maps.ndim - 1)))
    normalised = maps / peak
    if kind == "hard":
        return (normalised > threshold).float()
    return normalised


def masked_denoising_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between mask * prediction and mask * target, mean over every element (the official
    normalisation: the mean is not divided by the mask's area). Zero mask -> zero gradient there."""
    return F.mse_loss(prediction.float() * mask, target.float() * mask, reduction="mean")


def prompt_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over text-encoder output features (N, D) with integer labels (N,): rows with the same
    label are positives (the same learned word in other augmented views, and its bound adjectives),
    every other row a negative; a row is never compared with itself.

    For anchor i with positives P(i) and s_ij = cos(f_i, f_j) / temperature:
        l_i = mean_{p in P(i)} [ -s_ip + log sum_{j != i} exp(s_ij) ]
    averaged over the anchors that have at least one positive (zero if none has)."""
    normalised = F.normalize(features.float(), dim=-1)
    similarity = normalised @ normalised.T / temperature
    itself = torch.eye(len(labels), dtype=torch.bool, device=features.device)
    similarity = similarity.masked_fill(itself, _EXCLUDED)
    positives = (labels[:, None] == labels[None, :]) & ~itself
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        return features.sum() * 0.0
    per_anchor = -(log_prob * positives).sum(dim=1) / positives.sum(dim=1).clamp_min(1)
    return per_anchor[has_positive].mean()
