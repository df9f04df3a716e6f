"""`conceptkit pretrain encoder=shapes_clip`: the ShapeWorld image encoder encoder methods condition on.

Real SD1.5 has IP-Adapter's CLIP ViT-H/14; the ShapeWorld toy has no image encoder that knows its
world, so one is trained here: an open_clip CLIP of a small custom config (conf/pretrain_encoder.yaml),
contrastively, on object pictures cut out of pretraining-split scenes (what references look like:
the object on grey, square) against their world descriptions ("red striped star"). Held-out
(shape, colour, pattern) combinations never appear; the recipe's own check is zero-shot shape, colour
and pattern accuracy on held-out objects' pictures, over every description of the world.

Contrastive targets: a batch holds many pictures of one description (the world has 192), so every
pair with the same description is a positive (targets spread over them), not only the diagonal.
Trained through the same LightningModule as concepts (resumable, progress bar, reproducible from the
seed); written in conceptkit.encoders' open_clip folder format.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conceptkit.errors import UserError
from conceptkit.method import Stage, TrainBatch, TrainingData

ENCODERS = ("shapes_clip",)


def object_pictures(count: int, resolution: int, size: int, seed: int, split: str = "pretrain", progress=print):
    """`count` object pictures (N, 3, size, size) uint8 cut out of ShapeWorld scenes, and descriptions."""
    from conceptkit.corpus import ShapeWorldCorpus, square_resized

    corpus = ShapeWorldCorpus(size=10 * count + 10, resolution=resolution, seed=seed, split=split)
    pictures, descriptions = [], []
    started, index = time.time(), 0
    while len(pictures) < count:
        for obj in corpus[index].objects:
            if len(pictures) < count:
                pictures.append(square_resized(obj.reference, size))
                descriptions.append(obj.description)
        index += 1
        if len(pictures) % 10000 < 3 and len(pictures) >= 10000 and progress:
            progress(f"  cut {len(pictures)}/{count} object pictures ({time.time() - started:.0f} s)")
    tensor = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()
    return tensor, descriptions


def all_descriptions() -> list[str]:
    from conceptkit.world.captions import describe_object
    from conceptkit.world.factors import COLOURS, PATTERNS, SHAPES, ObjectSpec

    return [describe_object(ObjectSpec(shape, colour, pattern, "large", (0.5, 0.5)))
            for shape in SHAPES for colour in COLOURS for pattern in PATTERNS]


def description_factors(description: str) -> dict[str, str]:
    from conceptkit.world.factors import COLOURS, PATTERNS, SHAPES

    words = description.split()
    pattern = next((w for w in words if w in PATTERNS), "plain")
    return {"shape": next(w for w in words if w in SHAPES), "colour": next(w for w in words if w in COLOURS),
            "pattern": pattern}


def image_embedding(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projected pooled embedding (the vision tower also returns its patch tokens)."""
    return model.visual(pixels)[0]


