"""The ShapeWorld Qwen2.5-VL captioner: its training requests, `conceptkit pretrain vlm=...` on a few steps,
and the shipped model answering about held-out objects it never saw (captions, BiCo prompts, MLLM states)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_read_caption_inverts_the_grammar_on_every_split():
    from conceptkit.world.captions import caption_scene, read_caption
    from conceptkit.world.factors import sample_scene

    rng = np.random.default_rng(3)
    for i in range(400):
        clip = i % 2 == 1
        scene = sample_scene(rng, split="all", clip_frames=9 if clip else None)
        read = read_caption(caption_scene(scene, rng))
        assert sorted(read["objects"]) == sorted((o.size, o.colour, o.pattern, o.shape) for o in scene.objects)
        assert read["background"] == (scene.background.colour, scene.background.pattern)
        if clip:
            assert read["motions"] == [m.direction for m in scene.motions]
    assert read_caption("a dog on a beach")["objects"] == []


def test_requests_teach_only_the_answer_and_answer_in_the_grammar():
    from conceptkit.backbones.tiny_qwen_vl import tiny_processor, tiny_tokenizer
    from conceptkit.training.pretrain_vlm import encode_requests, make_request, render_corpus, tokenizer_corpus
    from conceptkit.methods.bico.diversify import parse_concept_phrases, parse_prompt_lines
    from conceptkit.world.captions import read_caption

    processor = tiny_processor(tiny_tokenizer(500, tokenizer_corpus(0, captions=200)), side=56)
    scenes, stills, clips = render_corpus(1, 1, 9, 64, 0)
    rng = np.random.default_rng(0)
    requests = [make_request("caption", scenes[0], [stills[0]], rng, 4),
                make_request("prompts", scenes[0], [stills[0]], rng, 4),
                make_request("clip_prompts", scenes[1], list(clips[0]), rng, 4),
                make_request("phrases", scenes[1], list(clips[0]), rng, 4),
                make_request("frame", scenes[1], list(clips[0]), rng, 4),
                make_request("subjects", scenes[1], list(clips[0]), rng, 4)]
    count = len(scenes[1].objects)
    assert [len(r.pictures) for r in requests] == [1, 1, 4, 4, 1, count]
    # BindWeave's turn: the prompt names each object by its shape only, the answer in full, in order;
    # the pictures are the references at half the frame's size, on black
    subjects = requests[5]
    assert subjects.text_first and subjects.instruction.startswith(("a ", "an "))
    for obj in scenes[1].objects:
        assert obj.shape in subjects.instruction and obj.colour not in subjects.instruction
    assert read_caption(subjects.answer)["objects"] == [(o.size, o.colour, o.pattern, o.shape) for o in scenes[1].objects]
    assert all(p.shape == (32, 32, 3) and (p[0, 0] == 0).all() for p in subjects.pictures)
    truth = sorted((o.size, o.colour, o.pattern, o.shape) for o in scenes[0].objects)
    assert sorted(read_caption(requests[0].answer)["objects"]) == truth
    assert 1 <= len(parse_prompt_lines(requests[1].answer, 60)) <= 4
    phrases = parse_concept_phrases(requests[3].answer)
    assert phrases is not None and len(phrases["spatial"]) == len(scenes[1].objects) + 1
    tokenizer = processor.tokenizer
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    inputs, labels = encode_requests(processor, requests, header, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    for request, row in zip(requests, labels):
        taught = tokenizer.decode(row[row != -100])
        assert taught == request.answer + "<|im_end|>"  # nothing of the prompt, the pictures or the padding
    vision = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    for request, ids in zip(requests, inputs["input_ids"]):
        tokens = ids.tolist()
        first_text = tokens.index(tokenizer(request.instruction[:12], add_special_tokens=False).input_ids[0],
                                  tokens.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 3))
        assert (first_text < tokens.index(vision)) == request.text_first  # the order each caller sends


def test_pretrain_vlm_writes_a_folder_captioning_loads(tmp_path):
    from conceptkit.captioning import caption_images, load_vlm
    from conceptkit.config import compose
    from conceptkit.errors import UserError
    from conceptkit.training.pretrain_vlm import pretrain_vlm

    overrides = [f"output={tmp_path / 'vlm'}", "trainer.progress_bar=false", "corpus.stills=12", "corpus.clips=4",
                 "train.steps=2", "train.batch_size=2", "evaluation.stills=2", "evaluation.clips=1",
                 "model.text={hidden_size:32,intermediate_size:64,num_hidden_layers:1,num_attention_heads:2,"
                 "num_key_value_heads:1,mrope_section:[2,3,3]}",
                 "model.vision={depth:1,hidden_size:32,intermediate_size:64,num_heads:2,fullatt_block_indexes:[0]}"]
    folder = pretrain_vlm(compose("pretrain_vlm", overrides), overrides)
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["training"]["steps"] == 2 and set(recipe["check"]) == {"heldout", "pretrain"}
    assert not folder.with_name("vlm.partial").exists()
    vlm = load_vlm(str(folder))
    assert vlm.chat
    assert len(caption_images([np.zeros((64, 64, 3), np.uint8)], vlm, max_new_tokens=4)) == 1
    with pytest.raises(UserError, match="already exists"):
        pretrain_vlm(compose("pretrain_vlm", overrides), overrides)
    wrong = overrides[1:] + [f"output={tmp_path / 'other'}", "+train.clip_tasks.captions=1"]
    with pytest.raises(UserError, match=r"^train.clip_tasks=.*of clip_prompts, phrases, frame, subjects$"):
        pretrain_vlm(compose("pretrain_vlm", wrong), wrong)
    assert not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def shipped():
    from conceptkit.captioning import load_vlm

    return load_vlm("shapes_qwen25vl")


def test_shipped_vlm_reads_colours_and_backgrounds_of_held_out_objects(shipped):
    """What the shipped release reads (its card): each object's colour and the background; its shape
    (about 1 in 4) and pattern (chance) readings are not asserted here."""
    from conceptkit.captioning import DEFAULT_INSTRUCTION, describe
    from conceptkit.world.captions import read_caption
    from conceptkit.world.factors import is_heldout, sample_scene
    from conceptkit.world.render import render_scene
    from PIL import Image

    rng = np.random.default_rng(11)
    colours = backgrounds = 0
    for _ in range(16):
        scene = sample_scene(rng, n_objects=1, split="heldout", orientation="upright")
        assert is_heldout(scene.objects[0])
        read = read_caption(describe(shipped, [Image.fromarray(render_scene(scene, 64))], DEFAULT_INSTRUCTION, 64) or "")
        colours += [c for _, c, _, _ in read["objects"]] == [scene.objects[0].colour]
        backgrounds += (read["background"] or (None,))[0] == scene.background.colour
    assert colours >= 12 and backgrounds >= 12, (colours, backgrounds)  # chance: 1 in 8 and 1 in 6


def test_shipped_vlm_writes_bico_prompts_and_phrases_for_a_clip(shipped):
    from conceptkit.methods.bico.diversify import concept_phrases, diversified_prompts
    from conceptkit.training.pretrain_vlm import clip_views, render_corpus
    from conceptkit.world.captions import read_caption
    from PIL import Image

    scenes, _, clips = render_corpus(0, 1, 9, 64, 5, split="heldout")
    views = [Image.fromarray(clips[0][i]) for i in clip_views(9)]
    phrases = concept_phrases([views], shipped)[0]
    assert phrases is not None and phrases["spatial"]
    prompts = diversified_prompts("sks", None, 60, shipped, clip=views, phrases=phrases)
    assert 2 <= len(prompts) <= 60  # taught min(N, 4) lines; greedy decoding may add one
    colours = {o.colour for o in scenes[0].objects}
    assert all(len(read_caption(p)["objects"]) >= 1 for p in prompts)  # prompts in the world's grammar
    assert any({c for _, c, _, _ in read_caption(p)["objects"]} & colours for p in prompts)


def test_shipped_vlm_is_the_toy_i2v_mllm_and_its_states_tell_pictures_apart():
    from conceptkit.mllm import load_mllm
    from conceptkit.training.pretrain_vlm import render_corpus

    states = load_mllm("shapes_qwen25vl")
    _, stills, _ = render_corpus(2, 0, 9, 64, 7, split="heldout")
    first, second = states.states("an object", [stills[0]]), states.states("an object", [stills[1]])
    assert first.shape == second.shape and first.shape[1] == states.hidden_size
    assert not np.allclose(first.numpy(), second.numpy(), atol=1e-3)
