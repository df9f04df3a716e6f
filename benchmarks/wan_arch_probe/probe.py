# One-off probe (sessions 13-14): can the wan21_shapes transformer learn word -> outline on a simplified world?
# The sd15_shapes counterpart is benchmarks/shapes_arch_probe.
#   python benchmarks/wan_arch_probe/probe.py <variant> <steps> [wan21_shapes folder]    (results: README.md here)
# shipped: the release's transformer (or the folder's), not trained further (steps ignored); base: the shipped
# config, fresh weights; wide: 8 heads x 32 (width 256), FFN 1024; deep: 8 blocks; short: context cut to the
# prompt's tokens; heads1: 1 head x 128. scaled<K>[_centred|_heads2|_patch1]: latents x K; every object at the
# centre; 2 heads x 64; 1x1 patches; also _heads8, _heads16 (same width) and _deep (session 15). Frozen: the VAE
# and UMT5. PROBE_WEIGHTS=<folder> keeps each trained probe; PROBE_INIT=<.pt> continues one; PROBE_LR;
# PROBE_BAND=lo,hi puts half of each batch at sigmas uniform in [lo, hi].
import os, sys, time, torch, numpy as np, torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from diffusers import WanTransformer3DModel
from conceptkit.world.factors import sample_scene, SHAPES
from conceptkit.world.render import render_scene
from conceptkit.world.oracle import read_image

variant, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
with initialize_config_module("conceptkit.conf", version_base=None):
    cfg = compose("train", overrides=["backbone=wan21_shapes", *([f"backbone.path={sys.argv[3]}"] if len(sys.argv) > 3 else [])])
bb = instantiate(cfg.backbone).load()
allowed = {"size": ["large"], "colour": ["red"], "pattern": ["plain"], "background_colour": ["sand"],
           "background_pattern": ["plain"]}


def make(n, seed):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, n_objects=1, allowed=allowed, orientation="upright") for _ in range(n)]
    if "centred" in variant:  # every object at the image centre: only the shape left to draw
        from dataclasses import replace
        scenes = [replace(s, objects=(replace(s.objects[0], centre=(0.5, 0.5)),)) for s in scenes]
    px = torch.from_numpy(np.stack([render_scene(s, 64) for s in scenes])).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1
    return bb.encode_media(px).mean * latent_scale, torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])


# scaledK: latents multiplied by K (a smaller latents_std). In the shipped VAE's normalised latents the object
# carries ~1/20 of the variance it has in sd15_shapes' (benchmarks/wan_arch_probe/README.md), so it drowns in the noise.
latent_scale = float(variant.split("_")[0][len("scaled"):]) if variant.startswith("scaled") else 1.0
t0 = time.time()
train_lat, train_y = make(3000, 1)
test_lat, test_y = make(60, 2)
with torch.no_grad():
    ctx = bb.encode_text([f"a large red {s} on a plain sand background" for s in SHAPES])[0]
    n_real = int(bb.tokenize([f"a large red {s} on a plain sand background" for s in SHAPES]).attention_mask.sum(1).max())
if variant == "short":  # context cut to the prompt's own tokens: no zero padding for the word to compete with
    ctx = ctx[:, :n_real]
print("data", round(time.time() - t0), "s", "context", tuple(ctx.shape), "real tokens", n_real, flush=True)
config = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
              text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
if variant == "wide":
    config.update(num_attention_heads=8, ffn_dim=1024)
if variant.endswith("patch1"):  # 1x1 patches: a frame is 16x16 tokens, a large object 6-8 tokens across, not 3-4
    config.update(patch_size=(1, 1, 1))
if variant.endswith("heads2"):  # same width, 2 heads x 64: RoPE gets 10 frequencies per spatial axis instead of 5
    config.update(num_attention_heads=2, attention_head_dim=64)
if variant.endswith("heads8"):  # same width, 8 heads x 16: twice the attention patterns (relative offsets) a block can look at
    config.update(num_attention_heads=8, attention_head_dim=16)
if variant.endswith("heads16"):  # same width, 16 heads x 8
    config.update(num_attention_heads=16, attention_head_dim=8)
if variant.endswith("deep"):  # twice as deep
    config.update(num_layers=8)
if variant == "heads1":  # same width, 1 head x 128: 21 frequencies per spatial axis, as real Wan's 128-dim heads
    config.update(num_attention_heads=1, attention_head_dim=128)
if variant == "shipped":
    model = bb.denoiser.float()
