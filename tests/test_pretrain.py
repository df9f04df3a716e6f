"""`conceptkit pretrain` on a few steps: it writes a loadable diffusers folder, reproducibly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


def _pretrain(family, output, *extra):
    from conceptkit.config import compose
    from conceptkit.training.pretrain import pretrain

    overrides = [f"backbone={family}_shapes", f"output={output}", "trainer.max_steps=2", "trainer.progress_bar=false",
                 "corpus.images=24", "corpus.clips=8", "vae.batch_size=2", "denoiser.batch_size=4", *extra]
    return pretrain(compose("pretrain", overrides), overrides)


@pytest.mark.parametrize("family", ["sd15", "wan21"])
def test_pretrain_writes_a_backbone_that_trains_concepts(tmp_path, family):
    from conceptkit.config import compose
    from conceptkit.training.run import train

    folder = _pretrain(family, tmp_path / "toy")
    denoiser = "unet" if family == "sd15" else "transformer"
    for part in ("tokenizer", "text_encoder", denoiser, "vae"):
        assert (folder / part).is_dir(), part
    recipe = json.loads((folder / "recipe.json").read_text())
    assert [s["name"] for s in recipe["training"]["stages"]] == ["vae", "denoiser"]
    assert recipe["training"]["command"].startswith("conceptkit pretrain backbone=")
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    if family == "sd15":
        assert vae_config["scaling_factor"] != 0.18215  # measured on the corpus
    else:
        assert len(vae_config["latents_std"]) == 16 and vae_config["latents_std"][0] != 2.8184
    concept = train(compose("train", [f"backbone={family}_shapes", f"backbone.path={folder}", "experiment=smoke",
                                      "sample.count=1", f"output={tmp_path / 'c.concept'}"]))
    assert (concept / "samples").is_dir()
    if family == "sd15":  # the quality suites score a pretrain output before it replaces the shipped weights
        from conceptkit.bench import run_suite

        run_suite(compose("bench", ["suite=base_quality", "suite_backbone=sd15_shapes", f"suite_backbone_path={folder}",
                                    "quality_prompts=2", "sample_steps=2", f"output={tmp_path / 'quality'}"]))
        record = json.loads((tmp_path / "quality" / "results.json").read_text())
        assert record["identity"]["id"] == str(folder) and record["results"]["pretrain"]["samples"] == 2


def test_pretrain_is_reproducible_from_the_seed(tmp_path):
    first = load_file(str(_pretrain("wan21", tmp_path / "a") / "transformer" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(_pretrain("wan21", tmp_path / "b") / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_toy_tokenizers_give_every_caption_word_one_token():
    from conceptkit.backbones.tiny import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer
    from conceptkit.backbones.toy import shapes_words
    from conceptkit.world.captions import caption_scene
    from conceptkit.world.factors import sample_scene

    words = shapes_words()
    clip, t5 = build_tiny_clip_tokenizer(words), build_tiny_t5_tokenizer(64, words)
    rng = np.random.default_rng(99)  # other captions than the ones the vocabulary was collected from
    for i in range(200):
        caption = caption_scene(sample_scene(rng, split="all", clip_frames=9 if i % 2 else None), rng)
        for word in re.findall(r"[a-z]+", caption.lower()):
            assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
            assert len(t5(word, add_special_tokens=False).input_ids) == 1, word


def test_pretrain_refuses_other_architectures(tmp_path):
    from conceptkit.config import compose
    from conceptkit.errors import UserError
    from conceptkit.training.pretrain import pretrain

    with pytest.raises(UserError, match="ShapeWorld toy backbones"):
        pretrain(compose("pretrain", ["backbone=sd15_tiny", f"output={tmp_path}/x"]))


def test_a_finished_stage_continues_to_a_longer_budget_exactly(tmp_path):
    """resume=true with more denoiser steps continues the finished run: the same weights as the longer
    run from scratch (constant lr, per-step randomness by step number, optimiser state restored)."""
    common = ["trainer.max_steps=null", "vae.steps=2", "trainer.keep_checkpoints=true", "trainer.checkpoint_every=1"]
    _pretrain("sd15", tmp_path / "a", *common, "denoiser.steps=2")
    _pretrain("sd15", tmp_path / "a", *common, "denoiser.steps=3", "resume=true", "overwrite=true")
    # twice: the second continuation must start from the first one's checkpoint, not the original's
    extended = _pretrain("sd15", tmp_path / "a", *common, "denoiser.steps=4", "resume=true", "overwrite=true")
    longer = _pretrain("sd15", tmp_path / "b", *common, "denoiser.steps=4")
    first = load_file(str(extended / "unet" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(longer / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    # each continuation overwrote last.ckpt (a versioned last-v1.ckpt would leave the stale one to resume from)
    assert sorted(p.name for p in (tmp_path / "a.partial" / "checkpoints" / "denoiser").iterdir()) == ["last.ckpt"]
    stages = json.loads((extended / "recipe.json").read_text())["training"]["stages"]
    assert [s["steps"] for s in stages] == [2, 4]

    from conceptkit.errors import UserError

    with pytest.raises(UserError, match="already ran 4 steps"):
        _pretrain("sd15", tmp_path / "b", *common, "denoiser.steps=3", "resume=true", "overwrite=true")


def test_init_continues_an_earlier_output_and_vae_steps_zero_keeps_its_vae(tmp_path):
    """init=<folder> starts every part from that output; vae.steps=0 keeps its VAE and latent scale
    (the denoiser was trained at that scale); the recipe records the earlier recipe."""
    first = _pretrain("sd15", tmp_path / "a", "corpus.orientation=random")
    second = _pretrain("sd15", tmp_path / "b", f"init={first}", "vae.steps=0")
    for part, name in (("vae", "diffusion_pytorch_model"), ("unet", "diffusion_pytorch_model")):
        before = load_file(str(first / part / f"{name}.safetensors"))
        after = load_file(str(second / part / f"{name}.safetensors"))
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same if part == "vae" else not same, part  # the VAE kept, the denoiser trained on
    scale = lambda folder: json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(second) == scale(first)
    recipe = json.loads((second / "recipe.json").read_text())["training"]
    assert recipe["stages"][0] == {"name": "vae", "steps": 0, "from": str(first)}
    assert recipe["init"]["training"]["corpus"]["orientation"] == "random"

    from conceptkit.errors import UserError

    with pytest.raises(UserError, match="vae.steps=0 needs init"):
        _pretrain("sd15", tmp_path / "c", "vae.steps=0")
    with pytest.raises(UserError, match="corpus.orientation='sideways': choose one of random, upright"):
        _pretrain("sd15", tmp_path / "c", "corpus.orientation=sideways")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    with pytest.raises(UserError, match="no recipe.json"):
        _pretrain("sd15", tmp_path / "d", f"init={tmp_path}")
    with pytest.raises(UserError, match="not this backbone's architecture"):
        _pretrain("wan21", tmp_path / "e", f"init={first}")


def test_latent_gain_scales_the_stored_latent_statistics_and_the_encoded_latents(tmp_path):
    """vae.latent_gain=g multiplies the normalised latents: Wan's latents_std is stored divided by g
    (latents_mean kept), and a backbone loading the folder encodes g times larger latents. With
    init=<folder> and vae.steps=0 it is relative to that folder's scale; a bad value fails in one line."""
    from conceptkit.config import compose
    from conceptkit.errors import UserError

    first = _pretrain("wan21", tmp_path / "a")
    second = _pretrain("wan21", tmp_path / "b", f"init={first}", "vae.steps=0", "vae.latent_gain=4")
    config = lambda folder: json.loads((folder / "vae" / "config.json").read_text())  # noqa: E731
    assert config(second)["latents_mean"] == config(first)["latents_mean"]
    assert np.allclose(np.array(config(first)["latents_std"]) / 4, config(second)["latents_std"])

    from hydra.utils import instantiate

    pixels = torch.rand(1, 3, 1, 64, 64) * 2 - 1
    encoded = []
    for folder in (first, second):
        backbone = instantiate(compose("train", ["backbone=wan21_shapes", f"backbone.path={folder}"]).backbone).load()
        encoded.append(backbone.encode_media(pixels).mean)
    assert torch.allclose(encoded[1], 4 * encoded[0], atol=1e-4)  # (raw - mean) / (std / 4)

    scale = lambda folder: json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(_pretrain("sd15", tmp_path / "c2", "vae.latent_gain=2")) == pytest.approx(
        2 * scale(_pretrain("sd15", tmp_path / "c1")))
    for bad in ("0", "-1", "big"):
        with pytest.raises(UserError, match="vae.latent_gain"):
            _pretrain("wan21", tmp_path / "d", f"vae.latent_gain={bad}")
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()


