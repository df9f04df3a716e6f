"""`conceptkit bench suite=shapes_s2v methods=[bindweave]`: subject-to-video from reference pictures on
the ShapeWorld, oracle-scored (suite backbone: wan21_i2v_shapes).

Case i holds 1 + i % 2 held-out objects (distinct shapes), each given as ONE reference picture (rendered
alone on a training background, cut out: grey outside its mask, square), never seen in training; each
object moves in its own direction. The prompt follows the world's clip grammar with each object's
shape word: "a {r0} moving left slowly; a {r1} moving up slowly, on a plain sand background" (the
reference must carry colour and pattern, the prompt the motion). Rows:
  - every variant (methods=[bindweave] and `variants=` such as the paper's ablations, each an encoder
    concept trained on the clip corpus, or `concept_folder=` for one already trained)
  - `named_words`: the base text-to-video toy (wan21_shapes; wan21_tiny for wan21_i2v_tiny) told each object in world words (the
    ceiling of what the backbone family draws when asked in its own words)
  - `words_only`: the same base model with the shape words only (the floor: no reference at all)
Metrics per case, over `samples_per_prompt` seeds, from the oracle's reading of each clip (objects of
its first frame, tracked through the clip):
  identity   (shape, colour, pattern) of the read object matched to each reference (Hungarian on the
             number of agreeing factors; unmatched: 0), mean over references
  exact      share of references whose matched object agrees in all three
  count      share of clips with exactly as many objects as asked
  direction  share of references whose matched object moves in the asked direction
  background share of clips whose background colour is the asked one (prompt fidelity)
  seconds    per clip
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conceptkit.errors import UserError

METRICS = ("identity", "exact", "count", "direction", "background", "seconds")
DIRECTIONS = ("left", "right", "up", "down")


def base_backbone(suite_backbone: str) -> str:
    """The named_words / words_only rows' text-to-video backbone: wan21_i2v_shapes -> wan21_shapes."""
    if "wan21_i2v" not in suite_backbone:
        raise UserError(f"suite=shapes_s2v renders from references on an image-to-video backbone: suite_backbone="
                        f"{suite_backbone} is not one; use wan21_i2v_shapes (or wan21_i2v_tiny)")
    return suite_backbone.replace("wan21_i2v", "wan21")


def base_backbone_overrides(cfg) -> list[str]:
    """The base rows' train overrides: the text-to-video backbone, and `suite_backbone_path` when given
    (the toy I2V backbone is that text-to-video folder grown at load, so both read the same weights)."""
    from conceptkit.bench.suites import suite_backbone_overrides

    return [f"backbone={base_backbone(str(cfg.suite_backbone))}"] + suite_backbone_overrides(cfg)[1:]


@dataclass
class SubjectVideoCase:
    name: str
    combos: list[tuple[str, str, str]]
    directions: list[str]
    references: list[np.ndarray]
    background: str

    def _prompt(self, words: list[str], articles: list[str] | None = None) -> str:
        articles = articles or ["an" if w[0] in "aeiou" else "a" for w in words]
        parts = [f"{a} {w} moving {d} slowly" for a, w, d in zip(articles, words, self.directions)]
        return "; ".join(parts) + f", on a plain {self.background} background"

    def prompt(self) -> str:
        """With {r<k>} where each reference goes (its article that of its shape word)."""
        shapes = [c[0] for c in self.combos]
        return self._prompt(["{r%d}" % k for k in range(len(shapes))],
                            ["an" if w[0] in "aeiou" else "a" for w in shapes])

    def word_prompt(self) -> str:
        return self._prompt([c[0] for c in self.combos])

    def world_prompt(self) -> str:
        from conceptkit.world.captions import describe_object
        from conceptkit.world.factors import ObjectSpec

        return self._prompt([describe_object(ObjectSpec(s, c, p, "large", (0.5, 0.5))) for s, c, p in self.combos])

    def words(self) -> dict[str, str]:
        return {f"r{k}": combo[0] for k, combo in enumerate(self.combos)}

    def pictures(self) -> dict[str, np.ndarray]:
        return {f"r{k}": picture for k, picture in enumerate(self.references)}


def subject_video_cases(count: int, seed: int, resolution: int) -> list[SubjectVideoCase]:
    from conceptkit.bench.suites import TEST_BACKGROUNDS
    from conceptkit.bench.visual_prompts import reference_of
    from conceptkit.world.factors import HELDOUT_COMBOS

    cases, taken = [], 0
    for i in range(count):
        n = 1 + i % 2
        combos = []
        while len(combos) < n:
            combo = HELDOUT_COMBOS[taken % len(HELDOUT_COMBOS)]
            taken += 1
            if combo[0] not in {c[0] for c in combos}:
                combos.append(combo)
        directions = [DIRECTIONS[(i + 2 * k) % len(DIRECTIONS)] for k in range(n)]
        references = [reference_of(c, seed + 97 * i + k, resolution) for k, c in enumerate(combos)]
        cases.append(SubjectVideoCase(f"case{i}_{n}subjects", combos, directions, references,
                                      TEST_BACKGROUNDS[i % len(TEST_BACKGROUNDS)]))
    return cases


