# One-off probe (session 13): how far does the shape word reach the shipped wan21_shapes transformer?
#   python benchmarks/wan_arch_probe/text_path.py        (results: README.md here, "A first look at the text path")
# Prints the mean cosine between the six shape prompts' UMT5 states at each position, and, on 24 stills of one
# large red plain object on sand noised to sigma (the same noise), how far the one-step x0 moves when the
# shape word is swapped, or the whole prompt emptied, relative to that x0's own error.
import torch, numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from conceptkit.world.factors import sample_scene, SHAPES
from conceptkit.world.render import render_scene

with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=wan21_shapes"])
bb = instantiate(cfg.backbone).load()
allowed = {"size": ["large"], "colour": ["red"], "pattern": ["plain"], "background_colour": ["sand"],
           "background_pattern": ["plain"]}
rng = np.random.default_rng(3)
scenes = [sample_scene(rng, n_objects=1, allowed=allowed, orientation="upright") for _ in range(24)]
px = torch.from_numpy(np.stack([render_scene(s, 64) for s in scenes])).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1
latents = bb.encode_media(px).mean
y = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
with torch.no_grad():
    ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES])[0]
    cosine = torch.nn.functional.cosine_similarity(ctx[:, None], ctx[None], dim=-1).mean((0, 1))
    print("mean cosine between the shape prompts, per position (first 10):", cosine[:10].numpy().round(2))
    empty = bb.encode_text([""] * 24)[0]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    for sigma in (0.2, 0.4, 0.6, 0.8, 0.95):
        noisy = (1 - sigma) * latents + sigma * noise
        t = torch.full((24,), sigma * 1000.0)
        x0 = {name: noisy - sigma * bb.denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=c).sample
              for name, c in (("own", ctx[y]), ("other", ctx[(y + 1) % 6]), ("empty", empty))}
        error = (x0["own"] - latents).norm()
        print(f"sigma {sigma}: shape word swapped {((x0['own'] - x0['other']).norm() / error).item():.3f}, "
              f"prompt emptied {((x0['own'] - x0['empty']).norm() / error).item():.3f} (of the x0 error)")