def test_corpus_object_weights_set_the_share_of_one_two_and_three_object_scenes(tmp_path):
    """corpus.object_weights reweights how many objects a pretraining scene holds; without it the
    corpus is the world's uniform draw, unchanged (the shipped releases were trained on it)."""
    from conceptkit.training.pretrain import build_corpus

    quiet = lambda *_: None  # noqa: E731
    counts = lambda corpus: np.bincount([len(s.objects) for s in corpus.scenes], minlength=4)[1:]  # noqa: E731
    singles = build_corpus(300, 0, 1, 16, seed=0, orientation="upright", progress=quiet, object_weights=[1, 0, 0])
    assert counts(singles).tolist() == [300, 0, 0]
    skewed = counts(build_corpus(300, 0, 1, 16, seed=0, orientation="upright", progress=quiet,
                                 object_weights=[3, 1, 1]))
    assert 0.5 < skewed[0] / 300 < 0.7 and skewed[1] > 0 and skewed[2] > 0
    default = build_corpus(30, 0, 1, 16, seed=0, orientation="upright", progress=quiet)
    rng = np.random.default_rng(0)
    from conceptkit.world.factors import sample_scene

    assert default.scenes == [sample_scene(rng, split="pretrain", orientation="upright") for _ in range(30)]

    from conceptkit.errors import UserError

    simple = build_corpus(40, 0, 1, 16, seed=0, orientation="upright", progress=quiet, object_weights=[1, 0, 0],
                          allowed={"size": ["large"], "background_colour": ["sand"]})
    assert {(s.objects[0].size, s.background.colour) for s in simple.scenes} == {("large", "sand")}
    with pytest.raises(UserError, match="corpus.allowed=5: give factor -> values"):
        _pretrain("sd15", tmp_path / "w", "corpus.allowed=5")
    with pytest.raises(UserError, match="corpus.allowed: unknown factor 'hue'"):
        _pretrain("sd15", tmp_path / "w", "corpus.allowed={hue:[red]}")
    with pytest.raises(UserError, match="corpus.allowed=.*background_colour.*allow more values"):
        _pretrain("sd15", tmp_path / "w", "corpus.allowed={background_colour:[mauve]}")
    with pytest.raises(UserError, match=r"corpus.object_weights=\[1, 1\]: give three non-negative weights"):
        _pretrain("sd15", tmp_path / "w", "corpus.object_weights=[1,1]")
    assert not (tmp_path / "w").exists() and not (tmp_path / "w.partial").exists()


