"""Quality suites: their data and metrics, checked on ground-truth renders (where the right answer is
known), and the full shapes_subject pipeline on the tiny backbone (fast; no quality expected)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conceptkit.bench.report import matplotlib_available


def test_subject_references_and_metrics_on_ground_truth(tmp_path):
    from PIL import Image

    from conceptkit.bench.suites import TRAIN_BACKGROUNDS, score_subject, write_subject_references
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.render import render_scene

    case = write_subject_references(("star", "red", "striped"), tmp_path / "ref", seed=0)
    files = sorted(case.folder.glob("*.png"))
    assert len(files) == 4 and all(f.with_suffix(".txt").read_text().strip() for f in files)
    assert case.name == "red_striped_star"
    # ground truth: the concept on the requested background scores perfect fidelity, no leakage
    rng = np.random.default_rng(5)
    images, wanted = [], []
    for background in ("sand", "teal", "sand", "teal"):
        scene = sample_scene(rng, n_objects=1, split="heldout", allowed={
            "shape": ["star"], "colour": ["red"], "pattern": ["striped"], "background_colour": [background],
            "background_pattern": ["plain"]})
        images.append(render_scene(scene))
        wanted.append(background)
    train = {b for b, _ in TRAIN_BACKGROUNDS}
    scores = score_subject(images, wanted, ("star", "red", "striped"), train)
    assert scores["concept_fidelity"] == 1.0 and scores["prompt_fidelity"] == 1.0 and scores["leakage"] == 0.0
    assert scores["shape_fidelity"] == scores["colour_fidelity"] == scores["pattern_fidelity"] == 1.0
    assert scores["diversity"] > 0
    # one factor right is counted for that factor only (the concept is the red striped star)
    scores = score_subject(images, wanted, ("star", "blue", "dotted"), train)
    assert (scores["shape_fidelity"], scores["colour_fidelity"], scores["pattern_fidelity"]) == (1.0, 0.0, 0.0)
    assert scores["concept_fidelity"] == 0.0
    # diversity follows the object that carries part of the concept (here its shape) ...
    assert scores["diversity"] > 0
    # a training image shown for a test prompt is leakage, and a wrong object is no fidelity
    leaked = [np.asarray(Image.open(files[0]))] * 2
    scores = score_subject(leaked, ["sand", "teal"], ("circle", "blue", "dotted"), train)
    assert scores["leakage"] == 1.0 and scores["concept_fidelity"] == 0.0 and scores["prompt_fidelity"] == 0.0
    # ... and is undefined (None, "-" in the report), not 0, when no sample shows any of its factors
    assert scores["diversity"] is None


def test_multi_and_motion_metrics_on_ground_truth(tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    from conceptkit.bench.motion import MotionCase, score_composed
    from conceptkit.bench.suites import score_multi, write_motion_references, write_multi_reference

    image_path, sentence, masks = write_multi_reference([("star", "red", "striped"), ("circle", "blue", "dotted")],
                                                        tmp_path / "multi", seed=0)
    assert "{red_striped_star}" in sentence and "{blue_dotted_circle}" in sentence
    pair = np.asarray(Image.open(image_path))
    # each object's visible pixels, in sentence order: disjoint, and the oracle reads that object there
    from conceptkit.world.oracle import read_image

    assert masks.shape == (2, 64, 64) and masks.any((1, 2)).all() and not (masks[0] & masks[1]).any()
    order = sorted(["red_striped_star", "blue_dotted_circle"], key=sentence.index)
    for mask, word in zip(masks, order):
        alone = np.where(mask[..., None], pair, pair[~masks.any(0)][0])  # the object on a flat background
        assert ["_".join((o.colour, o.pattern, o.shape)) for o in read_image(alone).objects] == [word]
    # the two-object image itself: each word present, but not separated
    assert score_multi([pair], ("star", "red", "striped"), ("circle", "blue", "dotted")) == {
        "word_fidelity": 1.0, "separation": 0.0, "shape_fidelity": 1.0, "colour_fidelity": 1.0,
        "pattern_fidelity": 1.0, "colour_separation": 0.0}
    # a red striped circle alone: the star word's colour and pattern, not its shape; blue absent
    from conceptkit.world.factors import Background, ObjectSpec, Scene
    from conceptkit.world.render import render_scene

    circle = render_scene(Scene([ObjectSpec("circle", "red", "striped", "large", (0.5, 0.5))], Background("sand"), None))
    assert score_multi([circle, pair], ("star", "red", "striped"), ("circle", "blue", "dotted")) == {
        "word_fidelity": 0.5, "separation": 0.5, "shape_fidelity": 0.5, "colour_fidelity": 1.0,
        "pattern_fidelity": 1.0, "colour_separation": 0.5}
    # objects=seen: each held-out object's nearest pretraining triple (same shape and colour), drawn and read back
    from conceptkit.bench.suites import multi_cases
    from conceptkit.errors import UserError
    from conceptkit.world.factors import HELDOUT_COMBOS

    seen = multi_cases(4, tmp_path / "seen", seed=0, resolution=64, objects="seen")
    for case, heldout_pair in zip(seen, zip(HELDOUT_COMBOS[::2], HELDOUT_COMBOS[1::2])):
        assert sorted(c[:2] for c in case.combos) == sorted(c[:2] for c in heldout_pair)
        assert not set(case.combos) & set(HELDOUT_COMBOS)
        found = {(o.shape, o.colour, o.pattern) for o in read_image(np.asarray(Image.open(case.image))).objects}
        assert found == set(case.combos)
    with pytest.raises(UserError, match="shapes_multi takes two pretraining combinations"):
        write_multi_reference([("star", "red", "striped"), ("circle", "blue", "checkered")], tmp_path / "bad", 0,
                              objects="seen")
    still, clip_path = write_motion_references(("heart", "green", "checkered"), "left", tmp_path / "motion", seed=0)
    case = MotionCase("green_checkered_heart_left", ("heart", "green", "checkered"), "left", still, clip_path)
    clip = iio.imread(clip_path, index=None)
    source_background = read_image(clip[0]).background_colour
    # every case's sources: the mover shares no factor with the subject; the still and the clip stand on
    # two different backgrounds, neither a test one (so leakage and prompt fidelity can be told apart)
    from conceptkit.bench.motion import motion_cases
    from conceptkit.bench.suites import TEST_BACKGROUNDS

    for source_case in motion_cases(8, tmp_path / "cases", seed=0, frames=9, resolution=64):
        mover_reading = read_image(iio.imread(source_case.clip, index=0)[..., :3])
        still_reading = read_image(np.asarray(Image.open(source_case.still).convert("RGB")))
        assert [(o.shape, o.colour, o.pattern) for o in still_reading.objects] == [source_case.subject]
        (mover,) = mover_reading.objects
        assert all(a != b for a, b in zip((mover.shape, mover.colour, mover.pattern), source_case.subject)), source_case
        backgrounds = {mover_reading.background_colour, still_reading.background_colour}
        assert len(backgrounds) == 2 and backgrounds.isdisjoint(TEST_BACKGROUNDS), source_case
    # the motion source itself: another object moving left, on the source's background
    mover = score_composed([clip], case, [source_background], {source_background})
    assert mover == {"subject_fidelity": 0.0, "motion_fidelity": 0.0, "shape_fidelity": 0.0, "colour_fidelity": 0.0,
                     "direction_fidelity": 1.0, "prompt_fidelity": 1.0, "source_leakage": 0.0}
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.render import render_clip

    rng = np.random.default_rng(3)
    scene = sample_scene(rng, n_objects=1, split="heldout", clip_frames=9, allowed={
        "shape": ["heart"], "colour": ["green"], "pattern": ["checkered"], "direction": ["left"], "speed": ["fast"],
        "rotation": ["none"], "background_colour": ["teal"]})
    composed = render_clip(scene, 9)
    assert score_composed([composed], case, ["teal"], {source_background}) == {
        "subject_fidelity": 1.0, "motion_fidelity": 1.0, "shape_fidelity": 1.0, "colour_fidelity": 1.0,
        "direction_fidelity": 1.0, "prompt_fidelity": 1.0, "source_leakage": 0.0}
    # asked for sand, drawn on the source's background: leakage; the same subject still: no motion
    still_clip = np.repeat(composed[:1], 9, axis=0)
    assert score_composed([still_clip], case, ["sand"], {"teal"}) == {
        "subject_fidelity": 1.0, "motion_fidelity": 0.0, "shape_fidelity": 1.0, "colour_fidelity": 1.0,
        "direction_fidelity": 0.0, "prompt_fidelity": 0.0, "source_leakage": 1.0}


def test_shapes_subject_runs_end_to_end_on_a_tiny_backbone(tmp_path):
    from conceptkit.bench import run_suite
    from conceptkit.bench.suites import SUBJECT_METRICS
    from conceptkit.config import compose

    cfg = compose("bench", ["suite=shapes_subject", "methods=[textual_inversion,conceptprism]",
                            "suite_backbone=sd15_tiny", "concepts=1", "train_steps=2", "samples_per_prompt=1",
                            "sample_steps=2", "drift_prompts=2", f"output={tmp_path}",
                            "train_overrides=['trainer.accumulate=1']",
                            "variants={bico_lr1e3:[bico,'method.lr=0.001','method.prompt_count=16']}", "keep_work=true"])
    with pytest.warns(UserWarning):  # BiCo without a VLM says its prompts are offline wordings
        run_suite(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["method"], r["concept"]) for r in results["records"]] == [
        ("textual_inversion", "textual_inversion", "red_striped_star"), ("conceptprism", "conceptprism", "red_striped_star"),
        ("bico_lr1e3", "bico", "red_striped_star")]
    for record in results["records"]:
        for metric in SUBJECT_METRICS:
            assert isinstance(record[metric], float)
        assert (tmp_path / record["grid"]).is_file()
    report = (tmp_path / "report.md").read_text()
    assert "| conceptprism |" in report and "| bico_lr1e3 |" in report
    html = (tmp_path / "report.html").read_text()  # beside it: the same table, and the plot
    assert "<td>bico_lr1e3</td>" in html and ("data:image/png;base64," in html) == matplotlib_available()
    # BiCo binds the neutral word, never the references' world captions (which name the held-out factors),
    # and the variant's overrides reach it
    meta = json.loads((tmp_path / "work" / "bico_lr1e3_red_striped_star.concept" / "concept.json").read_text())
    assert meta["hparams"]["description"] == "object" and meta["hparams"]["lr"] == 0.001
    prompts = meta["method_info"]["training_prompts"]  # the 16th wording would wrap a caption if there were one
    assert prompts[:2] == ["object", "a photo of object"] and prompts[15] == "object" and len(prompts) == 16
    assert results["settings"]["variants"] == {"bico_lr1e3": ["bico", "method.lr=0.001", "method.prompt_count=16"]}


def test_a_missing_suite_backbone_folder_is_one_clear_line(tmp_path):
    from conceptkit.bench import run_suite
    from conceptkit.config import compose
    from conceptkit.errors import UserError

    for suite in ("base_quality", "shapes_subject"):
        with pytest.raises(UserError, match="suite_backbone_path: .*no_such_folder is not a folder"):
            run_suite(compose("bench", [f"suite={suite}", f"suite_backbone_path={tmp_path / 'no_such_folder'}",
                                        f"output={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def test_shapes_motion_runs_end_to_end_on_a_tiny_video_backbone(tmp_path):
    """Pipeline only (1 step per stage, random tiny backbone): each method trains a subject concept on
    the still and a motion concept on the clip, both are attached to one prompt, the clips are scored."""
    from conceptkit.bench import run_suite
    from conceptkit.bench.motion import MOTION_METRICS
    from conceptkit.config import compose

    cfg = compose("bench", ["suite=shapes_motion", "methods=[]", "suite_backbone=wan21_tiny", "concepts=1",
                            "train_steps=1", "samples_per_prompt=1", "sample_steps=2", f"output={tmp_path}",
                            "train_overrides=['trainer.accumulate=1']",
                            "variants={bico:[bico,'method.prompt_count=2'],lora_both:[lora]}", "keep_work=true"])
    with pytest.warns(UserWarning):  # BiCo without a VLM says its prompts are offline wordings
        run_suite(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["concept"]) for r in results["records"]] == [
        ("bico", "red_striped_star_left"), ("lora_both", "red_striped_star_left"), ("named_words", "red_striped_star_left")]
    bico, lora, named = results["records"]
    # the untrained ceiling: the base model told the subject's and the motion's own words
    assert named["prompts"] == ["a large red striped star moving left fast on a plain sand background",
                                "a large red striped star moving left fast on a plain teal background"]
    assert named["method"] == "none" and named["train_seconds"] == 0.0
    assert bico["prompts"][0] == "a large <subject> <motion> on a plain sand background"
    assert "object" in lora["prompts"][0] and "moving" in lora["prompts"][0]  # DreamBooth's class nouns
    for role, word in (("subject", "object"), ("motion", "moving")):  # BiCo binds neutral descriptions
        meta = json.loads((tmp_path / "work" / f"bico_red_striped_star_left_{role}.concept" / "concept.json").read_text())
        assert meta["hparams"]["description"] == word
    assert meta["method_info"]["clip_frames"] > 1  # the motion concept trained on the clip (dual-branch binders)
    for record in results["records"]:
        assert all(isinstance(record[m], float) for m in MOTION_METRICS)
        assert (tmp_path / record["grid"]).is_file()
    report = (tmp_path / "report.md").read_text()
    assert "| lora_both | lora | - |" in report and "| named_words | none | - |" in report
    assert "<td>lora_both</td>" in (tmp_path / "report.html").read_text()


def test_shapes_motion_needs_a_video_backbone(tmp_path):
    from conceptkit.bench import run_suite
    from conceptkit.config import compose
    from conceptkit.errors import UserError

    with pytest.raises(UserError, match="makes images only; use a video backbone"):
        run_suite(compose("bench", ["suite=shapes_motion", "methods=[bico]", "suite_backbone=sd15_tiny",
                                    f"output={tmp_path / 'out'}"]))
    with pytest.raises(UserError, match="concepts: shapes_motion has 1 to 8"):
        run_suite(compose("bench", ["suite=shapes_motion", "methods=[bico]", "suite_backbone=wan21_tiny",
                                    "concepts=9", f"output={tmp_path / 'out'}"]))
    # Without suite_backbone, shapes_motion takes the video toy (the issue's `suite=shapes_motion methods=[bico]`)
    # and the image suites sd15_shapes; a bad value is caught before the backbone loads.
    for suite, backbone, message in (("shapes_motion", "wan21_shapes", "concepts: shapes_motion has 1 to 8"),
                                     ("shapes_subject", "sd15_shapes", "concepts: at most 8")):
        cfg = compose("bench", [f"suite={suite}", "methods=[bico]", "concepts=99", f"output={tmp_path / 'out'}"])
        with pytest.raises(UserError, match=message):
            run_suite(cfg)
        assert cfg.suite_backbone == backbone
    with pytest.raises(UserError, match="variants.named_words: that label is the suite's own untrained row"):
        run_suite(compose("bench", ["suite=shapes_motion", "methods=[]", "suite_backbone=wan21_tiny",
                                    "variants={named_words:[bico]}", f"output={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def test_shapes_multi_runs_end_to_end_with_variants_on_a_tiny_backbone(tmp_path):
    """Pipeline only (2 steps, random tiny backbone): every variant trains on the two-object image,
    each word is rendered alone (MCPL: its own token; Textual Inversion: its one token) and scored."""
    from conceptkit.bench import run_suite
    from conceptkit.config import compose
    from conceptkit.errors import UserError

    cfg = compose("bench", ["suite=shapes_multi", "methods=[mcpl,textual_inversion]", "suite_backbone=sd15_tiny",
                            "concepts=1", "train_steps=2", "samples_per_prompt=1", "sample_steps=2",
                            f"output={tmp_path}", "train_overrides=['trainer.accumulate=1']",
                            "variants={mcpl_no_reg:[mcpl,'method.mask=skip','method.contrastive_weight=0']}"])
    run_suite(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = [(r["variant"], r["word"]) for r in results["records"]]
    words = [w for _, w in rows[:2]]  # in sentence order
    assert sorted(words) == ["blue_dotted_circle", "red_striped_star"]
    assert results["records"][0]["sentence"].index(words[0]) < results["records"][0]["sentence"].index(words[1])
    assert rows == [(v, w) for v in ("mcpl", "textual_inversion", "mcpl_no_reg", "named_words") for w in words]
    # the untrained ceiling row: the base model told each object's own words
    named = {r["word"]: r for r in results["records"] if r["variant"] == "named_words"}
    assert named["blue_dotted_circle"]["prompts"][0] == "a picture of a large blue dotted circle"
    assert named["red_striped_star"]["method"] == "none" and named["red_striped_star"]["train_seconds"] == 0.0
    for record in results["records"]:
        assert isinstance(record["word_fidelity"], float) and isinstance(record["separation"], float)
        assert (tmp_path / record["grid"]).is_file()
    prompts = {(r["variant"], r["word"]): r["prompts"] for r in results["records"]}
    assert prompts[("mcpl", "red_striped_star")][0] == "a picture of a large <pair0/red_striped_star>"
    assert prompts[("textual_inversion", "blue_dotted_circle")][0] == "a picture of a large <pair0>"
    # each MCPL word starts from its object's class noun (what ties the word to its object)
    # the base model's attention of each word's init noun on its own object: once per word, every variant
    shares = {(r["variant"], r["word"]): r["base_own_attention"] for r in results["records"]}
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert len({shares[(v, words[0])] for v in ("mcpl", "textual_inversion", "mcpl_no_reg", "named_words")}) == 1
    inits = {r["variant"]: r["init_words"] for r in results["records"]}
    assert inits["mcpl"] == {"red_striped_star": "star", "blue_dotted_circle": "circle"} == inits["mcpl_no_reg"]
    assert inits["textual_inversion"] is None
    assert results["settings"]["variants"]["mcpl_no_reg"] == ["mcpl", "method.mask=skip", "method.contrastive_weight=0"]
    report = (tmp_path / "report.md").read_text()
    assert "| mcpl_no_reg | mcpl | method.mask=skip method.contrastive_weight=0 |" in report
    assert "<td>mcpl_no_reg</td>" in (tmp_path / "report.html").read_text()
    # the mean mask area: MCPL with masking has one, the unmasked variant and Textual Inversion "-"
    assert "train mask area |" in report
    assert f"looks at its own object: {shares[('mcpl', words[0])]:.2f}" in report
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert rows["mcpl"].rstrip(" |").split(" | ")[-1] != "-"
    assert rows["mcpl_no_reg"].endswith(" - |") and rows["textual_inversion"].endswith(" - |")
    assert rows["named_words"].startswith("| named_words | none | - |")
    assert not (tmp_path / "work").exists()
    with pytest.raises(UserError, match="variants.named_words: that label is the suite's own untrained row"):
        run_suite(compose("bench", ["suite=shapes_multi", "methods=[mcpl]", "suite_backbone=sd15_tiny",
                                    f"output={tmp_path}", "variants={named_words:[mcpl]}"]))
    with pytest.raises(UserError, match="objects: shapes_multi takes heldout or seen, got 'unseen'"):
        run_suite(compose("bench", ["suite=shapes_multi", "methods=[mcpl]", "objects=unseen", "suite_backbone=sd15_tiny",
                                    f"output={tmp_path / 'objects'}"]))
    assert not (tmp_path / "objects").exists()
    with pytest.raises(UserError, match="1 to 4 pairs of held-out objects, got 5"):
        run_suite(compose("bench", ["suite=shapes_multi", "methods=[mcpl]", "concepts=5", "suite_backbone=sd15_tiny",
                                    f"output={tmp_path}"]))


@pytest.mark.parametrize("backbone", ["sd15_tiny", "wan21_tiny"])
def test_base_quality_runs_and_scores_ground_truth(tmp_path, backbone):
    import torch

    from conceptkit.bench import run_suite
    from conceptkit.bench.quality import quality_cases, score_sample
    from conceptkit.config import compose
    from conceptkit.world.render import render_clip, render_scene

    cfg = compose("bench", ["suite=base_quality", f"suite_backbone={backbone}", "quality_prompts=2",
                            "sample_steps=2", f"output={tmp_path}"])
    run_suite(cfg)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"vae_reconstruction", "pretrain", "heldout"} and results["pretrain"]["samples"] == 2
    assert 0 <= results["vae_reconstruction"]["shape"] <= 1
    # the scorer gives full marks to the world's own renders of the prompted scene
    frames = 9 if backbone == "wan21_tiny" else None
    for caption, scene in quality_cases("heldout", 3, seed=1, clip_frames=frames):
        pixels = render_clip(scene, 9) if frames else render_scene(scene)[None]
        media = torch.from_numpy(pixels).permute(3, 0, 1, 2).float() / 255
        assert all(score_sample(media, scene).values()), caption


def test_own_object_shares_on_hand_built_attention():
    """Word 0 looks only at the left half, word 1 three quarters right: with object 0 filling the left
    half and object 1 the right, the shares are 1 and 0.75 (maps laid out on the latent grid)."""
    from types import SimpleNamespace

    import torch

    from conceptkit.attention import AttentionSite
    from conceptkit.backbones.base import LatentDistribution, NoisyBatch
    from conceptkit.bench.word_attention import own_object_shares

    site = AttentionSite("mid.attn2", "cross", 0, 8, 8, 2, "spatial")
    vocabulary = {"a": 5, "ball": 7, "and": 6, "box": 9}
    left = torch.zeros(4, 4)
    left[:, :2] = 1

    class Hooks:
        def __init__(self):
            self.hook = None

        def add(self, owner, hook, selector=None):
            self.hook = hook if selector(site) else None

        def remove(self, owner):
            self.hook = None

    class Stub:
        hooks = Hooks()

        def tokenizer(self, word, add_special_tokens=False):
            return SimpleNamespace(input_ids=[vocabulary[word]])

        def encode_media(self, pixels):
            return LatentDistribution(torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8))

        def encode_text(self, texts):
            ids = torch.tensor([[vocabulary[w] for w in texts[0].split()]])
            return torch.zeros(1, ids.shape[1], 8), SimpleNamespace(input_ids=ids)

        def make_noisy(self, latents, generator, timesteps):
            return NoisyBatch(latents, timesteps, latents)

        def denoise(self, noisy, timesteps, context):
            probs = torch.zeros(noisy.shape[0], 2, 16, context.shape[1])  # (B, heads, 4x4 queries, tokens)
            probs[:, :, :, 1] = (left / left.sum()).flatten()  # "ball"
            probs[:, :, :, 4] = (0.25 * left / left.sum() + 0.75 * (1 - left) / (1 - left).sum()).flatten()  # "box"
            if self.hooks.hook is not None:
                self.hooks.hook.probabilities(site, probs)
            return noisy

    masks = np.zeros((2, 32, 32), bool)
    masks[0, :, :16], masks[1, :, 16:] = True, True
    shares = own_object_shares(Stub(), np.zeros((32, 32, 3), np.uint8), masks, "a ball and a box",
                               ["ball", "box"], ["mid.attn2"])
    assert shares == pytest.approx([1.0, 0.75])
    with pytest.raises(ValueError, match="not one token"):
        own_object_shares(Stub(), np.zeros((32, 32, 3), np.uint8), masks, "a ball and a ball", ["ball", "box"],
                          ["mid.attn2"])
