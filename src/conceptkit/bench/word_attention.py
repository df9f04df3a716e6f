"""Where a base model's words look on a reference image: the share of each word's cross-attention
that falls on its own object rather than on the other objects.

MCPL ties each learned word to one object only through the backbone's cross-attention (its mask is
the union of the words' maps; PromptCL keeps the words' features apart, not their places), so where a
word's starting vector looks is what its binding starts from. shapes_multi records this share for each
word at its init word, as a diagnostic of the backbone (a weakly localised one gives ~0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from conceptkit.attention import CrossAttentionMaps, maps_on_latent_grid

# Noise levels (of 1000) the share is averaged over: the middle of the schedule, where objects form.
PROBE_TIMESTEPS = (200, 400, 600, 800)


def own_object_shares(backbone, image: np.ndarray, masks: np.ndarray, sentence: str, words: list[str],
                      site_names: list[str], seed: int = 0,
                      timesteps: tuple[int, ...] = PROBE_TIMESTEPS) -> list[float]:
    """For word k of `words` (each one vocabulary token of `sentence`), the share of its attention
    mass on object k's pixels, own / (own + other objects'): 1 = on its object only, 0.5 = no
    preference between two objects. Maps: head- and site-averaged at `site_names`, on the latent grid
    of the image's posterior mean noised at each of `timesteps` (fixed noise), frame 0."""
    if len(words) != len(masks):
        raise ValueError(f"{len(words)} words for {len(masks)} object masks")
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None, :, None] / 127.5 - 1
    latents = backbone.encode_media(pixels).mean
    if latents.ndim == 4:  # image backbones drop the frame axis
        height, width, frames = latents.shape[-2], latents.shape[-1], 1
    else:
        frames, height, width = latents.shape[-3:]
    on_grid = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], (height, width))[:, 0]
    context, tokenized = backbone.encode_text([sentence])
    ids = tokenized.input_ids[0]
    columns = []
    for word in words:
        word_ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
        if len(word_ids) != 1 or not (ids == word_ids[0]).any():
            raise ValueError(f"{word!r} is not one token of {sentence!r}")
        columns.append((ids == word_ids[0]).float())
    # One denoiser call for every noise level: row t holds the image noised at timesteps[t] (the same
    # noise for each, so the rows differ only in the level).
    noisy = [backbone.make_noisy(latents, torch.Generator().manual_seed(seed), torch.tensor([t])) for t in timesteps]
    batch = len(timesteps)
    recorder = CrossAttentionMaps(torch.stack(columns, dim=-1)[None].expand(batch, -1, -1))
    names = set(site_names)
    owner = "word_attention_probe"
    backbone.hooks.add(owner, recorder, selector=lambda site: site.name in names)
    try:
        with torch.no_grad():
            backbone.denoise(torch.cat([n.noisy for n in noisy]), torch.cat([n.timesteps for n in noisy]),
                             context.expand(batch, -1, -1))
    finally:
        backbone.hooks.remove(owner)
    maps = maps_on_latent_grid(recorder.maps, frames, height, width)[:, :, 0].cpu()  # (levels, words, h, w)
    mass = (maps.unsqueeze(2) * on_grid[None, None]).flatten(3).sum(3).sum(0)  # (words, objects), over levels
    own = mass.diagonal()
    other = mass.sum(1) - own
    return [float(o / max(o + x, 1e-12)) for o, x in zip(own, other)]
