# One-off probe (session 14): along a sampling run (CFG, 25 UniPC-spaced Euler steps, flow shift 3), when does
# the predicted x0 show the asked shape? 36 stills of the simplified world's prompts.
#   python benchmarks/wan_arch_probe/trajectory.py <wan21_shapes folder> <guidance>
import sys, torch, numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from conceptkit.world.factors import SHAPES
from conceptkit.world.oracle import read_image
with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=wan21_shapes", f"backbone.path={sys.argv[1]}"])
bb = instantiate(cfg.backbone).load(); model = bb.denoiser.float().eval()
n = 36; guidance = float(sys.argv[2])
with torch.no_grad():
    ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES])[0][torch.arange(n) % 6]
    empty = bb.encode_text([""])[0].expand(n, -1, -1)
    x = torch.randn((n, 16, 1, 16, 16), generator=torch.Generator().manual_seed(7))
    u = torch.linspace(1, 0, 26); sig = 3 * u / (1 + 2 * u)
    for i, (a, b) in enumerate(zip(sig[:-1], sig[1:])):
        t = torch.full((n,), float(a) * 1000.0)
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
        v = v + (guidance - 1) * (v - model(hidden_states=x, timestep=t, encoder_hidden_states=empty).sample)
        if i % 3 == 0 or i == 24:
            x0 = x - a * v
            f = bb.decode(x0)[:, :, 0].permute(0, 2, 3, 1).mul(255).round().byte().numpy()
            reads = [read_image(im).objects for im in f]
            print(f"sigma {float(a):.3f} asked {np.mean([any(o.shape == SHAPES[j % 6] for o in r) for j, r in enumerate(reads)]):.2f}",
                  "shapes", np.unique([o.shape for r in reads for o in r], return_counts=True), flush=True)
        x = x + (b - a) * v
