"""`conceptkit bench suite=shapes_visual_prompts methods=[kv_mixed]`: object-level visual prompts on the
ShapeWorld, oracle-scored.

Each case holds 1 to 3 held-out objects (case i: 1 + i % 3), each given as ONE reference picture (the
object rendered alone on a training background, then cut out as references are: grey outside its
mask, square), never seen in training. The prompt names each by the word the corpus captions use for
an object (its shape) on a new background ("a {r0} and a {r1} on a plain sand background"); the
reference must carry its colour and pattern. Rows:
  - every variant (default kv_mixed, and the paper's ablation K=V=coarse, K=V=fine; each an encoder
    concept trained on the corpus, or `concept_folder=` for one already trained) without and with
    compositional guidance
  - `named_words`: the base model told each object in world words ("a red striped star and ..."), the
    ceiling of what the backbone draws when asked in its own words
  - `words_only`: the base model given the prompt's words without the references ("a star and a
    circle ..."): the floor; the references must add colour and pattern above it
Metrics per case, over `samples_per_prompt` seeds:
  identity  (shape, colour, pattern) of the read object matched to each reference (Hungarian on the
            number of agreeing factors; an unmatched reference scores 0), mean over references
  exact     share of references whose matched object agrees in all three
  count     share of renders with exactly as many objects read as asked
  background share of renders whose background colour is the asked one (prompt fidelity)
  layout_spread  mean over references of the std (normalised units) of its matched object's centre
            across seeds: how freely the layout varies (a copied pose / place gives ~0)
  pixel_spread   mean pairwise L1 between a case's renders (0-1 scale); LPIPS (torchmetrics) is
            reported beside it only where its pretrained weights can be loaded (not offline)
  seconds   per render, guidance's extra time included
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

METRICS = ("identity", "exact", "count", "background", "layout_spread", "pixel_spread", "lpips_spread", "seconds")
DEFAULT_VARIANTS = {"kv_mixed": ["kv_mixed"], "coarse": ["kv_mixed", "method.mode=coarse"],
                    "fine": ["kv_mixed", "method.mode=fine"]}


@dataclass
class VisualPromptCase:
    name: str
    combos: list[tuple[str, str, str]]
    references: list[np.ndarray]  # one picture per object
    background: str

    def prompt(self) -> str:
        return " and ".join("a {r%d}" % k for k in range(len(self.combos))) + f" on a plain {self.background} background"

    def word_prompt(self) -> str:
        """The prompt with each reference replaced by its word alone (the floor: no reference at all)."""
        text = self.prompt()
        for name, word in self.words().items():
            text = text.replace("{%s}" % name, word)
        return text

    def world_prompt(self) -> str:
        from conceptkit.world.captions import describe_object
        from conceptkit.world.factors import ObjectSpec

        words = [describe_object(ObjectSpec(s, c, p, "large", (0.5, 0.5))) for s, c, p in self.combos]
        return " and ".join(f"a {w}" for w in words) + f" on a plain {self.background} background"

    def words(self) -> dict[str, str]:
        return {f"r{k}": combo[0] for k, combo in enumerate(self.combos)}

    def pictures(self) -> dict[str, np.ndarray]:
        return {f"r{k}": picture for k, picture in enumerate(self.references)}


def reference_of(combo, seed: int, resolution: int) -> np.ndarray:
    """The held-out object rendered alone on a training background, cut out as a reference."""
    from conceptkit.bench.suites import TOY_ORIENTATION, TRAIN_BACKGROUNDS
    from conceptkit.corpus import reference_picture
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.render import object_masks, render_scene

    shape, colour, pattern = combo
    rng = np.random.default_rng(seed)
    background, background_pattern = TRAIN_BACKGROUNDS[seed % len(TRAIN_BACKGROUNDS)]
    allowed = {"shape": [shape], "colour": [colour], "pattern": [pattern], "size": ["large"],
               "background_colour": [background], "background_pattern": [background_pattern]}
    scene = sample_scene(rng, n_objects=1, split="heldout", allowed=allowed, orientation=TOY_ORIENTATION)
    image = render_scene(scene, resolution)
    return reference_picture(image, object_masks(scene, resolution)[0])


def visual_prompt_cases(count: int, seed: int, resolution: int) -> list[VisualPromptCase]:
    from conceptkit.bench.suites import TEST_BACKGROUNDS
    from conceptkit.world.factors import HELDOUT_COMBOS

    cases, taken = [], 0
    for i in range(count):
        n = 1 + i % 3
        combos = []
        while len(combos) < n:  # distinct shapes in one case, so each word names one object
            combo = HELDOUT_COMBOS[taken % len(HELDOUT_COMBOS)]
            taken += 1
            if combo[0] not in {c[0] for c in combos}:
                combos.append(combo)
        references = [reference_of(c, seed + 97 * i + k, resolution) for k, c in enumerate(combos)]
        cases.append(VisualPromptCase(f"case{i}_{n}objects", combos, references, TEST_BACKGROUNDS[i % len(TEST_BACKGROUNDS)]))
    return cases


def match_references(combos, objects) -> list[tuple[float, int | None]]:
    """Each asked (shape, colour, pattern) matched to one read object (Hungarian on the number of agreeing
    factors): (share of the three factors that agree, the object's index), (0.0, None) if unmatched."""
    from conceptkit.matching import hungarian

    agree = np.zeros((len(combos), max(1, len(objects))))
    for k, (shape, colour, pattern) in enumerate(combos):
        for j, obj in enumerate(objects):
            agree[k, j] = (obj.shape == shape) + (obj.colour == colour) + (obj.pattern == pattern)
    matched = {m.row: m.column for m in hungarian(agree, maximize=True)} if objects else {}
    return [(agree[k, matched[k]] / 3, matched[k]) if k in matched else (0.0, None) for k in range(len(combos))]


def score_case(images: list[np.ndarray], case: VisualPromptCase, lpips=None) -> dict[str, float | None]:
    from conceptkit.world.oracle import read_image

    identity, exact, counts, backgrounds = [], [], [], []
    centres = {k: [] for k in range(len(case.combos))}
    for image in images:
        reading = read_image(image)
        backgrounds.append(reading.background_colour == case.background)
        counts.append(len(reading.objects) == len(case.combos))
        for k, (score, j) in enumerate(match_references(case.combos, reading.objects)):
            identity.append(score)
            exact.append(score == 1.0)
            if j is not None:
                centres[k].append(reading.objects[j].centre)
    spreads = [float(np.linalg.norm(np.std(np.array(c), axis=0))) for c in centres.values() if len(c) >= 2]
    pixels = [torch.from_numpy(i).float() / 255 for i in images]
    pairs = [(a, b) for a in range(len(pixels)) for b in range(a + 1, len(pixels))]
    pixel_spread = float(np.mean([(pixels[a] - pixels[b]).abs().mean() for a, b in pairs])) if pairs else None
    lpips_spread = None
    if lpips is not None and pairs:
        batch = torch.stack(pixels).permute(0, 3, 1, 2) * 2 - 1
        lpips_spread = float(np.mean([float(lpips(batch[a:a + 1], batch[b:b + 1])) for a, b in pairs]))
    return {"identity": float(np.mean(identity)), "exact": float(np.mean(exact)), "count": float(np.mean(counts)),
            "background": float(np.mean(backgrounds)), "layout_spread": float(np.mean(spreads)) if spreads else None,
            "pixel_spread": pixel_spread, "lpips_spread": lpips_spread}


def load_lpips():
    """torchmetrics' LPIPS, when its pretrained network can be loaded here (it cannot offline)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex")
    except Exception:  # noqa: BLE001 - any failure to fetch weights means: no LPIPS column
        return None


def _variants(cfg) -> dict[str, list[str]]:
    if cfg.variants:
        return {str(k): [str(v) for v in value] for k, value in dict(cfg.variants).items()}
    names = [m for m in cfg.methods if m == "kv_mixed"] or ["kv_mixed"]
    if names != list(cfg.methods):
        raise UserError(f"suite=shapes_visual_prompts scores encoder methods: methods=[kv_mixed], got {list(cfg.methods)}")
    return dict(DEFAULT_VARIANTS) if not cfg.get("concept_folder") else {"kv_mixed": ["kv_mixed"]}


def train_encoder_variant(label: str, spec: list[str], cfg, work: Path, prefix: str) -> tuple[Path, float]:
    """Train one row's encoder concept ([method, overrides...]) on the suite's backbone: (folder, seconds)."""
    from conceptkit.bench.suites import suite_backbone_overrides
    from conceptkit.config import compose
    from conceptkit.training.run import train

    overrides = [f"method={spec[0]}", *suite_backbone_overrides(cfg), f"name={prefix}_{label}",
                 f"output={work / (label + '.concept')}", "sample.count=0", "trainer.progress_bar=true",
                 *spec[1:], *cfg.train_overrides]
    if cfg.train_steps is not None:
        overrides.append(f"trainer.max_steps={cfg.train_steps}")
    started = time.time()
    return train(compose("train", overrides)), time.time() - started


def variant_concepts(cfg, variants: dict[str, list[str]], work: Path, prefix: str):
    """(label, concept folder, training seconds) per row: `concept_folder=` (one concept already trained)
    for every row, else each row's concept trained here."""
    for label, spec in variants.items():
        if cfg.get("concept_folder"):
            yield label, Path(cfg.concept_folder), 0.0
            continue
        print(f"training {label} ({' '.join(spec)}) ...", flush=True)
        folder, seconds = train_encoder_variant(label, spec, cfg, work, prefix)
        yield label, folder, seconds


def means_table(records: list[dict], metrics: tuple[str, ...]) -> tuple[list[str], dict]:
    """The markdown rows of each variant's means over its records (None-valued entries skipped; "-" where
    none has a value), and the plot series (every metric but seconds)."""
    lines = ["| row | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    series = {}
    for label in dict.fromkeys(r["variant"] for r in records):
        rows = [r for r in records if r["variant"] == label]
        means = {m: (np.mean([r[m] for r in rows if r[m] is not None]) if any(r[m] is not None for r in rows) else None)
                 for m in metrics}
        series[label] = {m: v for m, v in means.items() if v is not None and m != "seconds"}
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in means.values()) + " |")
    return lines, series


