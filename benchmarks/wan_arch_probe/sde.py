# One-off probe (session 14): does a stochastic sampler (fresh noise each step, eta 1 or 0.5) draw the asked
# shape where the ODE does not? 36 stills of the simplified world's prompts.
#   python benchmarks/wan_arch_probe/sde.py <wan21_shapes folder>
import sys, torch, numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from conceptkit.world.factors import SHAPES
from conceptkit.world.oracle import read_image
with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=wan21_shapes", f"backbone.path={sys.argv[1]}"])
bb = instantiate(cfg.backbone).load(); model = bb.denoiser.float().eval()
n = 36
with torch.no_grad():
    ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES])[0][torch.arange(n) % 6]
    empty = bb.encode_text([""])[0].expand(n, -1, -1)
    for guidance, steps, eta in ((5, 25, 1.0), (5, 50, 1.0), (5, 50, 0.5), (1, 50, 1.0)):
        g = torch.Generator().manual_seed(7)
        x = torch.randn((n, 16, 1, 16, 16), generator=g)
        u = torch.linspace(1, 0, steps + 1); sig = 3 * u / (1 + 2 * u)
        for a, b in zip(sig[:-1], sig[1:]):
            t = torch.full((n,), float(a) * 1000.0)
            v = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
            if guidance != 1:
                v = v + (guidance - 1) * (v - model(hidden_states=x, timestep=t, encoder_hidden_states=empty).sample)
            x0 = x - a * v; eps = (x - (1 - a) * x0) / a
            # eta=1: fresh noise each step (ancestral); eta<1 mixes the predicted noise back in
            fresh = torch.randn(x.shape, generator=g)
            mixed = (eta ** 0.5) * fresh + ((1 - eta) ** 0.5) * eps
            x = (1 - b) * x0 + b * mixed
        f = bb.decode(x)[:, :, 0].permute(0, 2, 3, 1).mul(255).round().byte().numpy()
        reads = [read_image(im).objects for im in f]
        print("guidance", guidance, "steps", steps, "eta", eta, "asked", round(float(np.mean([any(o.shape == SHAPES[j % 6] for o in r) for j, r in enumerate(reads)])), 2),
              "one object", round(float(np.mean([len(r) == 1 for r in reads])), 2), np.unique([o.shape for r in reads for o in r], return_counts=True), flush=True)
