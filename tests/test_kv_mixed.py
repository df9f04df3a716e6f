"""KV-mixed visual prompts: the hook's maths, the corpus training contract, references in compose,
compositional guidance (what it masks, what it refines), and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import condition, example_data, full_batch, make_backbone, make_method, held_out_reference, train_config


def attached(*extra):
    backbone = make_backbone("sd15_tiny")
    method = make_method("kv_mixed", "sd15_tiny", "kv", *extra)
    method.initialize(backbone, example_data(backbone, "sd15_tiny", method=method))
    method.attach(backbone)
    return backbone, method


class KeysAndValues:
    """A `key_value` hook after the method's: records what the cross-attention then uses."""

    def __init__(self):
        self.seen = []

    def key_value(self, site, key, value):
        self.seen.append((site, key.detach().clone(), value.detach().clone()))
        return key, value


@pytest.mark.parametrize("mode", ["kv_mixed", "coarse", "fine"])
def test_slots_take_keys_and_values_from_their_own_sources_through_own_projections(mode):
    """At the slot positions: keys = to_k_vp(key tokens), values = to_v_vp(value tokens), with the
    tokens the mode names (KV-mixed: layout -> K, appearance -> V); every other position keeps the
    frozen text keys and values."""
    backbone, method = attached(f"method.mode={mode}")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    condition(method, backbone, "thing")
    layout, appearance = method.reference_tokens
    recorder = KeysAndValues()
    backbone.hooks.add("recorder", recorder, selector=lambda site: site.kind == "cross")
    prompt = method.prompt("a {thing} on the beach")
    assert prompt == "a thing <kv:vp0> on the beach"
    context, tokenized = backbone.encode_text([prompt])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        backbone.denoise(latents, torch.tensor([500]), context)
    slots = (tokenized.input_ids[0] >= backbone.tokens.reserved_ids(method.slot_token(0)).start) & \
            (tokenized.input_ids[0] < backbone.tokens.reserved_ids(method.slot_token(0)).stop)
    assert int(slots.sum()) == method.tokens
    expected_k = {"kv_mixed": layout, "coarse": layout, "fine": appearance}[mode][0]
    expected_v = {"kv_mixed": appearance, "coarse": layout, "fine": appearance}[mode][0]
    site, key, value = recorder.seen[0]
    attention = backbone.denoiser.get_submodule(site.name)
    name = site.name.replace(".", "__")
    with torch.no_grad():
        torch.testing.assert_close(key[0, slots], method.projections.to_k[name](expected_k))
        torch.testing.assert_close(value[0, slots], method.projections.to_v[name](expected_v))
        torch.testing.assert_close(key[0, ~slots], attention.to_k(context)[0, ~slots])
        torch.testing.assert_close(value[0, ~slots], attention.to_v(context)[0, ~slots])
    if mode == "kv_mixed":
        assert not torch.allclose(key[0, slots], method.projections.to_k[name](appearance[0]))


def test_projections_start_as_the_frozen_ones():
    backbone, method = attached()
    for site in (s for s in backbone.attention_sites() if s.kind == "cross"):
        attention = backbone.denoiser.get_submodule(site.name)
        name = site.name.replace(".", "__")
        assert torch.equal(method.projections.to_k[name].weight, attention.to_k.weight)
        assert torch.equal(method.projections.to_v[name].weight, attention.to_v.weight)


def test_each_row_trains_on_its_own_objects_and_gradients_reach_only_the_method():
    backbone, method = attached()
    data = example_data(backbone, "sd15_tiny", method=method)
    batch = full_batch(method, data)
    prompts = method.training_prompts(batch.items)
    for prompt, item in zip(prompts, batch.items):
        for slot, obj in enumerate(item.objects):
            assert f"{obj.word} {method.slot_token(slot)}" in prompt
    stage = method.stages(backbone)[0]
    method.begin_stage(stage, backbone)
    losses = method.training_loss(batch, backbone, stage)
    losses["loss"].backward()
    assert float(losses["objects"]) == sum(len(i.objects) for i in batch.items)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    image_encoder = backbone.image_encoder().model
    for module in [*backbone.frozen_modules(), image_encoder]:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert not any(k.startswith(("image_encoder", "unet", "denoiser")) for k in method.state_dict())


