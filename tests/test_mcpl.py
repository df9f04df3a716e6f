"""MCPL's maths on hand-checkable cases (mask, contrastive loss), its sentence handling, bad input,
and per-word use in compose."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import example_data, make_backbone, make_method, predict, train_config


# --- the attention mask ---------------------------------------------------------------------

def _site(name="down_blocks.0.attentions.0.transformer_blocks.0.attn2", axis="spatial"):
    from conceptkit.attention import AttentionSite

    return AttentionSite(name=name, kind="cross", block_index=0, query_dim=8, context_dim=8, heads=2, token_axis=axis)


def test_mask_from_a_hand_built_attention_map():
    from conceptkit.attention import CrossAttentionMaps, maps_on_latent_grid
    from conceptkit.methods.mcpl.losses import attention_mask

    # Attention probabilities (B=2, heads=2, Q=2x2 queries, K=3 context tokens); the learned words sit
    # at columns 1 and 2 of row 0 and at column 2 only of row 1.
    probs = torch.tensor([
        [[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.0, 0.5, 0.5]],
         [[0.8, 0.1, 0.1], [0.6, 0.1, 0.3], [0.2, 0.4, 0.4], [0.0, 0.5, 0.5]]],
        [[[0.1, 0.0, 0.9], [0.9, 0.0, 0.1], [0.9, 0.0, 0.1], [0.9, 0.0, 0.1]],
         [[0.1, 0.0, 0.9], [0.9, 0.0, 0.1], [0.9, 0.0, 0.1], [0.9, 0.0, 0.1]]],
    ])
    columns = torch.tensor([[[0.0], [1.0], [1.0]], [[0.0], [0.0], [1.0]]])
    recorder = CrossAttentionMaps(columns)
    recorder.probabilities(_site(), probs)
    recorder.probabilities(_site("up_blocks.1.attentions.0.transformer_blocks.0.attn2"), probs * 0.5)
    maps = maps_on_latent_grid(recorder.maps, frames=1, height=4, width=4)
    assert maps.shape == (2, 1, 1, 4, 4)
    # row 0: head-mean word mass per query = [0.2, 0.4, 0.8, 1.0]; sites averaged: x 0.75
    expected_row0 = torch.tensor([[0.2, 0.4], [0.8, 1.0]]) * 0.75
    torch.testing.assert_close(maps[0, 0, 0, ::2, ::2], expected_row0)
    torch.testing.assert_close(maps[0, 0, 0, 1::2, 1::2], expected_row0)  # nearest upsampling: 2x2 blocks
    hard = attention_mask(maps, "hard", 0.3)
    soft = attention_mask(maps, "soft", 0.3)
    assert hard.shape == soft.shape == (2, 1, 1, 4, 4)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and soft.min() >= 0 and soft.max() == 1.0
    # row 0 normalised by its own max: [0.2, 0.4, 0.8, 1.0]: the 0.2 quarter is dropped at 0.3
    torch.testing.assert_close(hard[0, 0, 0, ::2, ::2], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(soft[0, 0, 0, ::2, ::2], torch.tensor([[0.2, 0.4], [0.8, 1.0]]))
    # row 1: [0.9, 0.1, 0.1, 0.1] -> only its first quarter survives (per-sample normalisation:
    # row 0's larger values do not decide row 1's mask, unlike the official mask[:1] + mask)
    torch.testing.assert_close(hard[1, 0, 0, ::2, ::2], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert hard[1].sum() == 4


def test_maps_over_video_tokens_keep_their_frames():
    from conceptkit.attention import maps_on_latent_grid

    recorded = torch.arange(8, dtype=torch.float32).view(1, 8, 1)  # 2 frames x 2x2 tokens
    maps = maps_on_latent_grid([(_site("blocks.0.attn2", "spatiotemporal"), recorded)], frames=2, height=4, width=4)
    assert maps.shape == (1, 1, 2, 4, 4)
    torch.testing.assert_close(maps[0, 0, :, ::2, ::2], torch.arange(8.0).view(2, 2, 2))


def test_hard_mask_lets_no_gradient_through_outside_the_mask():
    from conceptkit.methods.mcpl.losses import masked_denoising_loss

    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2, :2] = 1
    mask[1, :, 3, :] = 1
    prediction = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, 4)
    masked_denoising_loss(prediction, target, mask).backward()
    outside = (mask == 0).expand_as(prediction)
    assert prediction.grad[outside].abs().max() == 0
    assert (prediction.grad[~outside] != 0).all()
    # the value: squared error inside the mask, averaged over every element
    expected = ((prediction - target) ** 2 * mask).sum() / prediction.numel()
    torch.testing.assert_close(masked_denoising_loss(prediction, target, mask), expected)


@pytest.mark.parametrize("backbone_name", ["sd15_tiny", "wan21_tiny"])
def test_hard_mask_in_training_keeps_gradient_inside_the_mask_only(backbone_name):
    """End to end: with a threshold that keeps only the peak of the words' attention, the gradient
    reaching the denoiser's output is zero at every latent position outside the mask."""
    from conceptkit.method import TrainBatch

    backbone = make_backbone(backbone_name)
    method = make_method("mcpl", backbone_name, "pair", "method.mask_threshold=0.999", "method.contrastive_weight=0")
    data = example_data(backbone, backbone_name)
    method.initialize(backbone, data)
    method.attach(backbone)
    stage = method.stages(backbone)[0]
    method.begin_stage(stage, backbone)
    grads = []

    def keep_output_gradient(module, args, output):
        output.sample.register_hook(grads.append)  # returns None: the output itself is unchanged

    handle = backbone.denoiser.register_forward_hook(keep_output_gradient)
    try:
        out = method.training_loss(TrainBatch(torch.arange(2), data, torch.Generator().manual_seed(0)), backbone, stage)
        out["loss"].backward()
    finally:
        handle.remove()
    (grad,) = grads
    touched = (grad != 0).any(dim=1).float()  # (B, [F,] H, W): positions that receive any gradient
    assert 0 < out["mask_area"].item() < 1
    assert touched.mean().item() == pytest.approx(out["mask_area"].item())
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in method.vectors.values())