def _two_object_scene():
    from conceptkit.world.factors import Background, ObjectSpec, Scene

    return Scene([ObjectSpec("star", "red", "striped", "large", (0.3, 0.5)),
                  ObjectSpec("circle", "blue", "plain", "large", (0.72, 0.5))], Background("sand"))


def test_grounded_words_are_those_that_name_exactly_one_object():
    from transformers import CLIPTokenizer

    from conceptkit.backbones.base import shipped_weights_folder
    from conceptkit.training.grounding import object_word_positions

    tokenizer = CLIPTokenizer.from_pretrained(shipped_weights_folder("sd15_shapes") / "tokenizer")
    caption = "a large red striped star left of a large blue circle on a plain sand background"
    ids = tokenizer(caption, return_tensors="pt").input_ids[0]
    found = {tokenizer.decode([int(ids[t])]).strip(): k for t, k in object_word_positions(_two_object_scene(), ids, tokenizer)}
    # "large" names both objects, "plain" is the background's; the rest name one object each.
    assert found == {"red": 0, "striped": 0, "star": 0, "blue": 1, "circle": 1}
    empty = tokenizer("", return_tensors="pt").input_ids[0]
    assert object_word_positions(_two_object_scene(), empty, tokenizer) == []  # a dropped caption grounds nothing


