# One-off probe (session 14): how much of a normalised latent is the object?
#   python benchmarks/wan_arch_probe/latent_energy.py [wan21_shapes folder]      (results: README.md here)
# 64 stills per setting, encoded by each shipped VAE into the latents the denoiser sees (noise variance 1);
# "var around batch mean" is the variance left once the stills' mean latent is taken away: with one object
# on one background, what the object's shape and position put into the latent.
import sys

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from conceptkit.world.factors import sample_scene
from conceptkit.world.render import render_scene

SIMPLIFIED = {"size": ["large"], "colour": ["red"], "pattern": ["plain"], "background_colour": ["sand"],
              "background_pattern": ["plain"]}
for backbone in ("sd15_shapes", "wan21_shapes"):
    overrides = [f"backbone={backbone}"]
    if backbone == "wan21_shapes" and len(sys.argv) > 1:
        overrides.append(f"backbone.path={sys.argv[1]}")
    with initialize_config_module("conceptkit.conf", version_base=None):
        cfg = compose("train", overrides=overrides)
    bb = instantiate(cfg.backbone).load()
    for name, allowed in (("one red object on sand", SIMPLIFIED), ("any scene", {})):
        rng = np.random.default_rng(2)
        scenes = [sample_scene(rng, n_objects=1, allowed=allowed, orientation="upright") for _ in range(64)]
        pixels = torch.from_numpy(np.stack([render_scene(s, 64) for s in scenes])).permute(0, 3, 1, 2).float()
        latents = bb.encode_media(pixels[:, :, None] / 127.5 - 1).mean
        print(backbone, name, "mean square", round((latents ** 2).mean().item(), 4),
              "var around batch mean", round(((latents - latents.mean(0)) ** 2).mean().item(), 4), flush=True)
