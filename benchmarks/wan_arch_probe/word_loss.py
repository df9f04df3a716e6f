# One-off probe (session 14): does the shape word lower the denoising loss? Per sigma, the x0 error of a
# transformer on 120 stills of the simplified world with the own word / the next shape's word / the empty prompt.
#   python benchmarks/wan_arch_probe/word_loss.py <shipped | probe weights .pt (base config, PROBE_WEIGHTS)>
import sys, torch, numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from diffusers import WanTransformer3DModel
from conceptkit.world.factors import sample_scene, SHAPES
from conceptkit.world.render import render_scene
torch.manual_seed(0)
with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=wan21_shapes"])
bb = instantiate(cfg.backbone).load()
allowed = {"size": ["large"], "colour": ["red"], "pattern": ["plain"], "background_colour": ["sand"], "background_pattern": ["plain"]}
rng = np.random.default_rng(2)
scenes = [sample_scene(rng, n_objects=1, allowed=allowed, orientation="upright") for _ in range(120)]
px = torch.from_numpy(np.stack([render_scene(s, 64) for s in scenes])).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1
lat = bb.encode_media(px).mean; y = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
with torch.no_grad():
    ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES] + [""])[0]
config = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
              text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
if sys.argv[1] == "shipped":
    model = bb.denoiser.float()
else:
    model = WanTransformer3DModel(**config); model.load_state_dict(torch.load(sys.argv[1]))
model.eval()
with torch.no_grad():
    for sigma in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        ge = torch.Generator().manual_seed(5); noise = torch.randn(lat.shape, generator=ge)
        noisy = (1 - sigma) * lat + sigma * noise; t = torch.full((len(y),), sigma * 1000.0)
        out = {}
        for name, c in (("own", ctx[y]), ("next", ctx[(y + 1) % 6]), ("empty", ctx[6].expand(len(y), -1, -1))):
            v = model(hidden_states=noisy, timestep=t, encoder_hidden_states=c).sample
            out[name] = ((noisy - sigma * v - lat) ** 2).mean().item()  # x0 error
        print(sys.argv[1][-20:], "sigma", sigma, {k: round(v, 4) for k, v in out.items()}, flush=True)
print("latent var", lat.var().item(), "per-sample var around batch mean", ((lat - lat.mean(0)) ** 2).mean().item())
