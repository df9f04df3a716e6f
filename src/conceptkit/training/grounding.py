"""Token grounding for toy-backbone pretraining: each object word's cross-attention on its object.

Real Stable Diffusion puts a noun's cross-attention on that noun's object (what Prompt-to-Prompt,
Attend-and-Excite and MCPL's masks and binding rely on). It learns that from web-scale captions; the
ShapeWorld toys, trained for minutes on a CPU, do not: measured on sd15_shapes release 4, a shape word
in a two-object sentence puts 0.49-0.55 of its attention on its own object at every cross-attention
site (0.5 = no preference). The world knows each object's pixels, so pretraining can teach it
directly, as TokenCompose (Wang et al., CVPR 2024, arXiv 2312.03626) does for SD with segmentation
masks: its token loss, per grounded token, (1 - attention mass inside the object / total mass)^2,
averaged. TokenCompose grounds nouns; here every word that names exactly one object of the scene
(its shape, colour, pattern and size words, when no other object shares them) is grounded, since an
adjective's attention also lands on its object in SD (MCPL's adjective binding assumes it).
TokenCompose's pixel-level BCE term is not used (ours: the token term alone is what localises).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def object_word_positions(scene, input_ids: torch.Tensor, tokenizer) -> list[tuple[int, int]]:
    """(token position, object index) for each word of `input_ids` (one caption) that names exactly one
    object of `scene`: the object's shape, colour, pattern or size word when no other object has it and
    it occurs once in the caption. "plain" is never grounded (backgrounds are "plain" too)."""
    words_of = []
    for obj in scene.objects:
        words = {obj.shape, obj.colour, obj.size}
        if obj.pattern != "plain":
            words.add(obj.pattern)
        words_of.append(words)
    positions = []
    ids = input_ids.tolist()
    for k, words in enumerate(words_of):
        others = set().union(*(w for j, w in enumerate(words_of) if j != k))
        for word in sorted(words - others):
            token = tokenizer(word, add_special_tokens=False).input_ids
            if len(token) != 1 or ids.count(token[0]) != 1:
                continue  # split by the tokenizer, absent (caption dropped or cut) or ambiguous
            positions.append((ids.index(token[0]), k))
    return positions


class GradientAttentionMaps:
    """A `probabilities` hook that keeps the head-averaged cross-attention probabilities (B, Q, K) of
    each call it observes, WITH their graph, so a loss on them trains the denoiser and text encoder
    (conceptkit.attention.CrossAttentionMaps keeps detached maps for methods that only look)."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def probabilities(self, site, probs: torch.Tensor) -> None:
        self.maps.append(probs.float().mean(dim=1))


def token_grounding_loss(maps: list[torch.Tensor], positions: list[list[tuple[int, int]]],
                         masks: list[np.ndarray]) -> torch.Tensor | None:
    """TokenCompose's token loss averaged over sites and grounded tokens. `maps`: per site (B, Q, K)
    on a square grid of Q queries (one image each); `positions[b]`: the (token, object) pairs of row b;
    `masks[b]`: (objects, H, W) bool pixel masks of row b's scene. None when no row has a grounded token."""
    rows = [b for b, p in enumerate(positions) if p]
    if not rows:
        return None
    losses = []
    for probs in maps:
        side = math.isqrt(probs.shape[1])
        if side * side != probs.shape[1]:
            raise ValueError(f"token grounding needs square single-frame maps, got {probs.shape[1]} queries")
        for b in rows:
            objects = torch.from_numpy(masks[b]).float()[:, None]  # (N, 1, H, W)
            on_grid = F.adaptive_avg_pool2d(objects, (side, side)).flatten(1).to(probs.device)  # (N, Q)
            tokens = torch.tensor([t for t, _ in positions[b]], device=probs.device)
            owners = torch.tensor([k for _, k in positions[b]], device=probs.device)
            attention = probs[b][:, tokens].T  # (T, Q): each grounded token's map
            inside = (attention * on_grid[owners]).sum(1) / attention.sum(1).clamp_min(1e-12)
            losses.append((1.0 - inside) ** 2)
    return torch.cat(losses).mean()
