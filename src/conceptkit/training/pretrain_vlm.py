"""`conceptkit pretrain vlm=shapes_qwen25vl`: the ShapeWorld vision-language model, from scratch.

Real backbones get Qwen2.5-VL-7B-Instruct: BindWeave reads its hidden states, BiCo asks it for
training prompts and concept phrases, ConceptPrism for captions. No VLM knows ShapeWorld, so the toy
gets one of the same classes (`Qwen2_5_VLForConditionalGeneration` and Qwen's processor; sizes in
conf/pretrain_vlm.yaml), trained here to answer exactly those requests about world renders, in the
world's caption grammar (world/captions.py), by teacher forcing on the answer tokens:

  caption       conceptkit.captioning's default instruction, one still     -> one caption
  frame         BiCo's frame instruction (with or without the clip's spatial phrases), one still or
                one frame of a clip                                        -> one still caption
  prompts       BiCo's image instruction for N prompts, one still          -> min(N, max_lines) captions
  clip_prompts  BiCo's clip instruction (with or without phrases), 4 frames -> min(N, max_lines) clip captions
  phrases       BiCo's concept-phrase instruction, 4 frames                -> "spatial: ..." / "temporal: ..."
  subjects      BindWeave's MLLM turn: the clip's prompt naming each object by its shape word only, THEN
                each object's reference canvas (cut from the first frame, letterboxed on black at the
                video's size, at half size: what BindWeave shows the MLLM at inference)
                                                                           -> the clip caption, each object
                                                                              named in full (colour, pattern)

The answers are re-phrased by the grammar at every step, so sampled decoding varies the wording as
BiCo's diversification wants; greedy decoding gives the most likely one. Scenes come from the
pretraining split only: held-out (shape, colour, pattern) triples are never shown or named. The check
after training captions held-out scenes (the objects personalization uses) and reads the answers
back with the grammar's inverse (`read_caption`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conceptkit.errors import UserError
from conceptkit.method import Stage, TrainBatch, TrainingData

VLMS = ("shapes_qwen25vl",)
CLIP_VIEWS = 4  # frames of a clip in one message: what BiCo shows a VLM (methods/bico CLIP_VIEWS)
PROMPT_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 30, 40, 50, 60)  # N of "write N prompts" in training
STILL_TASKS = ("caption", "frame", "prompts")
CLIP_TASKS = ("clip_prompts", "phrases", "frame", "subjects")
SUBJECT_SCALE = 0.5  # BindWeave's MLLM sees each reference canvas at half size (methods/bindweave mllm_scale)


@dataclass
class Request:
    """One message and the answer taught for it: pictures (H, W, 3) uint8 in order, the instruction."""

    pictures: list[np.ndarray]
    instruction: str
    answer: str
    task: str
    text_first: bool = False  # BindWeave's order [text, pictures]; captioning's is [pictures, text]


def spatial_phrases(scene) -> list[str]:
    """The concept phrases of what a scene shows: each object by size, colour, pattern and shape, then
    the background ("large red striped star", "sand gradient background")."""
    from conceptkit.world.captions import describe_object

    background = scene.background
    word = {"plain": "plain ", "noise": "grainy ", "gradient": ""}[background.pattern]
    tail = " gradient background" if background.pattern == "gradient" else " background"
    return [describe_object(o, with_size=True) for o in scene.objects] + [f"{word}{background.colour}{tail}"]


def temporal_phrases(scene) -> list[str]:
    """Each object's motion as one comma-free phrase ("red star moving left slowly and spinning");
    empty when nothing moves (BiCo's "temporal: none")."""
    from conceptkit.world.captions import SPEED_ADVERBS

    phrases = []
    for obj, motion in zip(scene.objects, scene.motions or []):
        parts = []
        if motion.direction != "none":
            parts.append(f"moving {motion.direction} {SPEED_ADVERBS[motion.speed][0]}")
        if motion.rotation == "spin":
            parts.append("spinning")
        if motion.bounce and motion.direction != "none":
            parts.append("bouncing off the edges")
        if parts:
            phrases.append(f"{obj.colour} {obj.shape} " + " and ".join(parts))
    return phrases


def frame_scene(scene, frame: int):
    """The still scene frame `frame` of a clip shows: every object at its pose then, no motions."""
    from conceptkit.world.factors import Scene, pose_at

    objects = []
    for obj, motion in zip(scene.objects, scene.motions):
        centre, angle = pose_at(obj, motion, frame)
        objects.append(replace(obj, centre=tuple(centre), orientation=float(angle)))
    return Scene(objects, scene.background, None)


def clip_views(frames: int, count: int = CLIP_VIEWS) -> list[int]:
    """`count` evenly spaced frame indices, first and last included (what BiCo shows)."""
    return [int(round(i)) for i in np.linspace(0, frames - 1, count)]


def distinct_captions(scene, count: int, rng: np.random.Generator) -> list[str]:
    """`count` captions of the scene, different wordings where the grammar has them."""
    from conceptkit.world.captions import caption_scene

    captions: list[str] = []
    for _ in range(8 * count):
        caption = caption_scene(scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    captions += [captions[0]] * (count - len(captions))  # a scene with fewer wordings than asked: repeat one
    return captions


def subject_canvases(scene, first_frame: np.ndarray) -> list[np.ndarray] | None:
    """Each object's reference as BindWeave's MLLM sees it at inference: cut out of the clip's first
    frame (conceptkit.corpus.reference_picture), letterboxed on black at the frame's size, at half size.
    None when an object does not show in the first frame (covered by another)."""
    from conceptkit.backbones.video_condition import canvas_picture, letterbox
    from conceptkit.corpus import reference_picture
    from conceptkit.world.render import object_masks

    height, width = first_frame.shape[:2]
    canvases = []
    for mask in object_masks(scene, height):
        if not mask.any():
            return None
        canvas, _ = letterbox(reference_picture(first_frame, mask), height, width)
        canvases.append(canvas_picture(canvas, SUBJECT_SCALE))
    return canvases


def shape_word_prompt(scene, rng: np.random.Generator) -> str:
    """A clip prompt naming each object by its shape word only ("a star moving left slowly; a circle
    moving up, on a plain sand background"), as subject-to-video prompts do: the references carry the rest."""
    from conceptkit.world.captions import background_phrase, motion_phrase

    parts = [f"{'an' if o.shape[0] in 'aeiou' else 'a'} {o.shape} {motion_phrase(m, rng)}"
             for o, m in zip(scene.objects, scene.motions)]
    return "; ".join(parts) + ", " + background_phrase(scene.background, rng)


def make_request(task: str, scene, pictures, rng: np.random.Generator, max_lines: int) -> Request:
    """The message of `task` about `scene` (a still: one picture; a clip: its frames) and its answer."""
    from conceptkit.captioning import DEFAULT_INSTRUCTION
    from conceptkit.vlm_requests import (INSTRUCTION, PHRASES_INSTRUCTION, SPATIAL, TEMPORAL, clip_instruction,
                                         frame_instruction)
    from conceptkit.world.captions import caption_scene

    clip = scene.motions is not None
    if task == "caption":
        return Request([pictures[0]], DEFAULT_INSTRUCTION, caption_scene(scene, rng), task)
    if task == "frame":
        if clip:
            frame = int(rng.integers(len(pictures)))
            still, picture, phrases_of = frame_scene(scene, frame), pictures[frame], scene
        else:
            still, picture, phrases_of = scene, pictures[0], scene
        phrases = {SPATIAL: spatial_phrases(phrases_of), TEMPORAL: []} if rng.random() < 0.5 else None
        return Request([picture], frame_instruction(phrases), caption_scene(still, rng), task)
    count = int(PROMPT_COUNTS[int(rng.integers(len(PROMPT_COUNTS)))])
    if task == "prompts":
        answer = "\n".join(distinct_captions(scene, min(count, max_lines), rng))
        return Request([pictures[0]], INSTRUCTION.format(count=count), answer, task)
    views = [pictures[i] for i in clip_views(len(pictures))]
    if task == "clip_prompts":
        phrases = ({SPATIAL: spatial_phrases(scene), TEMPORAL: temporal_phrases(scene)} if rng.random() < 0.5
                   else None)
        answer = "\n".join(distinct_captions(scene, min(count, max_lines), rng))
        return Request(views, clip_instruction(len(views), count, phrases), answer, task)
    if task == "subjects":
        canvases = subject_canvases(scene, pictures[0])
        if canvases is None:  # an object hidden in the first frame has no reference: ask for prompts instead
            return make_request("clip_prompts", scene, pictures, rng, max_lines)
        return Request(canvases, shape_word_prompt(scene, rng), caption_scene(scene, rng), task, text_first=True)
    if task == "phrases":
        temporal = temporal_phrases(scene)
        answer = f"spatial: {', '.join(spatial_phrases(scene))}\ntemporal: {', '.join(temporal) or 'none'}"
        return Request(views, PHRASES_INSTRUCTION.format(frames=len(views)), answer, task)
    raise ValueError(f"unknown captioner task {task!r}")


def tokenizer_corpus(seed: int, captions: int = 4000) -> list[str]:
    """What the BPE is learned on: the chat template's words, every instruction the model answers, and
    world captions and phrases of every split (the vocabulary has no held-out words: every single value
    is in pretraining; held-out objects are new combinations)."""
    from conceptkit.backbones.tiny_qwen_vl import CORPUS
    from conceptkit.captioning import DEFAULT_INSTRUCTION
    from conceptkit.vlm_requests import CLIP_INSTRUCTION, FRAME_INSTRUCTION, INSTRUCTION, PHRASES_INSTRUCTION
    from conceptkit.world.captions import caption_scene
    from conceptkit.world.factors import sample_scene

    rng = np.random.default_rng(seed)
    texts = list(CORPUS) + [DEFAULT_INSTRUCTION, FRAME_INSTRUCTION, "spatial: temporal: none"]
    texts += [INSTRUCTION.format(count=n) for n in PROMPT_COUNTS]
    texts += [CLIP_INSTRUCTION.format(frames=CLIP_VIEWS, count=n) for n in PROMPT_COUNTS]
    texts += [PHRASES_INSTRUCTION.format(frames=CLIP_VIEWS)]
    for i in range(captions):
        scene = sample_scene(rng, split="pretrain", clip_frames=9 if i % 2 else None)
        texts.append(caption_scene(scene, rng))
        texts.append(", ".join(spatial_phrases(scene) + (temporal_phrases(scene) if scene.motions else [])))
    return texts


class CaptionerTraining(nn.Module):
    """The Qwen2.5-VL network (registered, so Lightning checkpoints it) and its one stage."""

    def __init__(self, network, processor, stills: np.ndarray, clips: np.ndarray, scenes: list, train: DictConfig):
        super().__init__()
        self.network = network
        self.processor = processor
        self.stills, self.clips, self.scenes = stills, clips, scenes  # (N, H, W, 3), (M, F, H, W, 3) uint8
        self.train_cfg = train
        tokenizer = processor.tokenizer
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def stages(self, backbone=None) -> list[Stage]:
        r = self.train_cfg
        return [Stage("captioner", steps=int(r.steps), lr=float(r.lr), batch_size=int(r.batch_size), grad_clip=1.0,
                      weight_decay=float(r.weight_decay))]

    def begin_stage(self, stage, backbone=None) -> None:
        self.network.requires_grad_(True).train()

    def param_groups(self, stage):
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def request(self, index: int, rng: np.random.Generator) -> Request:
        scene = self.scenes[index]
        if index < len(self.stills):
            shares, pictures = self.train_cfg.still_tasks, [self.stills[index]]
        else:
            shares, pictures = self.train_cfg.clip_tasks, list(self.clips[index - len(self.stills)])
        names = list(shares)
        weights = np.array([float(shares[n]) for n in names])
        task = str(rng.choice(names, p=weights / weights.sum()))
        return make_request(task, scene, pictures, rng, int(self.train_cfg.max_lines))

    def training_loss(self, batch: TrainBatch, backbone, stage) -> dict[str, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=batch.generator))
        rng = np.random.default_rng(seed)
        requests = [self.request(int(i), rng) for i in batch.indices]
        inputs, labels = encode_requests(self.processor, requests, self.header, self.end)
        device = next(self.network.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        output = self.network(**inputs, labels=labels.to(device))
        return {"loss": output.loss}


def chat_prompt(processor, instruction: str, count: int, text_first: bool = False) -> str:
    """conceptkit.captioning's message: the pictures, then the instruction, with the generation prompt
    (`text_first`: BindWeave's, conceptkit.mllm's: the text, then the pictures)."""
    from conceptkit.captioning import chat_content

    return processor.apply_chat_template([{"role": "user", "content": chat_content(instruction, count, text_first)}],
                                         add_generation_prompt=True, tokenize=False)


def encode_requests(processor, requests: list[Request], header: list[int], end: int):
    """Processor inputs of the prompt + answer of every request, and labels: the answer tokens and the
    closing <|im_end|> only (prompt, pictures and padding are -100)."""
    from PIL import Image

    texts = [chat_prompt(processor, r.instruction, len(r.pictures), r.text_first) + r.answer + "<|im_end|>"
             for r in requests]
    images = [Image.fromarray(p) for r in requests for p in r.pictures]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    inputs.pop("mm_token_type_ids", None)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.full_like(ids, -100)
    width = len(header)
    for row in range(len(requests)):
        tokens = ids[row].tolist()
        starts = [k for k in range(len(tokens) - width + 1) if tokens[k:k + width] == header]
        begin = starts[-1] + width
        stop = max(k for k in range(len(tokens)) if tokens[k] == end and mask[row, k]) + 1
        labels[row, begin:stop] = ids[row, begin:stop]
    return dict(inputs), labels


def render_corpus(stills: int, clips: int, frames: int, resolution: int, seed: int, split: str = "pretrain",
                  progress=print):
    """Scenes of `split` (stills first, then clips) and their renders as numpy uint8."""
    from conceptkit.training.pretrain import build_corpus

    if split == "pretrain":
        corpus = build_corpus(stills, clips, frames, resolution, seed, orientation="upright", progress=progress)
        scenes = corpus.scenes
        still_pixels = corpus.images[:, :, 0].permute(0, 2, 3, 1).numpy()
        clip_pixels = corpus.clips.permute(0, 2, 3, 4, 1).numpy() if clips else np.zeros((0, frames, resolution,
                                                                                           resolution, 3), np.uint8)
        return scenes, still_pixels, clip_pixels
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.render import render_clip, render_scene

    rng = np.random.default_rng(seed)
    still_scenes = [sample_scene(rng, split=split, orientation="upright") for _ in range(stills)]
    clip_scenes = [sample_scene(rng, split=split, clip_frames=frames, orientation="upright") for _ in range(clips)]
    still_pixels = np.stack([render_scene(s, resolution) for s in still_scenes]) if stills else None
    clip_pixels = np.stack([render_clip(s, frames, resolution) for s in clip_scenes]) if clips else None
    return still_scenes + clip_scenes, still_pixels, clip_pixels


def caption_check(vlm, scenes: list, stills, clips, frames: int) -> dict:
    """Greedy answers on `scenes` (stills first, then clips) read back with the grammar's inverse.
    Stills (default caption instruction): every object named exactly (size, colour, pattern, shape, as
    a multiset), per factor on one-object scenes, background colour and pattern. Clips (BiCo's clip
    instruction for 4 prompts, first line): objects exact, each object's direction, and how many
    prompts the answer gives (asked 4). Subjects (BindWeave's turn: the shape-word prompt, then each
    object's reference canvas): per object of the answer, in order, its colour, pattern and shape, and
    all three."""
    from conceptkit.captioning import DEFAULT_INSTRUCTION, describe
    from conceptkit.vlm_requests import CLIP_INSTRUCTION, parse_prompt_lines
    from conceptkit.world.captions import read_caption
    from PIL import Image

    def truth(scene):
        return sorted((o.size, o.colour, o.pattern, o.shape) for o in scene.objects)

    hits = {"still_objects_exact": 0, "background_colour": 0, "background_pattern": 0}
    single = {"size": 0, "colour": 0, "pattern": 0, "shape": 0}
    singles = 0
    n_stills = 0 if stills is None else len(stills)
    for scene, picture in zip(scenes[:n_stills], stills if stills is not None else []):
        read = read_caption(describe(vlm, [Image.fromarray(picture)], DEFAULT_INSTRUCTION, 64) or "")
        hits["still_objects_exact"] += sorted(read["objects"]) == truth(scene)
        background = read["background"] or (None, None)
        hits["background_colour"] += background[0] == scene.background.colour
        hits["background_pattern"] += background[1] == scene.background.pattern
        if len(scene.objects) == 1:
            singles += 1
            obj, named = scene.objects[0], (read["objects"] or [(None,) * 4])[0]
            for k, factor in enumerate(("size", "colour", "pattern", "shape")):
                single[factor] += named[k] == getattr(obj, factor)
    clip_hits = {"clip_objects_exact": 0, "direction": 0, "prompt_lines": 0}
    motions = 0
    clip_scenes = scenes[n_stills:]
    for scene, clip in zip(clip_scenes, clips if clips is not None else []):
        views = [Image.fromarray(clip[i]) for i in clip_views(frames)]
        answer = describe(vlm, views, CLIP_INSTRUCTION.format(frames=len(views), count=4), 256) or ""
        lines = parse_prompt_lines(answer, 4)
        clip_hits["prompt_lines"] += len(lines)
        read = read_caption(lines[0] if lines else "")
        clip_hits["clip_objects_exact"] += sorted(read["objects"]) == truth(scene)
        said = read["motions"] or []
        for k, motion in enumerate(scene.motions):
            motions += 1
            clip_hits["direction"] += k < len(said) and said[k] == motion.direction
    subject_hits = {"colour": 0, "pattern": 0, "shape": 0, "exact": 0}
    subjects = 0
    rng = np.random.default_rng(0)  # the prompts' wording
    for scene, clip in zip(clip_scenes, clips if clips is not None else []):
        canvases = subject_canvases(scene, clip[0])
        if canvases is None:
            continue
        answer = describe(vlm, [Image.fromarray(c) for c in canvases], shape_word_prompt(scene, rng), 128,
                          text_first=True) or ""
        named = read_caption(answer)["objects"] or []
        for k, obj in enumerate(scene.objects):
            subjects += 1
            said = named[k] if k < len(named) else (None,) * 4
            agree = [said[1] == obj.colour, said[2] == obj.pattern, said[3] == obj.shape]
            for factor, hit in zip(("colour", "pattern", "shape"), agree):
                subject_hits[factor] += hit
            subject_hits["exact"] += all(agree)
    result = {k: round(v / max(1, n_stills), 4) for k, v in hits.items()}
    result.update({f"subject_{k}": round(v / max(1, subjects), 4) for k, v in subject_hits.items()})
    result.update({f"single_{k}": round(v / max(1, singles), 4) for k, v in single.items()})
    result["clip_objects_exact"] = round(clip_hits["clip_objects_exact"] / max(1, len(clip_scenes)), 4)
    result["direction"] = round(clip_hits["direction"] / max(1, motions), 4)
    result["prompt_lines_per_answer"] = round(clip_hits["prompt_lines"] / max(1, len(clip_scenes)), 2)
    result.update(stills=n_stills, single_object_stills=singles, clips=len(clip_scenes), subjects=subjects)
    return result


def build_network(cfg: DictConfig):
    """(network, processor) of the configured sizes, random from cfg.seed, with its generation config."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from conceptkit.backbones.tiny_qwen_vl import tiny_config, tiny_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer(int(cfg.model.vocab_size), tokenizer_corpus(int(cfg.seed)))
    side = int(cfg.model.image_side)
    processor = tiny_processor(tokenizer, side=side)
    config = tiny_config(tokenizer, text=OmegaConf.to_container(cfg.model.text, resolve=True),
                         vision=OmegaConf.to_container(cfg.model.vision, resolve=True), side=side)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        network = Qwen2_5_VLForConditionalGeneration(config)
    ids = tokenizer.convert_tokens_to_ids
    network.generation_config = GenerationConfig(eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
                                                 pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"))
    return network, processor


def continued_network(folder: Path):
    """(network, processor) of an earlier output, to train further (its sizes and tokenizer kept)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if not (folder / "config.json").exists():
        raise UserError(f"init={folder}: not a folder written by conceptkit pretrain vlm=... (no config.json)")
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def pretrain_vlm(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    import logging

    import lightning as L

    from conceptkit.backbones.base import shipped_vlm_folder
    from conceptkit.captioning import VisionLanguageModel
    from conceptkit.training.auxiliary import output_folder, publish, train_auxiliary

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if cfg.vlm not in VLMS:
        raise UserError(f"vlm={cfg.vlm!r}: conceptkit pretrain trains {', '.join(VLMS)}")
    for key, names in (("still_tasks", STILL_TASKS), ("clip_tasks", CLIP_TASKS)):
        shares = cfg.train[key] or {}
        unknown = [n for n in shares if n not in names]
        if unknown or any(float(v) < 0 for v in shares.values()) or sum(float(v) for v in shares.values()) <= 0:
            raise UserError(f"train.{key}={OmegaConf.to_container(shares)}: give non-negative shares, not all zero, "
                            f"of {', '.join(names)}")
    output = output_folder(cfg, shipped_vlm_folder(cfg.vlm))
    L.seed_everything(cfg.seed, verbose=False)
    started = time.time()
    network, processor = continued_network(Path(cfg.init)) if cfg.init else build_network(cfg)
    c = cfg.corpus
    print(f"rendering {c.stills} stills and {c.clips} clips of ShapeWorld's pretraining split (seed {cfg.seed})",
          flush=True)
    scenes, stills, clips = render_corpus(int(c.stills), int(c.clips), int(c.frames), int(c.resolution), int(cfg.seed))
    trainable = CaptionerTraining(network, processor, stills, clips, scenes, cfg.train)
    data = TrainingData(latents=None, captions=[None] * len(scenes), names=[str(i) for i in range(len(scenes))],
                        frames=1)
    module, stage, device, partial = train_auxiliary(trainable, data, cfg, output)
    trained_seconds = time.time() - started
    network.eval().requires_grad_(False)
    e = cfg.evaluation
    print(f"checking the captioner on {e.stills} stills and {e.clips} clips of each split", flush=True)
    vlm = VisionLanguageModel(name=str(output), processor=processor, network=network, device=device)
    check = {}
    for split, offset in (("heldout", 1), ("pretrain", 2)):
        split_scenes, split_stills, split_clips = render_corpus(int(e.stills), int(e.clips), int(c.frames),
                                                                int(c.resolution), int(cfg.seed) + offset, split=split)
        check[split] = caption_check(vlm, split_scenes, split_stills, split_clips, int(c.frames))
    staging = output.with_name(output.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    network.save_pretrained(staging)
    processor.save_pretrained(staging)
    recipe = {
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "command": " ".join(["conceptkit pretrain", *(overrides or [])]),
        "training": {"seconds": round(trained_seconds, 1), "steps": stage.steps, "final_terms": module.last_terms,
                     "device": str(device), "parameters": sum(p.numel() for p in network.parameters())},
        "check": check}
    earlier = Path(cfg.init) / "recipe.json" if cfg.init else None
    if earlier is not None and earlier.is_file():
        recipe["init"] = json.loads(earlier.read_text())  # every release's recipe, back to the first
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    publish(staging, output)
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(partial, ignore_errors=True)
    return output
