"""conceptkit's attention processors: stock outputs with no hooks; hooks stack and undo by owner."""

from __future__ import annotations

import torch

from conftest import fixed_inputs, make_backbone


def _stock(backbone_name):
    from conceptkit.backbones.tiny import tiny_sd15_modules, tiny_wan21_modules

    return (tiny_sd15_modules if backbone_name == "sd15_tiny" else tiny_wan21_modules)(0)[2]


def _stock_output(denoiser, backbone, latents, timesteps, context):
    with torch.no_grad():
        if backbone.family == "sd15":
            return denoiser(latents, timesteps, encoder_hidden_states=context).sample
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=context).sample


def test_no_hooks_equals_stock_diffusers_bit_for_bit():
    for name in ("sd15_tiny", "wan21_tiny"):
        backbone = make_backbone(name)
        stock = _stock(name)
        # conceptkit's processors really are installed: the stock model has diffusers' own.
        assert {type(p).__name__ for p in backbone.denoiser.attn_processors.values()} <= {"UNetAttnProcessor", "WanAttnProcessor"}
        assert not any(type(p).__module__.startswith("conceptkit") for p in stock.attn_processors.values())
        latents, timesteps = fixed_inputs(backbone)
        with torch.no_grad():
            context, _ = backbone.encode_text(["a photo of a red dog", ""])
            ours = backbone.denoise(latents, timesteps, context)
        assert torch.equal(ours, _stock_output(stock, backbone, latents, timesteps, context)), name


class ScaleContext:
    def __init__(self, factor):
        self.factor = factor

    def context(self, site, encoder_hidden_states):
        return encoder_hidden_states * self.factor


class RecordProbabilities:
    def __init__(self):
        self.seen = []

    def probabilities(self, site, probs):
        self.seen.append((site, probs))


def test_hooks_stack_by_owner_and_remove_exactly():
    for name in ("sd15_tiny", "wan21_tiny"):
        backbone = make_backbone(name)
        latents, timesteps = fixed_inputs(backbone)
        context, _ = backbone.encode_text(["a photo of a red dog", "a cat"])

        def run():
            with torch.no_grad():
                return backbone.denoise(latents, timesteps, context)

        base = run()
        cross = lambda site: site.kind == "cross"  # noqa: E731
        backbone.hooks.add("a", ScaleContext(0.0), cross)
        zeroed = run()
        assert not torch.equal(base, zeroed)
        backbone.hooks.add("b", ScaleContext(2.0), cross)
        assert torch.equal(run(), zeroed)  # 0 * 2 == 0: both hooks applied, in order
        backbone.hooks.remove("a")
        assert not torch.equal(run(), base)  # "b" still doubles the context
        backbone.hooks.remove("b")
        assert torch.equal(run(), base)


def test_probability_observer_matches_sdpa_path():
    for name in ("sd15_tiny", "wan21_tiny"):
        backbone = make_backbone(name)
        latents, timesteps = fixed_inputs(backbone)
        context, _ = backbone.encode_text(["a photo of a red dog", "a cat"])
        with torch.no_grad():
            fast = backbone.denoise(latents, timesteps, context)
            recorder = RecordProbabilities()
            backbone.hooks.add("maps", recorder, lambda site: site.kind == "cross")
            explicit = backbone.denoise(latents, timesteps, context)
            backbone.hooks.remove("maps")
        cross_sites = [s for s in backbone.attention_sites() if s.kind == "cross"]
        assert len(recorder.seen) == len(cross_sites)
        for site, probs in recorder.seen:
            assert probs.shape[0] == 2 and probs.shape[1] == site.heads
            assert probs.shape[-1] == context.shape[1]
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        torch.testing.assert_close(explicit, fast, atol=1e-4, rtol=1e-4)


def test_sites_describe_the_backbone():
    sd = make_backbone("sd15_tiny")
    sites = sd.attention_sites()
    assert {s.kind for s in sites} == {"self", "cross"}
    assert all(s.context_dim == 32 for s in sites if s.kind == "cross")
    wan = make_backbone("wan21_tiny")
    blocks = {s.block_index for s in wan.attention_sites()}
    assert blocks == set(range(len(wan.denoiser.blocks)))
    assert all(s.token_axis == "spatiotemporal" for s in wan.attention_sites())
