# One-off probe (session 6): can the sd15_shapes UNet learn word -> outline on a simplified world?
# python benchmarks/shapes_arch_probe/probe.py <base|xattn16> <steps>   (results: README.md here)
import sys, time, torch, numpy as np, torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from diffusers import UNet2DConditionModel
from conceptkit.world.factors import sample_scene, SHAPES
from conceptkit.world.render import render_scene
from conceptkit.world.oracle import read_image
variant, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=sd15_shapes"])
bb = instantiate(cfg.backbone).load()
allowed = {"size": ["large"], "colour": ["red"], "pattern": ["plain"], "background_colour": ["sand"], "background_pattern": ["plain"]}
def make(n, seed):
    rng = np.random.default_rng(seed); sc = [sample_scene(rng, n_objects=1, allowed=allowed, orientation="upright") for _ in range(n)]
    px = torch.from_numpy(np.stack([render_scene(s, 64) for s in sc])).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1
    return sc, bb.encode_media(px).mean, torch.tensor([SHAPES.index(s.objects[0].shape) for s in sc])
t0 = time.time(); train_sc, train_lat, train_y = make(3000, 1); test_sc, test_lat, test_y = make(60, 2)
with torch.no_grad(): ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES])[0]
print("data", round(time.time() - t0), "s", flush=True)
cross = variant == "xattn16"
unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
    down_block_types=(("CrossAttnDownBlock2D" if cross else "DownBlock2D"), "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", ("CrossAttnUpBlock2D" if cross else "UpBlock2D")),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0)
g = torch.Generator().manual_seed(0); sched = bb.train_scheduler
t0 = time.time()
for step in range(steps):
    idx = torch.randint(0, len(train_y), (32,), generator=g)
    nb = bb.make_noisy(train_lat[idx], g)
    loss = F.mse_loss(unet(nb.noisy, nb.timesteps, encoder_hidden_states=ctx[train_y[idx]]).sample, nb.target)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
    if step % 100 == 0: print(step, round(loss.item(), 4), round(time.time() - t0), "s", flush=True)
print("train", round(time.time() - t0), "s", flush=True)
@torch.no_grad()
def acc(t, wrong=False):
    ge = torch.Generator().manual_seed(5); ts = torch.full((60,), t)
    noise = torch.randn(test_lat.shape, generator=ge); noisy = sched.add_noise(test_lat, noise, ts)
    y = (test_y + 1) % 6 if wrong else test_y
    v = unet(noisy, ts, encoder_hidden_states=ctx[y]).sample
    ab = sched.alphas_cumprod[t]; x0 = ab.sqrt() * noisy - (1 - ab).sqrt() * v
    imgs = bb.decode(x0)[:, :, 0].permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    return np.mean([any(o.shape == SHAPES[int(y[i])] for o in read_image(im).objects) for i, im in enumerate(imgs)])
for t in (400, 600, 800):
    print(variant, steps, "t", t, "own-word acc", round(acc(t), 3), "next-word acc", round(acc(t, True), 3), flush=True)