else:
    model = WanTransformer3DModel(**config)
    if os.environ.get("PROBE_INIT"):  # continue from a kept probe (a curriculum: e.g. centred objects first)
        model.load_state_dict(torch.load(os.environ["PROBE_INIT"]))
    print("parameters", round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=float(os.environ.get("PROBE_LR", 5e-4)), weight_decay=0)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(train_y), (32,), generator=g)
        band = os.environ.get("PROBE_BAND")  # "lo,hi": half of each batch at sigmas uniform in that band
        timesteps = None
        if band:
            lo, hi = (float(b) for b in band.split(","))
            sig = bb._shift(torch.rand((32,), generator=g), bb.train_shift)
            sig[:16] = lo + (hi - lo) * torch.rand((16,), generator=g)
            timesteps = sig * 1000.0
        nb = bb.make_noisy(train_lat[idx], g, timesteps)  # the backbone's own objective: flow matching, sigmas shifted by 5
        pred = model(hidden_states=nb.noisy, timestep=nb.timesteps, encoder_hidden_states=ctx[train_y[idx]]).sample
        loss = F.mse_loss(pred, nb.target)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        if step % 100 == 0:
            print(step, round(loss.item(), 4), round(time.time() - t0), "s", flush=True)
    print("train", round(time.time() - t0), "s", round((time.time() - t0) / max(steps, 1), 2), "s/step", flush=True)


@torch.no_grad()
def accuracy(sigma, wrong=False):
    ge = torch.Generator().manual_seed(5)
    noise = torch.randn(test_lat.shape, generator=ge)
    noisy = (1 - sigma) * test_lat + sigma * noise
    y = (test_y + 1) % 6 if wrong else test_y
    v = model(hidden_states=noisy, timestep=torch.full((60,), sigma * 1000.0), encoder_hidden_states=ctx[y]).sample
    x0 = noisy - sigma * v  # flow matching: v = noise - x0
    frames = bb.decode(x0 / latent_scale)[:, :, 0].permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    return np.mean([any(o.shape == SHAPES[int(y[i])] for o in read_image(f).objects) for i, f in enumerate(frames)])


@torch.no_grad()
def sampled_accuracy(n=36, steps=25, shift=3.0, guidance=1.0):
    # Whole sampling from pure noise (Euler on the flow, sigmas shifted as the backbone samples; no CFG:
    # the probe trains without dropped captions): does the drawn object have the asked shape?
    ge = torch.Generator().manual_seed(7)
    x = torch.randn((n, *test_lat.shape[1:]), generator=ge)
    u = torch.linspace(1, 0, steps + 1)
    sig = shift * u / (1 + (shift - 1) * u)
    for a, b in zip(sig[:-1], sig[1:]):
        t = torch.full((n,), float(a) * 1000.0)
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx[torch.arange(n) % 6]).sample
        if guidance != 1.0:  # classifier-free guidance against the empty prompt (models trained with dropped captions)
            empty = bb.encode_text([""])[0][:, :ctx.shape[1]].expand(n, -1, -1)
            v = v + (guidance - 1) * (v - model(hidden_states=x, timestep=t, encoder_hidden_states=empty).sample)
        x = x + (b - a) * v
    frames = bb.decode(x / latent_scale)[:, :, 0].permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    reads = [read_image(f).objects for f in frames]
    return (np.mean([any(o.shape == SHAPES[i % 6] for o in r) for i, r in enumerate(reads)]),
            np.mean([len(r) == 1 for r in reads]))


model.eval()
if variant != "shipped" and os.environ.get("PROBE_WEIGHTS"):  # a folder to keep the trained probe in
    torch.save(model.state_dict(), os.path.join(os.environ["PROBE_WEIGHTS"], f"probe_{variant}_{steps}.pt"))
print(variant, steps, "sampled: asked shape, one object", [round(float(a), 3) for a in sampled_accuracy()], flush=True)
if variant == "shipped":  # trained with dropped captions: CFG applies
    for guidance in (5.0, 10.0):
        print(variant, "guidance", guidance, "sampled: asked shape, one object",
              [round(float(a), 3) for a in sampled_accuracy(guidance=guidance)], flush=True)
for sigma in (0.4, 0.6, 0.8):
    print(variant, steps, "sigma", sigma, "own-word acc", round(accuracy(sigma), 3),
          "next-word acc", round(accuracy(sigma, True), 3), flush=True)
