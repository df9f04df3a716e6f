"""The real loading code (diffusers-format folders), samplers, and objectives of both families."""

from __future__ import annotations

import pytest
import torch

from conftest import make_backbone


def _save_diffusers_folder(backbone, folder):
    """Write a loaded tiny backbone the way a hub repository is laid out."""
    denoiser_dir = "unet" if backbone.family == "sd15" else "transformer"
    backbone.tokenizer.save_pretrained(folder / "tokenizer")
    backbone.text_encoder.save_pretrained(folder / "text_encoder")
    backbone.vae.save_pretrained(folder / "vae")
    # conceptkit's processors are runtime objects, not weights: a fresh stock copy is saved
    from conceptkit.backbones.tiny import tiny_sd15_modules, tiny_wan21_modules

    stock = (tiny_sd15_modules if backbone.family == "sd15" else tiny_wan21_modules)(backbone.seed)[2]
    stock.save_pretrained(folder / denoiser_dir)
    if backbone.family == "sd15":
        backbone.train_scheduler.save_pretrained(folder / "scheduler")


@pytest.mark.parametrize("tiny,full", [("sd15_tiny", "sd15"), ("wan21_tiny", "wan21")])
def test_local_diffusers_folder_loads_through_the_real_path(tmp_path, tiny, full):
    from hydra.utils import instantiate

    from conftest import fixed_inputs, train_config

    reference = make_backbone(tiny)
    _save_diffusers_folder(reference, tmp_path)
    cfg = train_config("conceptprism", full, f"backbone.path={tmp_path}", "backbone.dtype=float32",
                       "backbone.resolution=32", f"backbone.max_text_tokens={reference.max_text_tokens}")
    loaded = instantiate(cfg.backbone).load()
    assert loaded.identity()["id"] == str(tmp_path)
    latents, timesteps = fixed_inputs(reference)
    with torch.no_grad():
        a = reference.denoise(latents, timesteps, reference.encode_text(["a red dog"])[0].expand(2, -1, -1))
        b = loaded.denoise(latents, timesteps, loaded.encode_text(["a red dog"])[0].expand(2, -1, -1))
    assert torch.equal(reference.tokenize(["a red dog"]).input_ids, loaded.tokenize(["a red dog"]).input_ids)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,schedulers", [("sd15_tiny", ["ddim", "dpm++", "euler"]), ("wan21_tiny", ["unipc", "euler"])])
def test_every_scheduler_samples(name, schedulers):
    from conceptkit.errors import UserError

    backbone = make_backbone(name)
    results = [backbone.generate(["a red dog"], steps=3, scheduler=s, seed=1) for s in schedulers]
    for media in results:
        assert media.shape == (1, 3, backbone.default_frames, 32, 32)
        assert media.min() >= 0 and media.max() <= 1
    assert torch.equal(results[0], backbone.generate(["a red dog"], steps=3, scheduler=schedulers[0], seed=1))
    assert not torch.equal(results[0], backbone.generate(["a red dog"], steps=3, scheduler=schedulers[0], seed=2))
    with pytest.raises(UserError, match="not available"):
        backbone.generate(["x"], steps=2, scheduler="heun")


def test_training_objectives():
    sd = make_backbone("sd15_tiny")
    latents = torch.randn(3, 4, 8, 8)
    batch = sd.make_noisy(latents, torch.Generator().manual_seed(0), timesteps=torch.tensor([0, 500, 999]))
    alphas = sd.train_scheduler.alphas_cumprod[torch.tensor([0, 500, 999])].view(-1, 1, 1, 1)
    noise = (batch.noisy - alphas.sqrt() * latents) / (1 - alphas).sqrt()
    torch.testing.assert_close(batch.target, noise, atol=1e-4, rtol=1e-4)  # epsilon objective
    wan = make_backbone("wan21_tiny")
    latents = torch.randn(2, 16, 1, 4, 4)
    batch = wan.make_noisy(latents, torch.Generator().manual_seed(0))
    sigma = (batch.timesteps / 1000).view(-1, 1, 1, 1, 1)
    noise = batch.target + latents  # flow matching: target = noise - x0
    torch.testing.assert_close(batch.noisy, (1 - sigma) * latents + sigma * noise)
    # shifted sampling (shift 5) favours high noise: most sigmas above one half
    many = wan.make_noisy(torch.zeros(2000, 1, 1, 1, 1), torch.Generator().manual_seed(1)).timesteps / 1000
    assert (many > 0.5).float().mean() > 0.7