class ContrastiveEncoderTraining(nn.Module):
    """The open_clip model (registered, so Lightning checkpoints it) and its one stage."""

    def __init__(self, model, tokenizer, pictures: torch.Tensor, descriptions: list[str], recipe: DictConfig,
                 image_size: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pictures = pictures
        self.descriptions = descriptions
        self.recipe = recipe
        self.image_size = image_size
        vocabulary = sorted(set(descriptions))
        self.description_index = torch.tensor([vocabulary.index(d) for d in descriptions])
        self.register_buffer("text_ids", self.tokenize(vocabulary), persistent=False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        length = int(self.model.context_length)
        return self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids

    def stages(self, backbone=None) -> list[Stage]:
        r = self.recipe
        return [Stage("contrastive", steps=int(r.steps), lr=float(r.lr), batch_size=int(r.batch_size), grad_clip=1.0,
                      weight_decay=float(r.weight_decay))]

    def begin_stage(self, stage, backbone=None) -> None:
        self.model.requires_grad_(True).train()

    def param_groups(self, stage):
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def images(self, pictures: torch.Tensor) -> torch.Tensor:
        from conceptkit.encoders import CLIP_MEAN, CLIP_STD

        pixels = pictures.float() / 255
        if pixels.shape[-1] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def training_loss(self, batch: TrainBatch, backbone, stage) -> dict[str, torch.Tensor]:
        device = self.text_ids.device
        pictures = self.pictures[batch.indices]
        flip = torch.rand(len(batch.indices), generator=batch.generator) < 0.5  # mirrored objects are the same object
        pictures = torch.where(flip[:, None, None, None], pictures.flip(-1), pictures)
        labels = self.description_index[batch.indices]
        present = torch.unique(labels)
        image_features = F.normalize(image_embedding(self.model, self.images(pictures).to(device)), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.text_ids[present]), dim=-1)
        logits = self.model.logit_scale.exp() * image_features @ text_features.T  # (B, descriptions present)
        column = torch.searchsorted(present, labels).to(device)
        image_loss = F.cross_entropy(logits, column)
        # text -> image: every picture of the description is a positive, spread evenly
        same = (column[None, :] == torch.arange(len(present), device=device)[:, None]).float()
        text_loss = -(same / same.sum(1, keepdim=True) * logits.T.log_softmax(dim=1)).sum(1).mean()
        accuracy = (logits.argmax(1) == column).float().mean()
        return {"loss": (image_loss + text_loss) / 2, "accuracy": accuracy}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, pictures: torch.Tensor, descriptions: list[str], image_size: int,
                       context_length: int) -> dict[str, float]:
    """Per factor: how often the best of all the world's descriptions names the picture's factor."""
    helper = ContrastiveEncoderTraining.__new__(ContrastiveEncoderTraining)
    helper.image_size = image_size
    candidates = all_descriptions()
    ids = tokenizer(candidates, padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(model.parameters()).device
    text = F.normalize(model.encode_text(ids.to(device)), dim=-1)
    hits = {"shape": 0, "colour": 0, "pattern": 0, "all": 0}
    for start in range(0, len(pictures), 256):
        chunk = pictures[start:start + 256]
        image = F.normalize(image_embedding(model, ContrastiveEncoderTraining.images(helper, chunk).to(device)), dim=-1)
        best = (image @ text.T).argmax(1).tolist()
        for k, choice in enumerate(best):
            truth, read = description_factors(descriptions[start + k]), description_factors(candidates[choice])
            for factor in ("shape", "colour", "pattern"):
                hits[factor] += truth[factor] == read[factor]
            hits["all"] += truth == read
    return {k: round(v / len(pictures), 4) for k, v in hits.items()}


def pretrain_encoder(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    import logging

    import lightning as L
    from safetensors.torch import save_file

    from conceptkit.backbones.base import shipped_encoder_folder
    from conceptkit.backbones.toy import shapes_words
    from conceptkit.backbones.tiny import build_tiny_clip_tokenizer
    from conceptkit.encoders import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, build_open_clip
    from conceptkit.training.auxiliary import output_folder, publish, train_auxiliary

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if cfg.encoder not in ENCODERS:
        raise UserError(f"encoder={cfg.encoder!r}: conceptkit pretrain trains {', '.join(ENCODERS)}")
    output = output_folder(cfg, shipped_encoder_folder(cfg.encoder))
    L.seed_everything(cfg.seed, verbose=False)
    tokenizer = build_tiny_clip_tokenizer(shapes_words())
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "vocab_size": len(tokenizer)}
    image_size = int(model_cfg["vision_cfg"]["image_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_open_clip(model_cfg)
    started = time.time()
    print(f"cutting {cfg.corpus.pictures} object pictures out of ShapeWorld scenes (seed {cfg.seed})", flush=True)
    pictures, descriptions = object_pictures(int(cfg.corpus.pictures), int(cfg.corpus.resolution), image_size,
                                             int(cfg.seed))
    trainable = ContrastiveEncoderTraining(model, tokenizer, pictures, descriptions, cfg.train, image_size)
    data = TrainingData(latents=None, captions=[None] * len(descriptions), names=descriptions, frames=1)
    module, stage, device, partial = train_auxiliary(trainable, data, cfg, output)
    model.eval().requires_grad_(False)
    held_out, held_out_descriptions = object_pictures(int(cfg.evaluation.pictures), int(cfg.corpus.resolution),
                                                      image_size, int(cfg.seed) + 1, split="heldout", progress=None)
    seen, seen_descriptions = object_pictures(int(cfg.evaluation.pictures), int(cfg.corpus.resolution), image_size,
                                              int(cfg.seed) + 2, progress=None)
    context = int(model_cfg["text_cfg"]["context_length"])
    evaluation = {"held_out": zero_shot_accuracy(model, tokenizer, held_out, held_out_descriptions, image_size, context),
                  "pretrain_split": zero_shot_accuracy(model, tokenizer, seen, seen_descriptions, image_size, context),
                  "chance": {"shape": round(1 / 6, 4), "colour": 0.125, "pattern": 0.25}}
    staging = output.with_name(output.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    from conceptkit.encoders import CLIP_MEAN, CLIP_STD

    (staging / OPEN_CLIP_CONFIG).write_text(json.dumps({
        "model": model_cfg, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "command": " ".join(["conceptkit pretrain", *(overrides or [])]),
        "training": {"seconds": round(time.time() - started, 1), "steps": stage.steps,
                     "final_terms": module.last_terms, "device": str(device)},
        "zero_shot": evaluation}, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(staging / OPEN_CLIP_WEIGHTS))
    tokenizer.save_pretrained(str(staging / "tokenizer"))
    publish(staging, output)
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(partial, ignore_errors=True)
    return output
