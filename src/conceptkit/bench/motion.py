"""`conceptkit bench suite=shapes_motion`: a subject taken from an image and a motion taken from a clip,
composed in one generated clip (BiCo's setting), scored by the oracle.

Per case: a still of a held-out object (never seen whole in pretraining) and a clip of ANOTHER
(pretrain) object moving in one direction. Every method trains two concepts with its own machinery,
`subject` on the still and `motion` on the clip, and both are attached to render
"a large {subject} {motion} on a plain <colour> background" on backgrounds neither source showed.

Neutral words [ours]: a method that renders a concept as words (BiCo's description, DreamBooth's class
noun) gets "object" for the subject and "moving" for the motion, never the held-out factors or the
direction: the toy text encoders know every world word, so naming them would score the base model,
not the learning. What each sample must show comes from the sources alone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conceptkit.bench.suites import NEUTRAL_SUBJECT_WORD
from conceptkit.errors import UserError

DIRECTIONS = ("left", "right", "up", "down")  # case i moves DIRECTIONS[i % 4]
SUBJECT_WORD, MOTION_WORD = NEUTRAL_SUBJECT_WORD, "moving"
MOTION_METRICS = ("subject_fidelity", "motion_fidelity", "shape_fidelity", "colour_fidelity", "direction_fidelity",
                  "prompt_fidelity", "source_leakage")


@dataclass
class MotionCase:
    name: str  # e.g. "red_striped_star_left"
    subject: tuple[str, str, str]  # the held-out (shape, colour, pattern)
    direction: str
    still: Path
    clip: Path


def motion_cases(count: int, folder: Path, seed: int, frames: int, resolution: int) -> list[MotionCase]:
    from conceptkit.bench.suites import concept_name, write_motion_references
    from conceptkit.world.factors import HELDOUT_COMBOS

    check_case_count(count)
    cases = []
    for i, combo in enumerate(HELDOUT_COMBOS[:count]):
        direction = DIRECTIONS[i % len(DIRECTIONS)]
        name = f"{concept_name(combo)}_{direction}"
        still, clip = write_motion_references(combo, direction, folder / name, seed + i, frames, resolution)
        cases.append(MotionCase(name, tuple(combo), direction, still, clip))
    return cases


def check_case_count(count: int) -> None:
    from conceptkit.world.factors import HELDOUT_COMBOS

    if not 1 <= count <= len(HELDOUT_COMBOS):
        raise UserError(f"concepts: shapes_motion has 1 to {len(HELDOUT_COMBOS)} cases (held-out subjects), got {count}")


def source_overrides(method_name: str, role: str) -> list[str]:
    """The neutral word a word-rendering method gets for one source (see the module docstring)."""
    from conceptkit.registry import method_class

    return method_class(method_name).class_word_overrides(SUBJECT_WORD if role == "subject" else MOTION_WORD)


def score_composed(clips: list[np.ndarray], case: MotionCase, requested: list[str], source_colours: set[str]
                   ) -> dict[str, float]:
    """clips: (F, H, W, 3) uint8 each. subject_fidelity: an object with the subject's shape, colour and
    pattern; motion_fidelity: that object moving in the clip's direction; shape_/colour_/direction_fidelity:
    any object with the subject's shape / colour, any object moving in the clip's direction (a toy that
    draws colours before outlines, or moves blobs, still shows which part got across); prompt_fidelity:
    the requested background; source_leakage: a background of the sources instead."""
    from conceptkit.world.oracle import read_clip

    hits: dict[str, list[bool]] = {m: [] for m in MOTION_METRICS}
    for frames, want in zip(clips, requested):
        reading = read_clip(frames)
        subjects = [i for i, o in enumerate(reading.objects) if (o.shape, o.colour, o.pattern) == case.subject]
        hits["subject_fidelity"].append(bool(subjects))
        hits["motion_fidelity"].append(any(reading.motions[i].direction == case.direction for i in subjects))
        hits["shape_fidelity"].append(any(o.shape == case.subject[0] for o in reading.objects))
        hits["colour_fidelity"].append(any(o.colour == case.subject[1] for o in reading.objects))
        hits["direction_fidelity"].append(any(m.direction == case.direction for m in reading.motions))
        hits["prompt_fidelity"].append(reading.background_colour == want)
        hits["source_leakage"].append(reading.background_colour in source_colours and reading.background_colour != want)
    return {m: float(np.mean(v)) for m, v in hits.items()}


def _source_backgrounds(case: MotionCase) -> set[str]:
    """The background colours the two sources show (read by the oracle): what leakage looks for."""
    import imageio.v3 as iio
    from PIL import Image

    from conceptkit.world.oracle import read_image

    with Image.open(case.still) as still:
        colours = {read_image(np.asarray(still.convert("RGB"))).background_colour}
    colours.add(read_image(iio.imread(case.clip, index=0)[..., :3]).background_colour)
    return colours


def run_motion_suite(cfg) -> Path:
    from conceptkit.artifact import load_concept
    from conceptkit.bench.suites import (NAMED_ROW, TEST_BACKGROUNDS, _process_peak_rss_mb, _suite_setup,
                                         multi_variants, named_object, suite_backbone_overrides)
    from conceptkit.compose import check_distinct_phrases, render_prompt
    from conceptkit.config import compose
    from conceptkit.training.run import train

    variants = multi_variants(cfg, allow_empty=True)
    check_case_count(cfg.concepts)  # before the backbone loads
    output, work, backbone, sample = _suite_setup(cfg, video=True)
    frames = backbone.default_frames
    cases = motion_cases(cfg.concepts, work / "references", cfg.seed, frames, backbone.resolution)
    records = []
    total = len(cases) * len(variants)
    for number, (case, (label, method_name, extra)) in enumerate(((c, v) for c in cases for v in variants), 1):
        print(f"[{number}/{total}] {label} on {case.name} ...", flush=True)
        started = time.time()
        folders = []
        for role, source, source_frames in (("subject", case.still, 1), ("motion", case.clip, frames)):
            overrides = [f"method={method_name}", *suite_backbone_overrides(cfg), f"data.images={source}",
                         f"data.frames={source_frames}", f"name={role}", f"output={work / f'{label}_{case.name}_{role}.concept'}",
                         "sample.count=0", "trainer.progress_bar=false", f"seed={cfg.seed}", "overwrite=true",
                         *source_overrides(method_name, role), *cfg.train_overrides]
            if cfg.train_steps is not None:
                overrides.append(f"trainer.max_steps={cfg.train_steps}")
            folders.append(train(compose("train", overrides + list(extra))))
        seconds = time.time() - started
        methods = [load_concept(folder, backbone)[0] for folder in folders]
        check_distinct_phrases(methods)
        prompts = [(render_prompt(f"a large {{subject}} {{motion}} on a plain {b} background", methods), b)
                   for b in TEST_BACKGROUNDS]
        records.append({"variant": label, "method": method_name, "overrides": list(extra),
                        **_render_composed(backbone, prompts, case, label, cfg, output, sample),
                        "train_seconds": round(seconds, 1), "process_peak_rss_mb": _process_peak_rss_mb()})
        for method in methods:
            method.detach(backbone)
    # The ceiling on this backbone: no training, the subject and the motion told in the world's own
    # words ("a large red striped star moving left fast"). Concepts learned from the sources can at best
    # compose as well as the base model draws the scene when told what it is.
    for case in cases:
        prompts = [(f"a large {named_object(case.subject)} moving {case.direction} fast on a plain {b} background", b)
                   for b in TEST_BACKGROUNDS]
        records.append({"variant": NAMED_ROW[0], "method": NAMED_ROW[1], "overrides": [],
                        **_render_composed(backbone, prompts, case, NAMED_ROW[0], cfg, output, sample),
                        "train_seconds": 0.0, "process_peak_rss_mb": _process_peak_rss_mb()})
    _write_motion_results(output, cfg, [*variants, (*NAMED_ROW, [])], records)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _render_composed(backbone, prompts: list[tuple[str, str]], case: MotionCase, label: str, cfg, output: Path,
                     sample: dict) -> dict:
    """Sample each (prompt, requested background) cfg.samples_per_prompt times, save the grid and score
    the clips against the case."""
    from conceptkit.media import grid, save_png

    frames = backbone.default_frames
    texts = [p for p, _ in prompts for _ in range(cfg.samples_per_prompt)]
    wanted = [b for _, b in prompts for _ in range(cfg.samples_per_prompt)]
    media = torch.cat([backbone.generate(texts[i:i + 4], seed=cfg.seed + i, frames=frames, **sample)
                       for i in range(0, len(texts), 4)])
    clips = [(m.permute(1, 2, 3, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for m in media]
    metrics = score_composed(clips, case, wanted, _source_backgrounds(case))
    grid_name = f"{label}_{case.name}.png"
    save_png(grid(media, columns=cfg.samples_per_prompt), output / grid_name)
    return {"backbone": cfg.suite_backbone, "concept": case.name, "direction": case.direction,
            **{m: round(v, 4) for m, v in metrics.items()}, "grid": grid_name, "prompts": [p for p, _ in prompts]}


def _write_motion_results(output: Path, cfg, variants, records: list[dict]) -> None:
    from conceptkit.bench.suites import write_variant_results

    write_variant_results(output, cfg, "shapes_motion", variants, records, MOTION_METRICS,
                          "a subject from a still and a motion from a clip, composed in one prompt", "cases",
                          heading=lambda r: f"{r['variant']} / {r['concept']}",
                          detail=lambda r: "prompts: " + " | ".join(r["prompts"]),
                          image_label=lambda r: f"{r['variant']} {r['concept']}")