def clip_frames(media: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, F, H, W) in [0, 1] -> N clips as (F, H, W, 3) uint8."""
    return [(m.permute(1, 2, 3, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for m in media]


def score_clips(clips: list[np.ndarray], case: SubjectVideoCase) -> dict[str, float]:
    from conceptkit.bench.visual_prompts import match_references
    from conceptkit.world.oracle import read_clip

    identity, exact, direction, counts, backgrounds = [], [], [], [], []
    for clip in clips:
        reading = read_clip(clip)
        backgrounds.append(reading.background_colour == case.background)
        counts.append(len(reading.objects) == len(case.combos))
        for k, (score, j) in enumerate(match_references(case.combos, reading.objects)):
            identity.append(score)
            exact.append(score == 1.0)
            direction.append(j is not None and reading.motions[j].direction == case.directions[k])
    return {"identity": float(np.mean(identity)), "exact": float(np.mean(exact)), "count": float(np.mean(counts)),
            "direction": float(np.mean(direction)), "background": float(np.mean(backgrounds))}


def _variants(cfg) -> dict[str, list[str]]:
    if cfg.variants:
        return {str(k): [str(v) for v in value] for k, value in dict(cfg.variants).items()}
    if not cfg.methods:
        return {}
    return {str(m): [str(m)] for m in cfg.methods}


def run_subject_video_suite(cfg) -> Path:
    from hydra.utils import instantiate

    from conceptkit.artifact import load_concept
    from conceptkit.bench.suites import _suite_setup, write_variant_report
    from conceptkit.bench.visual_prompts import identity_by_count, means_table, variant_concepts
    from conceptkit.config import compose
    from conceptkit.media import frame_strip, save_png

    variants = _variants(cfg)
    if cfg.get("concept_folder") and len(variants) > 1:
        raise UserError("concept_folder= scores one trained concept: give one method (methods=[bindweave]), no variants")
    base_name = base_backbone(str(cfg.suite_backbone))
    output, work, backbone, sample = _suite_setup(cfg, video=True)
    base = instantiate(compose("train", base_backbone_overrides(cfg)).backbone).load()
    cases = subject_video_cases(int(cfg.concepts), int(cfg.seed), backbone.resolution)
    seeds = list(range(cfg.seed, cfg.seed + int(cfg.samples_per_prompt)))
    records = []

    def render(label, case, generate_rows):
        started = time.time()
        media = generate_rows()
        seconds = (time.time() - started) / media.shape[0]
        metrics = score_clips(clip_frames(media), case)
        picture = f"{label}_{case.name}.png"
        save_png(np.concatenate([frame_strip(m) for m in media], axis=0), output / picture)  # a strip per seed
        records.append({"variant": label, "case": case.name, "objects": [list(c) for c in case.combos],
                        "directions": case.directions, "prompt": case.prompt(),
                        **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(seconds, 3), "strips": picture})
        print(f"  {label:>16} {case.name}: identity {metrics['identity']:.2f} direction {metrics['direction']:.2f}",
              flush=True)

    for case in cases:
        render("named_words", case, lambda: torch.cat([base.generate([case.world_prompt()], seed=s, **sample)
                                                      for s in seeds]))
        render("words_only", case, lambda: torch.cat([base.generate([case.word_prompt()], seed=s, **sample)
                                                     for s in seeds]))
    trained = {}
    for label, folder, seconds in variant_concepts(cfg, variants, work, "s2v"):
        trained[label] = {"folder": str(folder), "train_seconds": round(seconds, 1)}
        method, _ = load_concept(folder, backbone)
        method.eval()
        for case in cases:
            method.set_references(backbone, case.pictures(), words=case.words())
            prompt = method.prompt(case.prompt())
            render(label, case, lambda: torch.cat([backbone.generate([prompt], seed=s, **sample) for s in seeds]))
        method.detach(backbone)
    (output / "results.json").write_text(json.dumps({"suite": "shapes_s2v", "records": records, "trained": trained},
                                                    indent=2) + "\n")
    table, series = means_table(records, METRICS)
    lines = ["# shapes_s2v", "",
             f"backbone {cfg.suite_backbone} (rows named_words / words_only: {base_name}); {len(cases)} cases "
             f"(1-2 held-out subjects, one reference each, each moving its own way); {len(seeds)} seeds per case",
             "", *table]
    for n in (1, 2):
        lines += ["", identity_by_count(records, n, "subject")]
    markdown = "\n".join(lines) + "\n"
    (output / "results.md").write_text(markdown)
    write_variant_report(output, "shapes_s2v", markdown, [m for m in METRICS if m != "seconds"], series)
    if not cfg.keep_work and not cfg.get("concept_folder"):
        shutil.rmtree(work, ignore_errors=True)
    return output
