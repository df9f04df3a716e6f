# One-off (session 15): does guidance fix the shape word's weak pull on a kept probe?
#   python benchmarks/wan_arch_probe/word_guidance.py <probe .pt> <latent gain> <g1,g2,...>
# The unconditional branch is the mean of the predictions over the six shape words (the probe never dropped
# captions, so it has no empty-prompt branch); 36 samples from pure noise, 25 Euler steps, shift 3, seed 7.
import sys, torch, numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from diffusers import WanTransformer3DModel
from conceptkit.world.factors import SHAPES
from conceptkit.world.oracle import read_image
path, k = sys.argv[1], float(sys.argv[2])
with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=wan21_shapes"])
bb = instantiate(cfg.backbone).load()
with torch.no_grad():
    ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES])[0]
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
              text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
model.load_state_dict(torch.load(path)); model.eval()
n = 36
for g in [float(a) for a in sys.argv[3].split(",")]:
    ge = torch.Generator().manual_seed(7)
    x = torch.randn((n, 16, 1, 16, 16), generator=ge)
    u = torch.linspace(1, 0, 26); shift = 3.0; sig = shift * u / (1 + (shift - 1) * u)
    with torch.no_grad():
        for a, b in zip(sig[:-1], sig[1:]):
            t = torch.full((n * 6,), float(a) * 1000.0)
            allv = model(hidden_states=x.repeat_interleave(6, 0), timestep=t, encoder_hidden_states=ctx.repeat(n, 1, 1)).sample.view(n, 6, *x.shape[1:])
            own = allv[torch.arange(n), torch.arange(n) % 6]
            v = own + (g - 1) * (own - allv.mean(1))
            x = x + (b - a) * v
        frames = bb.decode(x / k)[:, :, 0].permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    reads = [read_image(f).objects for f in frames]
    print("guidance", g, "asked", round(float(np.mean([any(o.shape == SHAPES[i % 6] for o in r) for i, r in enumerate(reads)])), 3),
          "one object", round(float(np.mean([len(r) == 1 for r in reads])), 3), [[o.shape for o in r] for r in reads[:12]], flush=True)