def test_corpus_training_resumes_exactly(tmp_path):
    """The loader starts at the resumed step, so a crash and resume trains on exactly the same items."""
    from test_training import CrashAt

    from conceptkit.training.run import train

    def cfg(name, *extra):
        return train_config("kv_mixed", "sd15_tiny", "trainer.max_steps=4", "trainer.checkpoint_every=1",
                            "trainer.progress_bar=false", "sample.count=0", "name=kv", "method.batch_size=2",
                            "data.corpus.workers=1", f"output={tmp_path / name}", *extra)

    reference = load_file(str(train(cfg("ref.concept")) / "weights.safetensors"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg("crash.concept"), callbacks=[CrashAt("adapter", 2)])
    resumed = load_file(str(train(cfg("crash.concept", "resume=true")) / "weights.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    other = load_file(str(train(cfg("other.concept", "data.corpus.seed=1")) / "weights.safetensors"))
    assert not all(torch.equal(other[k], reference[k]) for k in reference)


def _references(folder, count=3):
    """Held-out objects' reference pictures as files (as users pass them)."""
    paths = []
    for index in range(count):
        path = folder / f"ref{index}.png"
        Image.fromarray(held_out_reference(index)).save(path)
        paths.append(path)
    return paths


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "conceptkit.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_trains_an_encoder_concept_and_composes_references_with_and_without_guidance(tmp_path):
    run = _cli("train", "method=kv_mixed", "backbone=sd15_tiny", "experiment=smoke", "method.batch_size=2",
               "name=kv", "output=kv.concept", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "kv.concept" / "concept.json").read_text())
    assert meta["kind"] == "encoder" and meta["training"]["corpus"].startswith("shapeworld")
    assert "references=" in run.stdout
    star, circle, heart = _references(tmp_path)
    for objects, guided in (([star, circle], "auto"), ([star, circle], "false"), ([star, circle, heart], "true")):
        names = ["star", "circle", "heart"][: len(objects)]
        references = "{" + ",".join(f"{n}:{p}" for n, p in zip(names, objects)) + "}"
        prompt = " and ".join("a {%s}" % n for n in names) + " on a plain sand background"
        out = tmp_path / f"out_{len(objects)}_{guided}"
        run = _cli("compose", "concepts=[kv.concept]", f"references={references}", f"prompt={prompt}", "count=2",
                   "steps=3", f"compositional_guidance={guided}", f"output={out}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        info = json.loads((out / "compose.json").read_text())
        assert all(f"{n} <kv:vp{k}>" in info["expanded_prompt"] for k, n in enumerate(names))
        assert len(list(out.glob("render_*.png"))) == 2
        assert info["compositional_guidance"] == (guided != "false")
        if guided != "false":
            log = json.loads((out / "guidance.json").read_text())
            assert len([r for r in log["rows"] if "render" in r]) == 2
            assert {"first_pass", "segment_and_match", "second_pass", "extra_over_plain"} <= set(log["seconds"])
            assert len(list((out / "first_pass").glob("render_*.png"))) == 2
        else:
            assert not (out / "guidance.json").exists()


def test_an_encoder_concept_and_a_conceptprism_concept_share_one_prompt(tmp_path):
    from conceptkit.artifact import load_concept
    from conceptkit.compose import attach_references, render_prompt
    from conceptkit.training.run import train
    from conftest import predict

    kv = train(train_config("kv_mixed", "sd15_tiny", "experiment=smoke", "sample.count=0", "name=kv",
                            "method.batch_size=2", "data.corpus.workers=0", f"output={tmp_path / 'kv.concept'}"))
    prism = train(train_config("conceptprism", "sd15_tiny", "experiment=smoke", "sample.count=0", "name=dog",
                               f"output={tmp_path / 'dog.concept'}"))
    backbone = make_backbone("sd15_tiny")
    methods = [load_concept(kv, backbone)[0], load_concept(prism, backbone)[0]]
    attach_references(methods, backbone, {"star": held_out_reference(0)})
    prompt = render_prompt("a {star} next to a {dog}", methods)
    assert "star <kv:vp0>" in prompt and methods[1].prompt("{dog}") in prompt
    together = predict(backbone, [prompt])
    methods[0].condition(None, None)  # without the reference's keys and values
    assert not torch.equal(predict(backbone, [prompt]), together)


class Probabilities:
    def __init__(self):
        self.seen = []

    def probabilities(self, site, probs):
        self.seen.append((site, probs.detach().clone()))


def test_guidance_masks_each_reference_outside_its_segment_and_refines_only_the_value_tokens():
    from conceptkit.methods.kv_mixed.guidance import CompositionalGuidance, GuidanceSettings, LazyRegionBias

    backbone, method = attached()
    method.set_references(backbone, {"star": held_out_reference(0), "circle": held_out_reference(1)})
    prompt = method.prompt("a {star} and a {circle}")
    settings = GuidanceSettings(enabled=True, refine_until=1.0, refine_iterations=1, refine_lr=0.1)
    guidance = CompositionalGuidance(method, backbone, settings)
    size = backbone.resolution
    left = np.zeros((size, size), bool)
    left[8:24, 2:14] = True
    right = np.zeros((size, size), bool)
    right[8:24, 18:30] = True
    matched = [{0: left, 1: right}]  # what segmenting and matching would give: star left, circle right
    latent = backbone.initial_noise(1).shape[-2:]
    bias = LazyRegionBias(guidance, matched, 1, latent)
    recorder = Probabilities()
    backbone.hooks.add("guide", bias, selector=lambda site: site.kind == "cross")
    backbone.hooks.add("probs", recorder, selector=lambda site: site.kind == "cross")
    layout, appearance = method.reference_tokens
    keys, values = method.padded(layout), method.padded(appearance)
    refine, losses = guidance.refinement(matched, {"star": held_out_reference(0), "circle": held_out_reference(1)}, 3,
                                         keys, values)
    backbone.generate([prompt], steps=3, callbacks=[refine])
    assert bias.masked_columns == 2 * method.tokens
    first = backbone.tokens.reserved_ids(method.slot_token(0)).start
    ids = backbone.hooks.rows.input_ids[1]  # the conditional row
    star = (ids >= first) & (ids < first + method.tokens)
    circle = (ids >= first + method.tokens) & (ids < first + 2 * method.tokens)
    def on_grid(mask, side):
        cells = torch.nn.functional.interpolate(torch.from_numpy(mask).float()[None, None], size=(side, side),
                                                mode="area")[0, 0].flatten()
        return cells >= settings.region_threshold

    for site, probs in recorder.seen[-3:]:
        side = int(round(probs.shape[2] ** 0.5))
        for columns, mask in ((star, left), (circle, right)):
            inside = on_grid(mask, side)
            share = probs[1][:, :, columns].sum(-1)  # (heads, queries): the object's tokens' attention
            assert torch.all(share[:, ~inside] == 0) and torch.all(share[:, inside] > 0), site.name
    # refinement: the value tokens moved, the key tokens did not; nothing else took a gradient
    assert len(losses) == 3 and all(np.isfinite(entry["identity_loss"]) for entry in losses)
    hook = method._hook
    torch.testing.assert_close(hook.key_tokens, keys.flatten(0, 1))
    refined = hook.value_tokens[1].reshape(values.shape)
    assert not torch.allclose(refined[:2], values[:2])
    assert torch.equal(refined[2:], values[2:])  # unused slots are not touched
    assert all(p.grad is None for p in method.parameters())
    assert all(p.grad is None for module in backbone.frozen_modules() for p in module.parameters())


def test_bad_input_is_one_clear_line(tmp_path):
    run = _cli("train", "method=kv_mixed", "backbone=wan21_tiny", "experiment=smoke", "output=x.concept", cwd=tmp_path)
    assert run.returncode != 0 and "runs on sd15 backbones" in run.stderr and not (tmp_path / "x.concept").exists()
    run = _cli("train", "method=kv_mixed", "backbone=sd15_tiny", "data.corpus.source=nowhere", "output=x.concept",
               cwd=tmp_path)
    assert run.returncode != 0 and "data.corpus.source='nowhere'" in run.stderr
    run = _cli("train", "method=kv_mixed", "backbone=sd15_tiny", "method.mode=both", "output=x.concept", cwd=tmp_path)
    assert run.returncode != 0 and "method.mode='both'" in run.stderr
    assert len([line for line in run.stderr.splitlines() if line.startswith("error")]) == 1


def test_pretrain_writes_an_image_encoder_that_loads_and_encodes(tmp_path):
    """The ShapeWorld image encoder recipe at a seconds-long budget: the folder loads as an encoder
    (global embedding and patch grid of the configured sizes) and carries its zero-shot check."""
    from conceptkit.encoders import load_image_encoder

    run = _cli("pretrain", "encoder=shapes_clip", f"output={tmp_path / 'enc'}", "corpus.pictures=300",
               "evaluation.pictures=40", "train.steps=3", "train.batch_size=32", "trainer.progress_bar=false",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((tmp_path / "enc" / "open_clip_config.json").read_text())
    assert set(info["zero_shot"]["held_out"]) == {"shape", "colour", "pattern", "all"}
    encoder = load_image_encoder(str(tmp_path / "enc"))
    features = encoder.encode([held_out_reference(0), held_out_reference(1)])
    assert features.global_embeds.shape == (2, info["model"]["embed_dim"])
    assert features.grid.shape == (2, 64, info["model"]["vision_cfg"]["width"])  # 32 px / patch 4 = 8 x 8
    assert not torch.allclose(features.global_embeds[0], features.global_embeds[1])
    run = _cli("pretrain", "encoder=dino", f"output={tmp_path / 'x'}", cwd=tmp_path)
    assert run.returncode != 0 and "encoder='dino'" in run.stderr and not (tmp_path / "x").exists()


def test_shapes_visual_prompts_runs_end_to_end_on_a_tiny_backbone(tmp_path):
    run = _cli("bench", "suite=shapes_visual_prompts", "methods=[kv_mixed]", "suite_backbone=sd15_tiny", "concepts=3",
               "samples_per_prompt=2", "sample_steps=2", "train_steps=2", "variants={kv_mixed:[kv_mixed]}",
               "train_overrides=['data.corpus.workers=0','method.batch_size=2']", f"output={tmp_path / 'vp'}",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "vp" / "results.json").read_text())
    rows = {r["variant"] for r in results["records"]}
    assert rows == {"named_words", "words_only", "kv_mixed", "kv_mixed+guidance"}
    assert sorted(len(r["objects"]) for r in results["records"] if r["variant"] == "kv_mixed") == [1, 2, 3]
    for record in results["records"]:
        assert 0 <= record["identity"] <= 1 and 0 <= record["count"] <= 1 and (tmp_path / "vp" / record["grid"]).is_file()
    assert (tmp_path / "vp" / "results.md").is_file() and (tmp_path / "vp" / "report.html").is_file()


def test_suite_cases_use_held_out_objects_each_from_one_reference():
    from conceptkit.bench.visual_prompts import score_case, visual_prompt_cases
    from conceptkit.world.factors import HELDOUT_COMBOS
    from conceptkit.world.render import render_scene
    from conceptkit.world.factors import Background, ObjectSpec, Scene

    cases = visual_prompt_cases(3, 0, 64)
    assert [len(c.combos) for c in cases] == [1, 2, 3]
    for case in cases:
        assert all(combo in HELDOUT_COMBOS for combo in case.combos)
        assert len({combo[0] for combo in case.combos}) == len(case.combos)
        assert all(ref.shape[0] == ref.shape[1] for ref in case.references)
    # the score of the truth itself: the objects asked, on the background asked
    case = cases[1]
    truth = [render_scene(Scene([ObjectSpec(*combo, "large", (0.28 + 0.44 * k, 0.5 + 0.05 * seed))
                                 for k, combo in enumerate(case.combos)], Background(case.background)), 64)
             for seed in range(2)]
    scores = score_case(truth, case)
    assert scores["identity"] == 1.0 and scores["count"] == 1.0 and scores["background"] == 1.0
    assert scores["layout_spread"] > 0
    swapped = score_case(truth, cases[0])  # another case's objects: identity falls
    assert swapped["identity"] < 1.0