def test_shipped_sd15_shapes_draws_the_requested_background_colour_and_shape():
    """The shipped ShapeWorld SD1.5 loads from the package and follows the prompt (read by the oracle).
    Its model card (release 5) reports background 100 %, colour 96-98 % and shape 79-88 % on 48 prompts
    a split; here 6 fixed prompts, one per shape, must give the right background in >= 5, the right
    object colour in >= 4 and the right shape in >= 3 (seed 0; release 5 reads 6 / 6 / 4, release 4
    6 / 6 / 5, release 3, which drew no outlines, 1 of 6 shapes)."""
    import numpy as np

    from conceptkit.world.oracle import read_image

    backbone = make_backbone("sd15_shapes")
    assert backbone.identity()["id"] == "conceptkit:sd15_shapes"
    assert backbone.train_scheduler.config.prediction_type == "v_prediction"  # zero terminal SNR (model card)
    assert backbone.latent_factor == 4  # 16x16 latents (model card: release 2)
    cases = [("red", "circle", "sand"), ("blue", "square", "teal"), ("green", "triangle", "navy"),
             ("yellow", "star", "sky"), ("purple", "cross", "pink"), ("white", "heart", "grass")]
    media = backbone.generate([f"a large {c} {s} on a plain {b} background" for c, s, b in cases], seed=0)
    frames = (media[:, :, 0].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    readings = [read_image(f) for f in frames]
    backgrounds = [r.background_colour == b for r, (_, _, b) in zip(readings, cases)]
    colours = [any(o.colour == c for o in r.objects) for r, (c, _, _) in zip(readings, cases)]
    shapes = [any(o.shape == s for o in r.objects) for r, (_, s, _) in zip(readings, cases)]
    assert sum(backgrounds) >= 5 and sum(colours) >= 4 and sum(shapes) >= 3, (backgrounds, colours, shapes)


def test_shipped_wan21_shapes_loads_and_draws_the_requested_background():
    """The shipped ShapeWorld Wan2.1 (release 1) loads from the package with its latent statistics and
    follows the prompt's background in generated clips, read by the oracle. Its model card reports
    background 98-100 % on 96 held-out prompts and objects almost never (what release 1 does not do
    is not asserted here); 6 fixed prompts must give the right background in >= 5 (seed 0)."""
    import numpy as np

    from conceptkit.world.oracle import read_clip

    backbone = make_backbone("wan21_shapes")
    assert backbone.identity()["id"] == "conceptkit:wan21_shapes"
    assert (backbone.spatial_factor, backbone.temporal_factor, backbone.default_frames) == (4, 4, 9)
    import inspect

    from diffusers import AutoencoderKLWan

    stock = inspect.signature(AutoencoderKLWan.__init__).parameters["latents_mean"].default
    mean = backbone.vae.config.latents_mean
    assert len(mean) == 16 and list(mean) != list(stock)  # measured on the corpus by conceptkit pretrain
    cases = [("red", "sand"), ("blue", "teal"), ("green", "navy"), ("yellow", "pink"), ("white", "grass"),
             ("purple", "sky")]
    media = backbone.generate([f"a large {c} circle moving left quickly on a plain {b} background" for c, b in cases],
                              steps=10, seed=0)
    assert media.shape == (6, 3, 9, 64, 64)
    frames = (media.permute(0, 2, 3, 4, 1).numpy() * 255).round().astype(np.uint8)
    backgrounds = [read_clip(f).background_colour == b for f, (_, b) in zip(frames, cases)]
    assert sum(backgrounds) >= 5, backgrounds


def test_wan_encodes_only_the_real_tokens_and_zero_pads_to_the_full_length():
    """UMT5 encodes up to the longest prompt, then zeros fill the rest to max_text_tokens (512 as on
    Wan2.1): the same context as encoding all 512 positions and zeroing past each prompt's length."""
    from hydra.utils import instantiate

    from conftest import train_config

    cfg = train_config("conceptprism", "wan21_tiny", "backbone.max_text_tokens=512")
    backbone = instantiate(cfg.backbone).load()
    tokenized = backbone.tokenize(["a red dog on the beach at sunset", "a cat"])
    assert tokenized.input_ids.shape[1] == 512 and tokenized.attention_mask.sum() < 20
    calls = []
    handle = backbone.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape),
                                                             with_kwargs=True)
    try:
        context = backbone.encode_tokens(tokenized)
    finally:
        handle.remove()
    assert calls == [torch.Size([2, int(tokenized.attention_mask[0].sum())])]  # not 512 positions
    with torch.no_grad():
        full = backbone.text_encoder(tokenized.input_ids, attention_mask=tokenized.attention_mask).last_hidden_state
    full = full * tokenized.attention_mask.unsqueeze(-1).to(full.dtype)
    assert context.shape == full.shape
    torch.testing.assert_close(context, full, rtol=1e-5, atol=1e-6)
    assert not context[1, int(tokenized.attention_mask[1].sum()):].any()  # zeros past the prompt's length