def test_token_grounding_loss_is_tokencompose_token_term_on_a_hand_built_map():
    from conceptkit.training.grounding import token_grounding_loss

    masks = np.zeros((2, 4, 4), bool)
    masks[0, :, :2] = True  # object 0: left half
    masks[1, :, 2:] = True  # object 1: right half
    probs = torch.zeros(1, 16, 3)  # a 4x4 grid of queries, 3 context tokens
    probs.view(1, 4, 4, 3)[0, :, :2, 0] = 1.0  # token 0 looks only at the left half
    probs[0, :, 1] = 1.0  # token 1 looks everywhere
    probs.view(1, 4, 4, 3)[0, :3, :2, 2] = 1.0  # token 2: 6 cells, all on the left half
    assert token_grounding_loss([probs], [[(0, 0)]], [masks]).item() == 0.0
    assert token_grounding_loss([probs], [[(0, 1)]], [masks]).item() == 1.0
    assert token_grounding_loss([probs], [[(1, 1)]], [masks]).item() == pytest.approx(0.25)  # (1 - 1/2)^2
    both = token_grounding_loss([probs, probs], [[(0, 0), (2, 1)]], [masks])
    assert both.item() == pytest.approx((0.0 + 1.0) / 2)  # token 2 has none of its mass on the right half
    assert token_grounding_loss([probs], [[]], [masks]) is None


def test_token_grounding_trains_the_denoiser_and_text_encoder_on_stills_only(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from conceptkit.config import compose
    from conceptkit.method import TrainBatch, TrainingData
    from conceptkit.training.pretrain import BackbonePretraining, build_corpus

    cfg = compose("pretrain", ["backbone=sd15_shapes", "denoiser.grounding_weight=0.5", "denoiser.batch_size=4",
                               "denoiser.caption_dropout=0"])
    backbone = instantiate(cfg.backbone).load()
    corpus = build_corpus(6, 0, 1, backbone.resolution, seed=0, object_weights=[0, 1, 0], progress=lambda _: None)
    trainable = BackbonePretraining(backbone, corpus, cfg.vae, cfg.denoiser, 0.0, keep_latent_scale=True)
    stage = trainable.stages(backbone)[1]
    trainable.begin_stage(stage, backbone)
    data = TrainingData(latents=None, captions=[None] * 6, names=[str(i) for i in range(6)], frames=1)
    batch = TrainBatch(indices=torch.arange(4), data=data, generator=torch.Generator().manual_seed(0))
    terms = trainable.training_loss(batch, backbone, stage)
    assert set(terms) == {"loss", "mse", "grounding"}
    assert terms["loss"].item() == pytest.approx(terms["mse"].item() + 0.5 * terms["grounding"].item(), rel=1e-6)
    assert 0.0 < terms["grounding"].item() < 1.0
    terms["grounding"].backward()
    key = backbone.denoiser.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert key.grad is not None and key.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.text_encoder.parameters())
    assert backbone.hooks.owners() == []  # the recorder is removed after the call
    off = BackbonePretraining(backbone, corpus, OmegaConf.merge(cfg.vae), OmegaConf.merge(
        cfg.denoiser, {"grounding_weight": 0.0}), 0.0, keep_latent_scale=True)
    off._latents = trainable._latents
    assert set(off.training_loss(batch, backbone, stage)) == {"loss"}  # weight 0: the releases' recipe


def test_bad_grounding_settings_fail_in_one_line_before_any_output(tmp_path):
    from conceptkit.errors import UserError

    with pytest.raises(UserError, match=r"denoiser.grounding_weight: must be >= 0"):
        _pretrain("sd15", tmp_path / "g", "denoiser.grounding_weight=-1")
    with pytest.raises(UserError, match=r"denoiser.grounding_sites: 'blocks.9' names no cross-attention site"):
        _pretrain("sd15", tmp_path / "g", "denoiser.grounding_sites=[blocks.9]")
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.partial").exists()