def identity_by_count(records: list[dict], count: int, noun: str) -> str:
    """One line: each variant's mean identity over the cases of `count` objects."""
    labels = [label for label in dict.fromkeys(r["variant"] for r in records)
              if any(len(r["objects"]) == count for r in records if r["variant"] == label)]
    return f"{count} {noun}(s): identity by row: " + ", ".join(
        f"{label} {np.mean([r['identity'] for r in records if r['variant'] == label and len(r['objects']) == count]):.2f}"
        for label in labels)


def run_visual_prompts_suite(cfg) -> Path:
    from conceptkit.artifact import load_concept
    from conceptkit.bench.suites import _suite_setup, _to_uint8, write_variant_report
    from conceptkit.media import grid, save_png

    variants = _variants(cfg)
    output, work, backbone, sample = _suite_setup(cfg)
    cases = visual_prompt_cases(int(cfg.concepts), int(cfg.seed), backbone.resolution)
    lpips = load_lpips()
    seeds = list(range(cfg.seed, cfg.seed + int(cfg.samples_per_prompt)))
    records = []

    def render(label, case, generate_rows):
        started = time.time()
        media = generate_rows()
        seconds = (time.time() - started) / media.shape[0]
        metrics = score_case(_to_uint8(media), case, lpips)
        picture = f"{label}_{case.name}.png"
        save_png(grid(media, columns=len(seeds)), output / picture)
        records.append({"variant": label, "case": case.name, "objects": [list(c) for c in case.combos],
                        "prompt": case.prompt(), **{k: None if v is None else round(v, 4) for k, v in metrics.items()},
                        "seconds": round(seconds, 3), "grid": picture})
        print(f"  {label:>24} {case.name}: identity {metrics['identity']:.2f} count {metrics['count']:.2f}", flush=True)

    for case in cases:  # the ceiling: the base model asked in world words; the floor: the words alone
        render("named_words", case, lambda: torch.cat([backbone.generate([case.world_prompt()], seed=s, **sample)
                                                      for s in seeds]))
        render("words_only", case, lambda: torch.cat([backbone.generate([case.word_prompt()], seed=s, **sample)
                                                     for s in seeds]))
    trained = {}
    for label, folder, seconds in variant_concepts(cfg, variants, work, "kv"):
        trained[label] = {"folder": str(folder), "train_seconds": round(seconds, 1)}
        method, _ = load_concept(folder, backbone)
        method.eval()
        for case in cases:
            method.set_references(backbone, case.pictures(), words=case.words())
            prompt = method.prompt(case.prompt())
            for guided in (False, True):
                def rows(guided=guided):
                    out = []
                    for s in seeds:
                        kwargs = dict(seed=s, **sample)
                        steered = method.steered_generate(backbone, [prompt], kwargs, guided) if guided else None
                        out.append(steered[0] if steered is not None else backbone.generate([prompt], **kwargs))
                    return torch.cat(out)
                render(f"{label}+guidance" if guided else label, case, rows)
        method.detach(backbone)
    (output / "results.json").write_text(json.dumps({"suite": "shapes_visual_prompts", "records": records,
                                                      "trained": trained, "lpips": lpips is not None}, indent=2) + "\n")
    table, series = means_table(records, METRICS)
    lines = ["# shapes_visual_prompts", "",
             f"backbone {cfg.suite_backbone}; {len(cases)} cases (1-3 held-out objects, one reference each); "
             f"{len(seeds)} seeds per case; LPIPS {'on' if lpips is not None else 'not available offline (pixel_spread instead)'}",
             "", *table]
    for n in (1, 2, 3):
        lines += ["", identity_by_count(records, n, "object")]
    markdown = "\n".join(lines) + "\n"
    (output / "results.md").write_text(markdown)
    write_variant_report(output, "shapes_visual_prompts", markdown, [m for m in METRICS if m != "seconds"], series)
    if not cfg.keep_work and not cfg.get("concept_folder"):
        shutil.rmtree(work, ignore_errors=True)
    return output
