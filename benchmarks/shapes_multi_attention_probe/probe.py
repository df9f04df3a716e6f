"""Where do the base model's shape words look on shapes_multi's two-object references? (one-off probe)

For each pair: the reference image (as the suite writes it), its sentence with each marked word replaced
by its init word (the object's shape word, as the suite initialises MCPL), noised at several timesteps
(fixed noise), one denoiser call with cross-attention maps captured at MCPL's default mask sites. Per
word: the share of its map's mass on its OWN object's pixels against the other object's
(own / (own + other); 0.5 = no preference), and the map's min/max ratio (how much a 0.3 threshold keeps).

python benchmarks/shapes_multi_attention_probe/probe.py [backbone_folder] [pairs]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def object_masks(scene, resolution):
    from dataclasses import replace

    from conceptkit.world.render import render_scene

    empty = render_scene(replace(scene, objects=[], motions=None), resolution).astype(int)
    masks = []
    for obj in scene.objects:
        alone = render_scene(replace(scene, objects=[obj], motions=None), resolution).astype(int)
        masks.append(np.abs(alone - empty).sum(-1) > 0)
    return masks


def main():
    from hydra.utils import instantiate

    from conceptkit.attention import CrossAttentionMaps, maps_on_latent_grid
    from conceptkit.config import compose
    from conceptkit.methods.mcpl import default_mask_sites
    from conceptkit.world.factors import HELDOUT_COMBOS, TOY_ORIENTATION, sample_scene

    folder = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    overrides = ["backbone=sd15_shapes"] + ([f"backbone.path={folder}"] if folder else [])
    backbone = instantiate(compose("train", overrides).backbone).load()
    cross = [s for s in backbone.attention_sites() if s.kind == "cross"]
    site_sets = {"mask_sites": set(default_mask_sites(cross)), "all_cross": {s.name for s in cross}}
    timesteps = [200, 400, 600, 800]
    results = []
    for i in range(pairs):
        combos = [tuple(c) for c in HELDOUT_COMBOS[2 * i:2 * i + 2]]
        rng = np.random.default_rng(0 + i)  # the suite's seed + i
        for _ in range(1000):
            scene = sample_scene(rng, n_objects=2, split="heldout", allowed={"size": ["large"]},
                                 orientation=TOY_ORIENTATION)
            if sorted(o.combo for o in scene.objects) == sorted(combos):
                break
        from conceptkit.world.render import render_scene
        image = render_scene(scene, backbone.resolution)
        masks = object_masks(scene, backbone.resolution)
        words = [o.shape for o in scene.objects]
        sentence = f"a photo of a {words[0]} and a {words[1]} on a {scene.background.colour} background"
        pixels = torch.from_numpy(image).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1
        latents = backbone.encode_media(pixels).mean
        h, w = latents.shape[-2:]
        lat_masks = [F.adaptive_avg_pool2d(torch.from_numpy(m).float()[None, None], (h, w))[0, 0] for m in masks]
        context, tokenized = backbone.encode_text([sentence])
        ids = tokenized.input_ids[0]
        word_ids = [backbone.tokenizer(wd, add_special_tokens=False).input_ids[0] for wd in words]
        columns = torch.stack([(ids == wid).float() for wid in word_ids], dim=-1)[None]  # (1, L, 2)
        row = {"pair": i, "sentence": sentence, "objects": [list(o.combo) for o in scene.objects], "sites": {}}
        for set_name, names in site_sets.items():
            per_t = {}
            for t in timesteps:
                gen = torch.Generator().manual_seed(1234)
                noisy = backbone.make_noisy(latents, gen, torch.tensor([t]))
                recorder = CrossAttentionMaps(columns)
                backbone.hooks.add("probe", recorder, selector=lambda site: site.name in names)
                with torch.no_grad():
                    backbone.denoise(noisy.noisy, noisy.timesteps, context)
                backbone.hooks.remove("probe")
                maps = maps_on_latent_grid(recorder.maps, 1, h, w)[0, :, 0]  # (2, h, w)
                shares, minmax = [], []
                for k in range(2):
                    own = float((maps[k] * lat_masks[k]).sum())
                    other = float((maps[k] * lat_masks[1 - k]).sum())
                    shares.append(round(own / max(own + other, 1e-12), 3))
                    minmax.append(round(float(maps[k].min() / maps[k].max()), 3))
                summed = maps.sum(0)
                summed = (summed - summed.min()) / (summed.max() - summed.min() + 1e-12)
                per_t[t] = {"own_share": shares, "min_over_max": minmax,
                            "kept_at_0.3": round(float((summed > 0.3).float().mean()), 3),
                            "kept_at_0.6": round(float((summed > 0.6).float().mean()), 3)}
            row["sites"][set_name] = per_t
        results.append(row)
        print(json.dumps(row))
    return results


if __name__ == "__main__":
    main()