def test_default_mask_sites_are_the_official_16x16_maps_on_sd15():
    from conceptkit.attention import word_map_sites
    from conceptkit.attention import AttentionSite

    def site(name, i, axis="spatial"):
        return AttentionSite(name=name, kind="cross", block_index=i, query_dim=8, context_dim=8, heads=1, token_axis=axis)

    # SD1.5's layout: cross attention in down_blocks 0-2, up_blocks 1-3, mid; the 16x16 sites are chosen.
    sd15 = [site(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", 0) for b in range(3) for a in range(2)]
    sd15 += [site(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", 0) for b in (1, 2, 3) for a in range(3)]
    sd15 += [site("mid_block.attentions.0.transformer_blocks.0.attn2", 0)]
    assert word_map_sites(sd15) == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2", "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2"]
    wan = [site(f"blocks.{i}.attn2", i, "spatiotemporal") for i in range(30)]
    assert word_map_sites(wan) == ["blocks.10.attn2", "blocks.15.attn2", "blocks.20.attn2"]



def test_only_the_mask_sites_leave_the_fast_attention_path(monkeypatch):
    """Every attention call uses SDPA except the mask sites' (which need probabilities)."""
    import torch.nn.functional as F

    from conceptkit.method import TrainBatch

    backbone = make_backbone("sd15_tiny")
    method = make_method("mcpl", "sd15_tiny", "pair")
    data = example_data(backbone)
    method.initialize(backbone, data)
    method.attach(backbone)
    calls, in_denoiser = [], []
    sdpa = F.scaled_dot_product_attention
    # count SDPA calls of the denoiser only (the text encoder uses SDPA too)
    backbone.denoiser.register_forward_pre_hook(lambda *a: in_denoiser.append(1))
    backbone.denoiser.register_forward_hook(lambda *a: in_denoiser.clear())
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: (calls.append(1) if in_denoiser else None) or sdpa(*a, **k))
    method.training_loss(TrainBatch(torch.arange(1), data, torch.Generator().manual_seed(0)), backbone, method.stages(backbone)[0])
    assert method._site_names == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                  "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                  "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    assert len(calls) == len(backbone.attention_sites()) - len(method._site_names)
    assert backbone.hooks.owners() == []  # the step's recorder is removed again
    calls.clear()
    skip = make_method("mcpl", "sd15_tiny", "other", "method.mask=skip")
    method.detach(backbone)
    skip.initialize(backbone, data)
    skip.attach(backbone)
    skip.training_loss(TrainBatch(torch.arange(1), data, torch.Generator().manual_seed(0)), backbone, skip.stages(backbone)[0])
    assert len(calls) == len(backbone.attention_sites())


# --- the prompts contrastive loss -----------------------------------------------------------

def test_contrastive_loss_on_a_hand_computed_example():
    from conceptkit.methods.mcpl.losses import prompt_contrastive_loss

    # two views of two words: word 0 = (1, 0) twice, word 1 = (0, 1) twice; tau = 0.5
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # cosine ignores the norm
    labels = torch.tensor([0, 1, 0, 1])
    # every anchor: positive cos 1 -> 2; the two negatives cos 0 -> 0
    expected = -2 + math.log(2 * math.exp(0) + math.exp(2))
    assert prompt_contrastive_loss(features, labels, 0.5).item() == pytest.approx(expected, rel=1e-6)

    # bind adjective: a fifth row (0.6, 0.8) is an extra positive of word 0
    features = torch.cat([features, torch.tensor([[0.6, 0.8]])])
    labels = torch.tensor([0, 1, 0, 1, 0])
    e = math.exp
    l0 = (-2 + math.log(e(0) + e(2) + e(0) + e(1.2)) - 1.2 + math.log(e(0) + e(2) + e(0) + e(1.2))) / 2
    l1 = -2 + math.log(e(0) + e(0) + e(2) + e(1.6))
    l2 = l0  # the same geometry as row 0
    l3 = l1
    l4 = (-1.2 - 1.2) / 2 + math.log(e(1.2) + e(1.6) + e(1.2) + e(1.6))
    expected = (l0 + l1 + l2 + l3 + l4) / 5
    assert prompt_contrastive_loss(features, labels, 0.5).item() == pytest.approx(expected, rel=1e-6)

    # one view and no adjective: no anchor has a positive, so the loss is zero (and differentiable)
    single = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = prompt_contrastive_loss(single, torch.tensor([0, 1]), 0.5)
    loss.backward()
    assert loss.item() == 0 and single.grad is not None


def test_contrastive_features_are_the_marked_words_and_their_adjectives():
    backbone = make_backbone("sd15_tiny")
    method = make_method("mcpl", "sd15_tiny", "pair", "method.sentence='a photo of a red {ball} on a {sky}'",
                         "method.adjectives={ball:red}", "method.init_words={sky:null}")
    method.initialize(backbone, example_data(backbone))
    method.attach(backbone)
    prompts = [method._training_prompt("{}", None)] * 3
    context, tokenized = backbone.encode_text(prompts)
    features, labels = method._contrastive_features(backbone, tokenized.input_ids, context, ["ball", "sky"])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    ids = tokenized.input_ids[0].tolist()
    red = backbone.tokenizer("red", add_special_tokens=False).input_ids[0]
    ball = backbone.tokens.reserved_ids("<pair/ball>")[0]
    torch.testing.assert_close(features[0], context[0, ids.index(ball)])
    torch.testing.assert_close(features[6], context[0, ids.index(red)])
    assert prompts[0] == "a photo of a red <pair/ball> on a <pair/sky>"


# --- sentence, modes, initialisation --------------------------------------------------------

@pytest.mark.parametrize("backbone_name,steps", [("sd15_tiny", 6100), ("wan21_tiny", 3000)])
def test_the_schedule_depends_on_the_backbone_passed_in_not_on_attach(backbone_name, steps):
    """stages(backbone) reads the family from its argument: a method that was never attached (what the
    slow defaults test and `conceptkit bench` ask first) reports the same budget as an attached one."""
    backbone = make_backbone(backbone_name)
    fresh = make_method("mcpl", backbone_name)
    assert [(s.name, s.steps) for s in fresh.stages(backbone)] == [("words", steps)]
    attached = make_method("mcpl", backbone_name)
    attached.initialize(backbone, example_data(backbone, backbone_name))
    attached.attach(backbone)
    assert attached.stages(backbone) == fresh.stages(backbone)
    attached.detach(backbone)


def test_modes_choose_the_learned_words(tmp_path):
    from PIL import Image

    one = make_method("mcpl", "sd15_tiny", "pair", "method.sentence='a photo of a red {ball} and a {cube}'")
    assert one.learned_words() == ["ball", "cube"]
    assert one._training_prompt("{}", None) == "a photo of a red <pair/ball> and a <pair/cube>"
    every = make_method("mcpl", "sd15_tiny", "pair", "method.sentence='a photo of a red {ball} and a {cube}'",
                        "method.mode=all")
    assert every.learned_words() == ["ball", "cube", "photo", "red"]  # stop words a, of, and stay
    assert every._training_prompt("{}", None) == "a <pair/photo> of a <pair/red> <pair/ball> and a <pair/cube>"

    folder = tmp_path / "rel"
    folder.mkdir()
    for stem in ("on", "under_2"):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / f"{stem}.png")
    backbone = make_backbone("sd15_tiny")
    diverse = make_method("mcpl", "sd15_tiny", "pair", "method.sentence='a {ball} <relation> a {cube}'",
                          "method.mode=diverse")
    diverse.initialize(backbone, example_data(backbone, "sd15_tiny", f"data.images={folder}"))
    diverse.attach(backbone)
    assert diverse.relations == ["on", "under"]
    assert diverse.token_names() == ["<pair/ball>", "<pair/cube>", "<pair/on>", "<pair/under>"]
    assert diverse._training_prompt("{}", "under") == "a <pair/ball> <pair/under> a <pair/cube>"
    assert diverse.export_info() == {"relations": ["on", "under"]}


def test_each_word_starts_from_its_own_word_or_vocabulary_statistics():
    backbone = make_backbone("sd15_tiny")
    method = make_method("mcpl", "sd15_tiny", "pair", "method.sentence='a {ball} on a {zq}'",
                         "method.init_words={zq:null}")
    method.initialize(backbone, example_data(backbone))
    matrix = backbone.text_embedding_matrix()
    ball = backbone.tokenizer("ball", add_special_tokens=False).input_ids
    assert len(ball) == 1
    torch.testing.assert_close(method.vectors["ball"], matrix[ball])
    from conceptkit.embeddings import vocabulary_statistics_init

    torch.testing.assert_close(method.vectors["zq"], vocabulary_statistics_init(backbone, 1, torch.Generator().manual_seed(0)))
    other = make_method("mcpl", "sd15_tiny", "pair", "method.sentence='a {ball} on a {zq}'",
                        "method.init_words={zq:cube}")
    other.initialize(backbone, example_data(backbone))
    cube = backbone.tokenizer("cube", add_special_tokens=False).input_ids
    torch.testing.assert_close(other.vectors["zq"], matrix[cube])


# --- bad input: one clear line each -----------------------------------------------------------

@pytest.mark.parametrize("backbone_name,overrides,message", [
    ("sd15_tiny", ["method.sentence='a photo of a ball'"], r"has no placeholders: mark each word to learn in braces"),
    ("sd15_tiny", ["method.sentence='a {red ball}'"], r"\{red ball\} is not a word"),
    ("sd15_tiny", ["method.sentence='a {zyzzyva} and a {ball}'"],
     r"the word 'zyzzyva' splits into \d+ tokens.*method.init_words=\{zyzzyva:object\}"),
    ("wan21_tiny", ["method.sentence='" + " ".join("{w%d}" % i for i in range(40)) + "'",
                    "method.init_words={" + ",".join("w%d:null" % i for i in range(40)) + "}"],
     r"does not fit: with 40 learned words the prompt is longer than the text encoder's 32 tokens"),
    ("sd15_tiny", ["method.mode=diverse"], r"needs <relation> in method.sentence"),
    ("sd15_tiny", ["method.adjectives={object:green}"], r"'green' \(bound to object\) does not appear"),
    ("sd15_tiny", ["method.mask_sites=[nowhere]"], r"match no cross-attention site"),
    ("sd15_tiny", ["method.mask=medium"], r"method.mask must be one of hard, soft, skip, got 'medium'"),
    ("sd15_tiny", ["method.init_words={cactus:null}"], r"init_words names cactus, which the sentence does not learn"),
])
def test_bad_input_is_one_clear_line(backbone_name, overrides, message):
    from conceptkit.errors import UserError

    backbone = make_backbone(backbone_name)
    method = make_method("mcpl", backbone_name, "pair", *overrides)
    with pytest.raises(UserError, match=message) as error:
        method.initialize(backbone, example_data(backbone, backbone_name))
        method.attach(backbone)
    assert "\n" not in str(error.value)
    assert backbone.tokens.placeholders() == []  # a refused attach leaves nothing behind


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    """The issue's syntax, braces and spaces unquoted after the shell, reaches the method intact."""
    from test_cli import _assert_one_line_error, run_cli

    common = ["method=mcpl", "backbone=sd15_tiny", "experiment=smoke", f"output={tmp_path}/c"]
    _assert_one_line_error(run_cli("train", *common, "method.sentence=a photo of a ball"),
                           "method.sentence 'a photo of a ball' has no placeholders")
    _assert_one_line_error(run_cli("train", *common, "method.sentence=a photo of a {ball} and a {zyzzyva}"),
                           "the word 'zyzzyva' splits into")
    assert not (tmp_path / "c").exists()


# --- compose: every learned word is a concept ---------------------------------------------------

@pytest.fixture(scope="module")
def pair_concept(tmp_path_factory):
    from conceptkit.training.run import train

    root = tmp_path_factory.mktemp("mcpl")
    return train(train_config("mcpl", "sd15_tiny", "experiment=smoke", "name=pair", "sample.count=0",
                              "method.sentence='a photo of a {ball} and a {cube}'", f"output={root / 'pair.concept'}"))


def test_training_records_the_mean_mask_area_and_loss_terms(pair_concept):
    """concept.json keeps each loss term averaged over the stage: how much of the latent the hard
    mask kept (the reading that tells a vacuous mask from a working one), the masked reconstruction
    and PromptCL; bench suites report the mask area from here (bench.suites.training_terms)."""
    from conceptkit.bench.suites import training_terms

    terms = training_terms(pair_concept)
    assert {"loss", "rec", "mask_area", "contrastive"} <= set(terms), terms
    assert 0.0 < terms["mask_area"] <= 1.0 and terms["contrastive"] > 0.0


def test_words_compose_alone_together_and_with_other_methods(pair_concept, tmp_path):
    from conceptkit.artifact import load_concept
    from conceptkit.compose import render_prompt
    from conceptkit.errors import UserError
    from conceptkit.training.run import train

    meta = json.loads((pair_concept / "concept.json").read_text())
    assert meta["tokens"] == ["<pair/ball>", "<pair/cube>"]
    assert sorted(p.name for p in pair_concept.glob("learned_embeds_*")) == [
        "learned_embeds_ball.safetensors", "learned_embeds_cube.safetensors"]
    star = train(train_config("textual_inversion", "sd15_tiny", "experiment=smoke", "name=star", "sample.count=0",
                              f"output={tmp_path / 'star.concept'}"))
    backbone = make_backbone("sd15_tiny")
    mcpl, _ = load_concept(pair_concept, backbone)
    assert render_prompt("a photo of {pair/ball}", [mcpl]) == "a photo of <pair/ball>"
    assert render_prompt("a photo of {cube} on the beach", [mcpl]) == "a photo of <pair/cube> on the beach"
    assert render_prompt("a photo of {pair}", [mcpl]) == "a photo of <pair/ball> and <pair/cube>"
    alone = predict(backbone, [render_prompt("a photo of {pair/ball}", [mcpl])])
    assert not torch.equal(alone, predict(backbone, [render_prompt("a photo of {pair/cube}", [mcpl])]))
    # {ball}: another concept's own name wins over MCPL's short word name; {pair/ball} is the word
    named_ball = make_method("textual_inversion", "sd15_tiny", "ball")
    for order in ([mcpl, named_ball], [named_ball, mcpl]):
        assert render_prompt("{pair/ball} and {ball}", order) == "<pair/ball> and <ball>"
    # two concepts that both learned a word "ball": the short name is ambiguous and refused
    other_pair = make_method("mcpl", "sd15_tiny", "twin", "method.sentence='a {ball} on a {sky}'")
    with pytest.raises(UserError, match=r"prompt names \{ball\}, which concepts pair and twin all provide"):
        render_prompt("a photo of {ball}", [mcpl, other_pair])
    assert render_prompt("{twin/ball} and {pair/ball}", [mcpl, other_pair]) == "<twin/ball> and <pair/ball>"
    # with a concept of another method: both contribute
    other, _ = load_concept(star, backbone)
    prompt = render_prompt("{cube} next to {star}", [other, mcpl])
    assert prompt == "<pair/cube> next to <star>"
    together = predict(backbone, [prompt])
    mcpl.detach(backbone)
    assert not torch.equal(predict(backbone, [prompt]), together)
    other.detach(backbone)
    mcpl.attach(backbone)
    assert not torch.equal(predict(backbone, [prompt]), together)


@pytest.mark.parametrize("backbone_name", ["sd15_tiny", "wan21_tiny"])
def test_compose_saves_each_tokens_attention_map(tmp_path, backbone_name):
    from conceptkit.compose import compose
    from conceptkit.config import compose as compose_config
    from conceptkit.training.run import train

    folder = train(train_config("mcpl", backbone_name, "experiment=smoke", "name=pair", "sample.count=0",
                                "method.sentence='a photo of a {ball} and a {cube}'",
                                f"output={tmp_path / 'pair.concept'}"))
    cfg = compose_config("compose", [f"concepts=[{folder}]", "prompt='{pair/ball} next to {cube}'", "count=2",
                                     "steps=2", "attention_maps=true", f"output={tmp_path / 'out'}", "device=cpu"])
    out = compose(cfg)
    record = json.loads((out / "compose.json").read_text())
    assert record["attention_maps"] == ["<pair/ball>", "<pair/cube>"]
    suffix = "png" if backbone_name == "sd15_tiny" else "mp4"
    for token in ("pair_ball", "pair_cube"):
        assert sorted(p.name for p in (out / "attention").glob(f"{token}_*.{suffix}")) == [
            f"{token}_0.{suffix}", f"{token}_1.{suffix}"]
    backbone = make_backbone(backbone_name)
    assert backbone.hooks.owners() == []
