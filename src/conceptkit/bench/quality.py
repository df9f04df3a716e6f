"""`conceptkit bench suite=base_quality`: how well a ShapeWorld backbone draws what it is asked.

First the VAE alone (`vae_reconstruction`: renders encoded, decoded and read back), then generation.
Prompts are world captions of scenes the base model never saw (fresh seeds), one object each, in two
splits: `pretrain` (combinations of the training distribution) and `heldout` (the shape x colour x
pattern triples kept out of pretraining: compositional generalisation). The oracle reads each sample
back. Images: shape, colour, pattern, background colour. Clips: subject (shape and colour), the
subject's motion direction, and `direction_any` (any object moving the asked way).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from conceptkit.world.factors import TOY_ORIENTATION


def quality_cases(split: str, count: int, seed: int, clip_frames: int | None):
    from conceptkit.world.captions import caption_scene
    from conceptkit.world.factors import DIRECTIONS, sample_scene

    rng = np.random.default_rng(seed)
    allowed = {"direction": [d for d in DIRECTIONS if d != "none"]} if clip_frames else {}
    cases = []
    for _ in range(count):
        scene = sample_scene(rng, n_objects=1, split=split, allowed=allowed, clip_frames=clip_frames,
                             orientation=TOY_ORIENTATION)
        cases.append((caption_scene(scene, rng), scene))
    return cases


def score_sample(media: torch.Tensor, scene) -> dict[str, bool]:
    """media: (3, F, H, W) in [0, 1]."""
    from conceptkit.world.oracle import read_clip, read_image

    frames = (media.permute(1, 2, 3, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    truth = scene.objects[0]
    if frames.shape[0] == 1:
        reading = read_image(frames[0])
        seen = reading.objects
        return {"shape": any(o.shape == truth.shape for o in seen),
                "colour": any(o.colour == truth.colour for o in seen),
                "pattern": any(o.pattern == truth.pattern for o in seen),
                "background": reading.background_colour == scene.background.colour,
                "all": any((o.shape, o.colour, o.pattern) == (truth.shape, truth.colour, truth.pattern) for o in seen)
                and reading.background_colour == scene.background.colour}
    reading = read_clip(frames)
    subjects = [i for i, o in enumerate(reading.objects) if (o.shape, o.colour) == (truth.shape, truth.colour)]
    direction = scene.motions[0].direction
    return {"subject": bool(subjects),
            "direction": any(reading.motions[i].direction == direction for i in subjects),
            # any object moving the asked way: whether motion is learned apart from the subject's identity
            "direction_any": any(m.direction == direction for m in reading.motions),
            "background": reading.background_colour == scene.background.colour}


@torch.no_grad()
def reconstruction_accuracy(backbone, count: int, seed: int) -> dict:
    """The VAE alone: world renders encoded and decoded, read back by the oracle. Generation cannot be
    better than this, so it is the first number to look at when a toy backbone draws badly."""
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.oracle import read_clip, read_image, score_reading
    from conceptkit.world.render import render_clip, render_scene

    rng = np.random.default_rng(seed)
    clip_frames = backbone.default_frames if backbone.is_video else None
    scenes = [sample_scene(rng, clip_frames=clip_frames, orientation=TOY_ORIENTATION) for _ in range(count)]
    arrays = [render_clip(s, clip_frames, backbone.resolution) if clip_frames else render_scene(s, backbone.resolution)[None]
              for s in scenes]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    hits: dict[str, list[bool]] = {}
    for start in range(0, count, 16):
        decoded = backbone.decode(backbone.encode_media(pixels[start:start + 16]).mean.to(backbone.device))
        frames = (decoded.permute(0, 2, 3, 4, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        for item, scene in zip(frames, scenes[start:start + 16]):
            reading = read_clip(item) if clip_frames else read_image(item[0])
            for key, values in score_reading(reading, scene).items():
                hits.setdefault(key, []).extend(values)
    return {key: round(float(np.mean(values)), 4) for key, values in hits.items()} | {"samples": count}


def measure(backbone, count: int, seed: int, steps: int, guidance: float, batch: int = 8) -> dict:
    clip_frames = backbone.default_frames if backbone.is_video else None
    results = {"vae_reconstruction": reconstruction_accuracy(backbone, count, seed)}
    for split_index, split in enumerate(("pretrain", "heldout")):
        cases = quality_cases(split, count, seed + 7919 * (split_index + 1), clip_frames)
        hits: dict[str, list[bool]] = {}
        for start in range(0, len(cases), batch):
            chunk = cases[start:start + batch]
            media = backbone.generate([c[0] for c in chunk], steps=steps, guidance=guidance, seed=seed + start,
                                      frames=clip_frames or 1)
            for item, (_, scene) in zip(media, chunk):
                for key, value in score_sample(item, scene).items():
                    hits.setdefault(key, []).append(value)
        results[split] = {key: round(float(np.mean(values)), 4) for key, values in hits.items()}
        results[split]["samples"] = len(cases)
    return results


def run_base_quality(cfg) -> Path:
    from hydra.utils import instantiate

    from conceptkit.bench.suites import suite_backbone_overrides
    from conceptkit.config import compose

    backbone = instantiate(compose("train", suite_backbone_overrides(cfg)).backbone).load()
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = measure(backbone, cfg.quality_prompts, cfg.seed, cfg.sample_steps, cfg.guidance)
    record = {"version": 1, "suite": "base_quality", "backbone": cfg.suite_backbone, "identity": backbone.identity(),
              "sample_steps": cfg.sample_steps, "guidance": cfg.guidance, "seed": cfg.seed,
              "seconds": round(time.time() - started, 1), "results": results}
    (output / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# base quality of {cfg.suite_backbone}", ""]
    for split, values in results.items():
        lines += [f"## {split}", "", "| " + " | ".join(values) + " |", "|---" * len(values) + "|",
                  "| " + " | ".join(str(v) for v in values.values()) + " |", ""]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    from conceptkit.bench.report import write_html_report

    write_html_report(output, f"base quality of {cfg.suite_backbone}", "\n".join(lines) + "\n", quality_charts(results))
    print("\n".join(lines))
    return output


def quality_charts(results: dict) -> list:
    """One bar per oracle metric (accuracy in [0, 1]), one series per split (vae_reconstruction, pretrain, heldout)."""
    from conceptkit.bench.report import BarChart

    metrics = list(dict.fromkeys(k for values in results.values() for k in values if k != "samples"))
    series = {split: [values.get(m) for m in metrics] for split, values in results.items()}
    return [BarChart("oracle accuracy per metric", metrics, series, "accuracy")]
