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


class MixedKeyValue:
    """A key_value hook writing one token's key from one source and its value from another, each
    through its own projection (what a KV-mixed visual prompt does at its token)."""

    def __init__(self, position, key_source, value_source, key_proj, value_proj):
        self.position, self.key_source, self.value_source = position, key_source, value_source
        self.key_proj, self.value_proj = key_proj, value_proj

    def key_value(self, site, key, value):
        key, value = key.clone(), value.clone()
        key[:, self.position] = self.key_proj(self.key_source)
        value[:, self.position] = self.value_proj(self.value_source)
        return key, value


def test_mixed_keys_values_and_a_region_bias_on_a_hand_computed_case():
    """Keys of one token from source A, its values from source B, and that token hidden (logit -inf)
    from queries outside the left half of a 4x4 grid: the processor (SDPA, float mask) gives exactly the
    hand-written attention, and the masked queries give that token zero attention."""
    from diffusers.models.attention_processor import Attention

    from conceptkit.attention import AttentionHooks, AttentionSite, RegionLogitBias, UNetAttnProcessor

    torch.manual_seed(0)
    heads, head_dim, width, context_dim, tokens = 2, 4, 8, 6, 5
    attn = Attention(query_dim=width, cross_attention_dim=context_dim, heads=heads, dim_head=head_dim)
    site = AttentionSite("attn2", "cross", 0, width, context_dim, heads, "spatial")
    hooks = AttentionHooks()
    attn.set_processor(UNetAttnProcessor(site, hooks))
    hidden, context = torch.randn(1, 16, width), torch.randn(1, tokens, context_dim)
    key_source, value_source = torch.randn(1, 3), torch.randn(1, 7)  # different sources, different widths
    key_proj, value_proj = torch.nn.Linear(3, width), torch.nn.Linear(7, width)
    left = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    left[..., :2] = True
    columns = torch.tensor([[False, False, False, True, False]])
    recorder = RecordProbabilities()
    hooks.add("kv", MixedKeyValue(3, key_source, value_source, key_proj, value_proj))
    hooks.add("region", RegionLogitBias(columns, left))
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context)
        # by hand
        q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
        k[:, 3], v[:, 3] = key_proj(key_source), value_proj(value_source)
        split = lambda x: x.view(1, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / head_dim ** 0.5
        outside = ~left[0, 0].reshape(16)
        scores[:, :, outside, 3] = float("-inf")
        expected = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(1, 16, heads * head_dim)
        expected = attn.to_out[0](expected)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        hooks.add("observe", recorder)  # the explicit softmax path applies the same bias
        torch.testing.assert_close(attn(hidden, encoder_hidden_states=context), expected, rtol=1e-5, atol=1e-6)
    probs = recorder.seen[0][1]
    assert torch.equal(probs[0, :, outside, 3], torch.zeros_like(probs[0, :, outside, 3]))  # zero attention outside
    assert (probs[0, :, ~outside, 3] > 0).all()  # and some inside: the check can fail
    assert torch.equal(torch.isfinite(probs).all(), torch.tensor(True))  # no softmax row went empty
    hooks.remove("region")
    with torch.no_grad():
        assert not torch.allclose(attn(hidden, encoder_hidden_states=context), expected)  # the bias mattered
