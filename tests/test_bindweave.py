"""BindWeave on the wan21_i2v family: the context order and the image split, the reference slots, the
negative branch's MLLM pass, the connector, key padding, the toy's growth from text-to-video, references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import held_out_reference, make_backbone, make_method


@pytest.fixture(scope="module")
def backbone():
    return make_backbone("wan21_i2v_tiny")


def attached(backbone, *extra):
    method = make_method("bindweave", "wan21_i2v_tiny", "bw", *extra)
    method.initialize(backbone, None)
    method.attach(backbone)
    return method


def video_latents(backbone, n=2, frames=5, seed=0):
    return backbone.initial_latents(n, backbone.resolution, backbone.resolution, frames,
                                    torch.Generator().manual_seed(seed))


def test_cross_attention_splits_at_one_pictures_rows_and_sums_the_two_attentions(backbone):
    """Hand computation of one I2V cross-attention: the first image_rows (17 on the tiny CLIP, 257 at
    ViT-H) context rows go through add_k/add_v (+ norm_added_k), every later row, the other pictures'
    CLIP rows included, through to_k/to_v; the two attentions are summed before to_out."""
    attn = backbone.denoiser.blocks[0].attn2
    rows = backbone.image_rows
    assert rows == 17
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, attn.inner_dim, generator=generator)
    context = torch.randn(2, 4 * rows + 9, attn.inner_dim, generator=generator)
    with torch.no_grad():
        ours = attn(hidden, context)
        heads = attn.heads

        def split(x):
            return x.unflatten(2, (heads, -1)).transpose(1, 2)

        query = split(attn.norm_q(attn.to_q(hidden)))
        image, text = context[:, :rows], context[:, rows:]
        image_out = F.scaled_dot_product_attention(query, split(attn.norm_added_k(attn.add_k_proj(image))),
                                                   split(attn.add_v_proj(image)))
        text_out = F.scaled_dot_product_attention(query, split(attn.norm_k(attn.to_k(text))), split(attn.to_v(text)))
        expected = attn.to_out[0]((image_out + text_out).transpose(1, 2).flatten(2))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # rows past the first picture's do not touch the image projections: change them, image part stays
    with torch.no_grad():
        changed = context.clone()
        changed[:, rows:2 * rows] += 1.0
        assert not torch.allclose(attn(hidden, changed), ours)


def test_context_is_clip_rows_then_mllm_rows_then_t5_rows(backbone):
    """What every cross-attention receives: [image embedder(4 x image_rows CLIP rows) | text embedder(
    connector(MLLM states) | T5 rows)], the CLIP rows zero-padded to four pictures before the embedder."""
    method = attached(backbone)
    try:
        method.set_references(backbone, {"a": held_out_reference(0)})
        condition = backbone.condition()
        assert condition.image_context.shape[1] == 4 * backbone.image_rows
        assert condition.image_context[0, backbone.image_rows:].abs().sum() == 0  # three unused pictures: zeros
        seen = {}

        def record(module, args):
            seen.setdefault("context", args[1].detach().clone())  # returns None: the call's args stay

        handle = backbone.denoiser.blocks[0].attn2.register_forward_pre_hook(record)
        prompt = "a star moving left"
        with torch.no_grad():
            context, _ = backbone.encode_text([prompt])
            backbone.denoise(video_latents(backbone, 1), torch.tensor([500.0]), context)
        handle.remove()
        embed = backbone.denoiser.condition_embedder
        mllm = backbone.mllm().states(prompt, [p for p in _canvas_pictures(method, backbone)])
        with torch.no_grad():
            image_rows = embed.image_embedder(condition.image_context)
            text_rows = embed.text_embedder(context)
            prefix = method.connector(mllm)
        got = seen["context"]
        assert got.shape[1] == image_rows.shape[1] + context.shape[1]
        torch.testing.assert_close(got[:, : image_rows.shape[1]], image_rows)
        torch.testing.assert_close(got[:, image_rows.shape[1]:], text_rows)
        torch.testing.assert_close(context[0, : mllm.shape[0]], prefix, atol=1e-6, rtol=1e-5)  # MLLM rows first
        t5_rows = backbone.encode_tokens(backbone.tokenize([prompt]))
        torch.testing.assert_close(context[:, mllm.shape[0]:], t5_rows)  # then the T5 rows
    finally:
        method.detach(backbone)


def _canvas_pictures(method, backbone):
    from conceptkit.backbones.video_condition import canvas_picture
    from conceptkit.methods.bindweave.references import inference_canvas

    canvas, _ = inference_canvas(held_out_reference(0), backbone.resolution, backbone.resolution)
    return [canvas_picture(canvas, method.mllm_scale)]


def test_four_reference_slots_come_before_the_video_and_their_output_is_dropped(backbone):
    method = attached(backbone)
    try:
        method.set_references(backbone, {"a": held_out_reference(0), "b": held_out_reference(1)})
        condition = backbone.condition()
        assert condition.slots == 4
        noisy = video_latents(backbone, 1)
        model_input = backbone.i2v_input(noisy, condition)
        z, frames = noisy.shape[1], noisy.shape[2]
        assert model_input.shape[1:3] == (z + 4 + z, 4 + frames)
        assert model_input[:, :z, :4].abs().sum() == 0  # slot frames: zero noisy input
        torch.testing.assert_close(model_input[:, :z, 4:], noisy)
        slots = model_input[:, z:, :4]
        torch.testing.assert_close(slots[0].transpose(0, 1), condition.slot_latents[0])
        assert condition.slot_latents.shape[2:] == backbone.slot_shape()
        assert slots[0, :, 2:].abs().sum() == 0  # two references: slots 3 and 4 all zero
        assert slots[0, 1:4, :2].abs().sum() == 0 and slots[0, 0, :2].sum() > 0  # mask in channel 0 only
        video_part = model_input[:, z:, 4:]
        assert video_part[:, :4].abs().sum() == 0  # the video's mask block is zero
        with torch.no_grad():
            zero_video = backbone.encode_media(torch.zeros(1, 3, 5, backbone.resolution, backbone.resolution)).mean
        torch.testing.assert_close(video_part[:, 4:], zero_video)
        with torch.no_grad():
            context, _ = backbone.encode_text(["a star"])
            t = torch.tensor([300.0])
            out = backbone.denoise(noisy, t, context)
            full = backbone.denoiser(hidden_states=model_input, timestep=t, encoder_hidden_states=context,
                                     encoder_hidden_states_image=condition.image_context).sample
        assert out.shape == noisy.shape
        torch.testing.assert_close(out, full[:, :, 4:])
    finally:
        method.detach(backbone)


def test_negative_branch_runs_the_mllm_on_its_own_text_with_the_same_references(backbone, monkeypatch):
    method = attached(backbone)
    calls = []
    try:
        method.set_references(backbone, {"a": held_out_reference(0)})
        mllm = backbone.mllm()
        original = mllm.states
        monkeypatch.setattr(mllm, "states", lambda text, pictures: calls.append((text, pictures)) or original(text, pictures))
        backbone.generate(["a star moving left"], negative_prompt="blurry", steps=2)
    finally:
        method.detach(backbone)
    texts = [text for text, _ in calls]
    assert sorted(texts) == sorted(["a star moving left", "blurry" + method_negative_suffix()])
    assert len(calls) == 2  # one pass per text for the whole sampling loop
    np.testing.assert_array_equal(calls[0][1][0], calls[1][1][0])  # same reference pictures


def method_negative_suffix():
    from conceptkit.methods.bindweave import MLLM_NEGATIVE_SUFFIX

    return MLLM_NEGATIVE_SUFFIX


def test_connector_is_the_official_two_layer_projection_at_full_size():
    from conceptkit.methods.bindweave import BindWeave

    method = BindWeave()
    method.import_info({"mllm_dim": 3584, "text_dim": 4096})
    method._build()
    connector = method.connector
    assert tuple(connector.linear_1.weight.shape) == (4096, 3584) and connector.linear_1.bias is not None
    assert tuple(connector.linear_2.weight.shape) == (4096, 4096)
    assert connector.act_1.approximate == "tanh"
    states = torch.randn(3, 3584)
    expected = connector.linear_2(F.gelu(connector.linear_1(states), approximate="tanh"))
    torch.testing.assert_close(connector(states), expected)


def test_rows_of_different_mllm_lengths_share_one_call_and_attend_as_if_alone(backbone):
    method = attached(backbone)
    try:
        method.set_references(backbone, {"a": held_out_reference(0)})
        prompts = ["a star", "a red striped star moving left slowly, spinning and bouncing"]
        noisy = video_latents(backbone, 2)
        t = torch.tensor([400.0, 400.0])
        with torch.no_grad():
            context, _ = backbone.encode_text(prompts)
            assert not bool(backbone._key_padding.valid.all())  # the shorter row's prefix is padded
            together = backbone.denoise(noisy, t, context)
            alone = []
            for i, prompt in enumerate(prompts):
                single, _ = backbone.encode_text([prompt])
                alone.append(backbone.denoise(noisy[i:i + 1], t[:1], single))
        torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)
    finally:
        method.detach(backbone)


def test_toy_grown_from_text_to_video_starts_as_that_model():
    """wan21_i2v_shapes is the shipped wan21_shapes grown into the I2V layout: whatever the condition
    channels and one picture's image rows hold, it predicts exactly what the text-to-video toy predicts
    (further pictures' rows enter the text attention, by BindWeave's design, and change it)."""
    from conceptkit.backbones.video_condition import VideoCondition

    t2v, i2v = make_backbone("wan21_shapes"), make_backbone("wan21_i2v_shapes")
    assert i2v.denoiser.config.in_channels == 36 and i2v.family == "wan21_i2v"
    generator = torch.Generator().manual_seed(0)
    latents = video_latents(t2v, 1, frames=9)
    t = torch.tensor([500.0])
    dim = i2v.denoiser.config.image_dim
    with torch.no_grad():
        context, _ = t2v.encode_text(["a red star moving left"])
        plain = t2v.denoise(latents, t, context)
        unconditioned = i2v.denoise(latents, t, context)
        i2v.set_condition("test", VideoCondition(torch.randn(1, 0, 20, 16, 16, generator=generator),
                                                 torch.randn(1, i2v.image_rows, dim, generator=generator)))
        conditioned = i2v.denoise(latents, t, context)
        i2v.set_condition("test", VideoCondition(torch.zeros(1, 0, 20, 16, 16),
                                                 torch.randn(1, 2 * i2v.image_rows, dim, generator=generator)))
        two_pictures = i2v.denoise(latents, t, context)
        i2v.set_condition("test", None)
    assert not torch.allclose(two_pictures, plain)
    torch.testing.assert_close(unconditioned, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conditioned, plain, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_connector_and_the_dit_only_and_lora_mode_keeps_the_dit_frozen(backbone):
    from conftest import example_data, full_batch

    method = make_method("bindweave", "wan21_i2v_tiny", "bw", "method.tune=lora", "method.lora_rank=2")
    data = example_data(backbone, "wan21_i2v_tiny", method=method)
    method.initialize(backbone, data)
    method.attach(backbone)
    try:
        stage = method.stages(backbone)[0]
        method.begin_stage(stage, backbone)
        with torch.no_grad():  # LoRA B starts at zero, which would hide A's gradient
            for p in method.lora.parameters():
                p.add_(0.1)
        method.training_loss(full_batch(method, data), backbone, stage)["loss"].backward()
        assert method.connector.linear_1.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in method.lora.parameters())
        lora_ids = {id(p) for p in method.lora.parameters()}
        for name, p in backbone.denoiser.named_parameters():
            if id(p) not in lora_ids:
                assert p.grad is None and not p.requires_grad, name
        assert not any(p.requires_grad for p in backbone.mllm().network.parameters())
        assert not any(p.requires_grad for p in backbone.image_encoder().model.parameters())
    finally:
        method.detach(backbone)
    assert backbone.lora_owners() == []


def test_training_canvas_is_the_rotated_scaled_subject_on_black(backbone):
    from conceptkit.methods.bindweave.references import training_canvas

    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 20:50] = True
    image[mask] = (200, 10, 10)
    sizes = []
    for seed in range(6):
        canvas, canvas_mask = training_canvas(image, mask, 64, 64, torch.Generator().manual_seed(seed))
        assert canvas.shape == (3, 64, 64) and canvas_mask.shape == (64, 64)
        inside = canvas[:, canvas_mask > 0]
        assert (inside[0] > 0.3).float().mean() > 0.8  # the red subject, not the grey background
        assert (canvas[:, canvas_mask == 0] <= -0.5).float().mean() > 0.9  # black around it (edges blend)
        sizes.append(int(canvas_mask.sum()))
    assert len(set(sizes)) > 3  # scale and rotation vary with the draw


def test_letterbox_centres_and_never_upscales():
    from conceptkit.backbones.video_condition import letterbox

    small = np.full((10, 20, 3), 255, dtype=np.uint8)
    canvas, mask = letterbox(small, 32, 32)
    assert int(mask.sum()) == 200 and mask[11:21, 6:26].all()
    assert torch.all(canvas[:, mask == 0] == -1)
    big = np.full((100, 50, 3), 255, dtype=np.uint8)
    _, mask = letterbox(big, 32, 32)
    assert mask.sum(0).max() == 32 and mask.sum(1).max() == 16  # scaled down to fit the height


def test_bad_references_get_one_clear_line(backbone, tmp_path):
    from conceptkit.compose import load_references
    from conceptkit.errors import UserError

    method = attached(backbone)
    try:
        with pytest.raises(UserError, match="at most 4"):
            method.set_references(backbone, {f"r{k}": held_out_reference(0) for k in range(5)})
        with pytest.raises(UserError, match=r"references\.r: a picture of shape \(4, 4, 3\)"):
            method.set_references(backbone, {"r": np.zeros((4, 4, 3), np.uint8)})
    finally:
        method.detach(backbone)
    with pytest.raises(UserError, match=r"references\.ref2: .*missing\.png is not a file"):
        from PIL import Image

        Image.fromarray(held_out_reference(0)).save(tmp_path / "a.png")
        load_references([str(tmp_path / "a.png"), str(tmp_path / "missing.png")])


def test_shapeworld_clip_corpus_items_are_captioned_clips_with_first_frame_masks():
    from conceptkit.corpus import ShapeWorldClipCorpus

    corpus = ShapeWorldClipCorpus(size=20, resolution=64, frames=9)
    for index in range(6):
        item = corpus[index]
        assert item.video.shape == (9, 64, 64, 3) and np.array_equal(item.video[0], item.image)
        assert 1 <= len(item.objects) <= 2
        for obj in item.objects:
            assert item.caption[slice(*obj.span)] == obj.word and obj.mask.any()
            assert "moving" in item.caption or "still" in item.caption or "spinning" in item.caption
    assert not corpus[3].caption == ShapeWorldClipCorpus(size=20, seed=1)[3].caption


def test_shapes_s2v_runs_end_to_end_on_the_tiny_backbone(tmp_path):
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "conceptkit.cli", "bench", "suite=shapes_s2v", "methods=[bindweave]",
                          "suite_backbone=wan21_i2v_tiny", "concepts=2", "samples_per_prompt=1", "sample_steps=2",
                          "train_steps=2", "train_overrides=['data.corpus.workers=0','method.batch_size=1']",
                          f"output={tmp_path / 's2v'}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "s2v" / "results.json").read_text())
    assert {r["variant"] for r in results["records"]} == {"named_words", "words_only", "bindweave"}
    assert sorted(len(r["objects"]) for r in results["records"] if r["variant"] == "bindweave") == [1, 2]
    for record in results["records"]:
        assert all(0 <= record[m] <= 1 for m in ("identity", "exact", "count", "direction", "background"))
        assert (tmp_path / "s2v" / record["strips"]).is_file()
    assert (tmp_path / "s2v" / "results.md").is_file() and (tmp_path / "s2v" / "report.html").is_file()


def test_s2v_base_rows_read_the_suite_backbone_path(tmp_path):
    # the toy I2V backbone is a text-to-video folder grown at load: a new pretrain output given as
    # suite_backbone_path must be what the named_words / words_only rows render with too
    from omegaconf import OmegaConf

    from conceptkit.bench.subject_video import base_backbone_overrides

    cfg = OmegaConf.create({"suite_backbone": "wan21_i2v_shapes", "suite_backbone_path": None})
    assert base_backbone_overrides(cfg) == ["backbone=wan21_shapes"]
    cfg.suite_backbone_path = str(tmp_path)
    assert base_backbone_overrides(cfg) == ["backbone=wan21_shapes", f"backbone.path={tmp_path}"]


def test_s2v_scores_the_truth_as_right_and_another_case_as_wrong():
    from conceptkit.bench.subject_video import score_clips, subject_video_cases
    from conceptkit.world.factors import HELDOUT_COMBOS, Background, Motion, ObjectSpec, Scene
    from conceptkit.world.render import render_clip

    cases = subject_video_cases(2, 0, 64)
    assert [len(c.combos) for c in cases] == [1, 2]
    assert all(combo in HELDOUT_COMBOS for case in cases for combo in case.combos)
    assert cases[1].prompt().startswith(("a {r0} moving", "an {r0} moving")) and "; " in cases[1].prompt()
    case = cases[1]
    objects = [ObjectSpec(*combo, "large", (0.3 + 0.4 * k, 0.3 + 0.4 * k)) for k, combo in enumerate(case.combos)]
    motions = [Motion(direction, "fast") for direction in case.directions]
    truth = [render_clip(Scene(objects, Background(case.background), motions), 9, 64)]
    scores = score_clips(truth, case)
    assert scores["identity"] == 1.0 and scores["count"] == 1.0 and scores["background"] == 1.0
    assert scores["direction"] == 1.0
    assert score_clips(truth, cases[0])["identity"] < 1.0


def test_full_size_i2v_at_random_is_a_layout_on_the_meta_device_counted_on_paper(tmp_path):
    """backbone=wan21_i2v backbone.weights=random without a GPU: Wan2.1-I2V-14B's layout, nothing
    allocated; suite=layout counts its parameters and one sample's saved activations."""
    import json

    from omegaconf import OmegaConf

    from conceptkit.bench.layout import run_layout_suite
    from conceptkit.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("with a GPU the full-size I2V is allocated for real")
    cfg = OmegaConf.create({"methods": ["bindweave"], "backbones": ["wan21_i2v"],
                            "overrides": ["backbone.weights=random"], "output": str(tmp_path / "layout")})
    run_layout_suite(cfg)
    row = json.loads((tmp_path / "layout" / "results.json").read_text())["rows"][0]
    parts = row["parts"]
    assert 16.0e9 < parts["DiT (trains)"] < 16.8e9  # Wan2.1-I2V-14B with its image projections and embedder
    assert 7.5e9 < parts["MLLM (Qwen2.5-VL-7B)"] < 8.0e9  # 8.3 B with the LM head, which is not loaded
    assert 5.5e9 < parts["UMT5 text encoder"] < 5.8e9
    assert parts["connector (trains)"] == 3584 * 4096 + 4096 + 4096 * 4096 + 4096
    assert row["activations"] > 100 * 2 ** 30 and row["attention_matrices"] > row["activations"]
    backbone = make_backbone_with("wan21_i2v", "backbone.weights=random")
    assert backbone.layout_only
    with pytest.raises(UserError, match="meta device"):
        backbone.denoise(torch.zeros(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.zeros(1, 512, 4096))


def make_backbone_with(name, *overrides):
    from hydra.utils import instantiate

    from conftest import train_config

    return instantiate(train_config("bindweave", name, *overrides).backbone).load()


def test_a_large_concept_is_sharded_and_loads_identically(tmp_path, monkeypatch):
    """A fully fine-tuned DiT goes into Hugging Face-style shards past SHARD_BYTES (forced small here)."""
    import json

    from conceptkit import artifact
    from conceptkit.artifact import load_concept, write_concept

    backbone = make_backbone("wan21_i2v_tiny")
    method = attached(backbone)
    with torch.no_grad():
        method.connector.linear_1.bias.add_(1.0)
        backbone.denoiser.proj_out.bias.add_(0.5)  # a tuned DiT weight
    monkeypatch.setattr(artifact, "SHARD_BYTES", 64 * 1024)
    folder = write_concept(tmp_path / "bw.concept", method, backbone, "{}", training={})
    index = json.loads((folder / "weights.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "weights.safetensors").exists()
    assert set(index["weight_map"]) == set(method.state_dict())
    expected = {k: v.clone() for k, v in method.state_dict().items()}
    method.detach(backbone)
    fresh = make_backbone("wan21_i2v_tiny")
    loaded, _ = load_concept(folder, fresh)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(fresh.denoiser.proj_out.bias, expected["tuned.proj_out__bias"])


def test_bindweave_trains_on_a_user_clip_corpus(tmp_path):
    """data.corpus.source=<folder> with clip lines (conceptkit.corpus): BindWeave trains on the user's
    clips and their first-frame masks as on ShapeWorld's, and the concept composes."""
    import imageio.v3 as iio
    from PIL import Image

    from conceptkit.config import compose
    from conceptkit.training.run import train

    corpus = tmp_path / "clips"
    corpus.mkdir()
    lines = []
    for n, colour in enumerate([(200, 30, 30), (30, 60, 220)]):
        clip = np.full((7, 32, 32, 3), 90, dtype=np.uint8)
        for f in range(7):
            clip[f, 10:18, 2 + 2 * f:10 + 2 * f] = colour
        iio.imwrite(corpus / f"c{n}.gif", clip, duration=100, loop=0)
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[10:18, 2:10] = 255
        Image.fromarray(mask).save(corpus / f"c{n}_block.png")
        lines.append({"video": f"c{n}.gif", "caption": "a block moving right", "objects": [
            {"word": "block", "mask": f"c{n}_block.png"}]})
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    folder = train(compose("train", ["method=bindweave", "backbone=wan21_i2v_tiny", f"data.corpus.source={corpus}",
                                     "data.corpus.workers=0", "method.batch_size=1", "trainer.max_steps=2",
                                     "trainer.progress_bar=false", "sample.count=0", f"output={tmp_path / 'bw.concept'}"]))
    assert (folder / "concept.json").is_file()