@pytest.mark.parametrize("name", ["sd15_tiny", "wan21_tiny"])
def test_generate_takes_initial_latents_and_steerable_step_callbacks(name):
    """The seed's noise given explicitly renders the same media; a callback sees every step with an x0
    that is the family's clean-latent formula, can backpropagate through predict() into a tensor a hook
    reads, and what it changes steers the sampling."""
    backbone = make_backbone(name)
    kwargs = dict(steps=3, seed=5, height=backbone.resolution, width=backbone.resolution)
    plain = backbone.generate(["a red dog"], **kwargs)
    noise = backbone.initial_noise(1, seed=5)
    assert torch.equal(backbone.generate(["a red dog"], initial_latents=noise, **kwargs), plain)
    assert not torch.equal(backbone.generate(["a red dog"], initial_latents=noise + 0.5, **kwargs), plain)

    shift = torch.zeros(1, requires_grad=True)

    class ShiftContext:  # a hook reading a tensor that guidance optimises
        def context(self, site, encoder_hidden_states):
            return encoder_hidden_states + shift

    seen = []

    def guide(step):
        with torch.enable_grad():
            guided, clean = step.predict()
            if step.index == 0:
                # x0 from the family's formula at this step (scaled input, timestep, prediction)
                sampler = step.sampler
                model_input = step.latents
                if hasattr(sampler, "scale_model_input"):
                    model_input = sampler.scale_model_input(step.latents, step.timestep)
                t = step.timestep.reshape(1)
                torch.testing.assert_close(clean, backbone.predicted_clean(model_input, t, guided))
            clean.square().mean().backward()
        seen.append((step.index, shift.grad is not None and bool(shift.grad.abs().sum() > 0)))
        with torch.no_grad():
            shift.sub_(0.5 * shift.grad.sign())
            shift.grad = None

    backbone.hooks.add("guide", ShiftContext(), lambda site: site.kind == "cross")
    try:
        steered = backbone.generate(["a red dog"], callbacks=[guide], **kwargs)
    finally:
        backbone.hooks.remove("guide")
    assert seen == [(0, True), (1, True), (2, True)]  # every step, with gradients reaching the tensor
    assert float(shift) != 0.0 and not torch.equal(steered, plain)


def test_predicted_clean_inverts_the_training_noise():
    """x0 from a perfect prediction is the clean latent: the formula matches make_noisy's objective."""
    for name in ("sd15_tiny", "wan21_tiny"):
        backbone = make_backbone(name)
        latents = torch.randn(3, 4, 4, 4) if name == "sd15_tiny" else torch.randn(3, 16, 1, 4, 4)
        noisy = backbone.make_noisy(latents, torch.Generator().manual_seed(0), timesteps=torch.tensor([10, 500, 900]))
        clean = backbone.predicted_clean(noisy.noisy, noisy.timesteps, noisy.target)
        torch.testing.assert_close(clean, latents, rtol=1e-4, atol=1e-4)
