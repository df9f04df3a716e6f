"""Oracle-scored quality suites on the ShapeWorld (`conceptkit bench suite=...`).

shapes_subject  one held-out object (a shape x colour x pattern the base model never saw together)
                from 4 reference images on 4 training backgrounds; generate it on backgrounds it was
                never shown on; the oracle reads every sample back:
                  concept_fidelity  share of samples showing an object with the concept's shape,
                                    colour and pattern
                  shape_fidelity, colour_fidelity, pattern_fidelity
                                    the same for each defining factor alone (which part of the
                                    concept a method, or the base model, gets across)
                  prompt_fidelity   share showing the requested background colour
                  leakage           share showing one of the TRAINING backgrounds instead
                  diversity         spread (std, image units) of the concept's position over samples:
                                    per sample the object matching most of the concept's factors
                                    (at least one); null ("-") when under 2 samples have one
                  drift             base-model accuracy on concept-free prompts minus the same with
                                    the concept attached (positive = damage)
shapes_multi    one image with two held-out objects and a sentence naming both (MCPL's setting);
                per learned word: word_fidelity (that object alone when prompted alone) and
                separation (the other object absent then)
shapes_motion   a subject from an image and a motion from a clip (BiCo's setting): subject_fidelity
                and motion_fidelity (the oracle's direction) in a composed prompt, each factor alone
                (shape, colour, direction of any object), prompt fidelity and source leakage

Every run is seeded; results.json holds one record per method x concept.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from conceptkit import registry
from conceptkit.errors import UserError
from conceptkit.world.factors import TOY_ORIENTATION

TRAIN_BACKGROUNDS = (("sky", "plain"), ("grass", "noise"), ("navy", "gradient"), ("pink", "plain"))
TEST_BACKGROUNDS = ("sand", "teal")
NEUTRAL_SUBJECT_WORD = "object"  # what a word-rendering method's subject is called in shapes_subject and shapes_motion


@dataclass
class SubjectCase:
    name: str  # concept name, e.g. "red_striped_star"
    combo: tuple[str, str, str]  # shape, colour, pattern
    folder: Path  # reference renders with caption sidecars


def concept_name(combo) -> str:
    shape, colour, pattern = combo
    return f"{colour}_{pattern}_{shape}"


def write_subject_references(combo, folder: Path, seed: int, resolution: int = 64) -> SubjectCase:
    """4 renders of the held-out object, one per training background, with world captions."""
    from PIL import Image

    from conceptkit.world.captions import caption_scene
    from conceptkit.world.factors import sample_scene
    from conceptkit.world.render import render_scene

    shape, colour, pattern = combo
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (background, background_pattern) in enumerate(TRAIN_BACKGROUNDS):
        allowed = {"shape": [shape], "colour": [colour], "pattern": [pattern], "size": ["large"],
                   "background_colour": [background], "background_pattern": [background_pattern]}
        scene = sample_scene(rng, n_objects=1, split="heldout", allowed=allowed, orientation=TOY_ORIENTATION)
        Image.fromarray(render_scene(scene, resolution)).save(folder / f"{i}_{background}.png")
        (folder / f"{i}_{background}.txt").write_text(caption_scene(scene, rng) + "\n")
    return SubjectCase(name=concept_name(combo), combo=tuple(combo), folder=folder)


def subject_prompts(token: str) -> list[tuple[str, str]]:
    """(prompt, requested background colour): the concept in contexts it was never shown in.
    Worded as the world's captions are ("a large <object> on a plain <colour> background"): the toy
    text encoders know only that grammar, and without the article and size word in front of the
    concept's token they drew no object at all (measured with Textual Inversion on sd15_shapes: the
    concept's colour in 8 of 8 samples with "a large <token> ...", in 0 of 8 without)."""
    return [(f"a large {token} on a plain {b} background", b) for b in TEST_BACKGROUNDS] + \
           [(f"a picture of a large {token} against a {b} backdrop", b) for b in TEST_BACKGROUNDS]


def drift_prompts(seed: int, count: int):
    """Concept-free single-object prompts with their ground truth (pretrain-split combos)."""
    from conceptkit.world.captions import describe_object
    from conceptkit.world.factors import sample_scene

    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        scene = sample_scene(rng, n_objects=1, split="pretrain", allowed={"background_pattern": ["plain"]})
        obj = scene.objects[0]
        cases.append((f"a {describe_object(obj, with_size=True)} on a plain {scene.background.colour} background",
                      obj, scene.background.colour))
    return cases


def _to_uint8(media: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, F, H, W) in [0, 1] -> first frames as (H, W, 3) uint8."""
    return [(m[:, 0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for m in media]


def score_subject(images: list[np.ndarray], requested: list[str], combo, train_backgrounds) -> dict[str, float]:
    from conceptkit.world.oracle import read_image

    shape, colour, pattern = combo
    present, prompt_ok, leaked, centres = [], [], [], []
    factors = {"shape": [], "colour": [], "pattern": []}
    for image, want in zip(images, requested):
        reading = read_image(image)
        hits = [o for o in reading.objects if (o.shape, o.colour, o.pattern) == (shape, colour, pattern)]
        present.append(bool(hits))
        for factor, value in zip(factors, combo):
            factors[factor].append(any(getattr(o, factor) == value for o in reading.objects))
        # The concept's object: the one with most of its factors (a method that carries only the
        # colour still places an object; whole-concept hits alone would leave diversity undefined
        # whenever a toy cannot draw the whole concept).
        carriers = [(sum(getattr(o, f) == v for f, v in zip(factors, combo)), o) for o in reading.objects]
        carriers = [(n, o) for n, o in carriers if n > 0]
        if carriers:
            centres.append(max(carriers, key=lambda pair: pair[0])[1].centre)
        prompt_ok.append(reading.background_colour == want)
        leaked.append(reading.background_colour in train_backgrounds and reading.background_colour != want)
    spread = float(np.sqrt(np.var(np.array(centres), axis=0).sum())) if len(centres) > 1 else None
    return {"concept_fidelity": float(np.mean(present)),
            **{f"{factor}_fidelity": float(np.mean(hit)) for factor, hit in factors.items()},
            "prompt_fidelity": float(np.mean(prompt_ok)), "leakage": float(np.mean(leaked)), "diversity": spread}


def drift_accuracy(images: list[np.ndarray], cases) -> float:
    """Share of concept-free samples whose shape, colour and background all read back right."""
    from conceptkit.world.oracle import read_image

    right = []
    for image, (_, obj, background) in zip(images, cases):
        reading = read_image(image)
        right.append(reading.background_colour == background and
                     any((o.shape, o.colour) == (obj.shape, obj.colour) for o in reading.objects))
    return float(np.mean(right))


def _train(method: str, backbone: list[str], case: SubjectCase, output: Path, steps: int | None, seed: int,
           extra: list[str]) -> tuple[Path, float]:
    from conceptkit.config import compose
    from conceptkit.training.run import train

    overrides = [f"method={method}", *backbone, f"data.images={case.folder}", f"name={case.name}",
                 f"output={output}", "sample.count=0", "trainer.progress_bar=false", f"seed={seed}", "overwrite=true"]
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    method_class = registry.method_class(method)
    if method_class.renders_class_word:
        # A method that renders the concept as its class word (BiCo's description) gets the neutral word
        # and no captions [ours]: the references' world captions name the held-out shape, colour and
        # pattern, which the toy text encoder knows, so they would score the base model, not the binding
        # (shapes_motion's rule; its sources carry no captions). An empty caption is no caption (data.py).
        no_captions = case.folder.parent / f"{case.name}_no_captions.json"
        no_captions.write_text(json.dumps({f.name: "" for f in sorted(case.folder.glob("*.png"))}) + "\n")
        overrides += [*method_class.class_word_overrides(NEUTRAL_SUBJECT_WORD), f"data.captions={no_captions}"]
    else:
        # Methods that name a class beside their identifier (DreamBooth's protocol) get the concept's shape.
        overrides += method_class.class_word_overrides(case.combo[0])
    started = time.time()
    folder = train(compose("train", [*overrides, *extra]))  # the variant's and the user's overrides last: they win
    return folder, time.time() - started


def suite_backbone_overrides(cfg) -> list[str]:
    """Train-config overrides that select the quality suites' backbone (and its local weights)."""
    overrides = [f"backbone={cfg.suite_backbone}"]
    if cfg.get("suite_backbone_path"):
        if not Path(cfg.suite_backbone_path).is_dir():
            raise UserError(f"suite_backbone_path: {cfg.suite_backbone_path} is not a folder; give a diffusers "
                            f"folder such as a `conceptkit pretrain` output")
        overrides.append(f"backbone.path={cfg.suite_backbone_path}")
    return overrides


def _suite_setup(cfg, video: bool = False):
    """The output and work folders, the suite's backbone (loaded) and the sampling settings."""
    from hydra.utils import instantiate

    from conceptkit.config import compose

    backbone = instantiate(compose("train", suite_backbone_overrides(cfg)).backbone).load()
    if video and not backbone.is_video:
        raise UserError(f"suite={cfg.suite} composes a motion from a clip: suite_backbone={cfg.suite_backbone} makes "
                        f"images only; use a video backbone (wan21_shapes, wan21_tiny)")
    output = Path(cfg.output)  # created once the backbone loaded: a bad backbone leaves no folder behind
    output.mkdir(parents=True, exist_ok=True)
    return output, output / "work", backbone, dict(steps=cfg.sample_steps, guidance=cfg.guidance)


def run_subject_suite(cfg) -> Path:
    from conceptkit.artifact import load_concept
    from conceptkit.media import grid, save_png
    from conceptkit.registry import method_names
    from conceptkit.world.factors import HELDOUT_COMBOS

    for name in cfg.methods:
        if name not in method_names():
            raise UserError(f"methods: unknown method {name!r}; choose from {', '.join(method_names())}")
    rows = multi_variants(cfg)
    if cfg.concepts > len(HELDOUT_COMBOS):
        raise UserError(f"concepts: at most {len(HELDOUT_COMBOS)} held-out combinations exist")
    output, work, backbone, sample = _suite_setup(cfg)
    backbone_name = cfg.suite_backbone
    cases = [write_subject_references(combo, work / "references" / concept_name(combo), cfg.seed + i,
                                      backbone.resolution)
             for i, combo in enumerate(HELDOUT_COMBOS[:cfg.concepts])]
    drift_cases = drift_prompts(cfg.seed + 1000, cfg.drift_prompts)
    base_drift = drift_accuracy(_to_uint8(backbone.generate([c[0] for c in drift_cases], seed=cfg.seed, **sample)),
                                drift_cases)
    train_backgrounds = {b for b, _ in TRAIN_BACKGROUNDS}
    records = []
    total = len(cases) * len(rows)
    for number, (case, (label, method_name, extra)) in enumerate(((c, r) for c in cases for r in rows), 1):
        print(f"[{number}/{total}] {label} on {case.name} ...", flush=True)
        folder, seconds = _train(method_name, suite_backbone_overrides(cfg), case, work / f"{label}_{case.name}.concept",
                                 cfg.train_steps, cfg.seed, [*extra, *cfg.train_overrides])
        method, meta = load_concept(folder, backbone)
        prompts = subject_prompts(method.prompt("{%s}" % case.name))
        texts = [p for p, _ in prompts for _ in range(cfg.samples_per_prompt)]
        wanted = [b for _, b in prompts for _ in range(cfg.samples_per_prompt)]
        media = torch.cat([backbone.generate(texts[i:i + 8], seed=cfg.seed + i, **sample)
                           for i in range(0, len(texts), 8)])
        metrics = score_subject(_to_uint8(media), wanted, case.combo, train_backgrounds)
        attached = drift_accuracy(_to_uint8(backbone.generate([c[0] for c in drift_cases], seed=cfg.seed, **sample)),
                                  drift_cases)
        metrics["drift"] = base_drift - attached
        method.detach(backbone)
        grid_name = f"{label}_{case.name}.png"
        save_png(grid(media, columns=cfg.samples_per_prompt), output / grid_name)
        records.append({"variant": label, "method": method_name, "overrides": extra, "backbone": backbone_name,
                        "concept": case.name,
                        **{k: (None if v is None else round(v, 4)) for k, v in metrics.items()},
                        "train_seconds": round(seconds, 1), "process_peak_rss_mb": _process_peak_rss_mb(), "grid": grid_name,
                        "prompts": [p for p, _ in prompts]})
    write_suite_results(output, "shapes_subject", cfg, records,
                        notes={"base_drift_accuracy": round(base_drift, 4),
                               "train_backgrounds": sorted(train_backgrounds), "test_backgrounds": list(TEST_BACKGROUNDS)})
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _process_peak_rss_mb() -> float:
    """The suite process's peak resident set SO FAR (training and sampling run in-process, so this is
    cumulative over the records before it; the per-method step memory is `suite=speed`'s job)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


SUBJECT_METRICS = ("concept_fidelity", "shape_fidelity", "colour_fidelity", "pattern_fidelity", "prompt_fidelity",
                   "leakage", "diversity", "drift")


def _mean_or_none(values: list) -> float | None:
    """Mean over the defined values (a metric may be undefined for a record: diversity without 2 samples)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_suite_results(output: Path, suite: str, cfg, records: list[dict], notes: dict) -> None:
    """One table row per variant, in the records' order (methods, then variants). Records written before
    session 15 have no `variant` or `overrides` (benchmarks/rescore_subject.py re-writes such folders)."""
    labels = list(dict.fromkeys(r.get("variant", r["method"]) for r in records))
    results = {"version": 1, "suite": suite, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "settings": {**{k: cfg[k] for k in ("methods", "suite_backbone", "suite_backbone_path", "concepts", "train_steps",
                                                   "samples_per_prompt", "sample_steps", "guidance", "seed")},
                            "variants": OmegaConf.to_container(cfg.variants) if cfg.get("variants") else None,
                            "train_overrides": list(cfg.get("train_overrides") or [])},
               "notes": notes, "records": records}
    (output / "results.json").write_text(json.dumps(results, indent=2, default=list) + "\n")
    lines = [f"# conceptkit bench: {suite}", "", f"backbone {cfg.suite_backbone}, seed {cfg.seed}, "
             f"{cfg.train_steps or 'default'} steps per stage; {json.dumps(notes)}", "",
             "| method | " + " | ".join(SUBJECT_METRICS) + " | concepts | train s |", "|---" * (len(SUBJECT_METRICS) + 3) + "|"]
    for method in labels:
        rows = [r for r in records if r.get("variant", r["method"]) == method]
        means = [_mean_or_none([r[m] for r in rows]) for m in SUBJECT_METRICS]
        lines.append(f"| {method} | " + " | ".join(_cell(v) for v in means) +
                     f" | {len(rows)} | {np.mean([r['train_seconds'] for r in rows]):.0f} |")
    lines += ["", "## Per concept", ""]
    for r in records:
        label, overrides = r.get("variant", r["method"]), r.get("overrides") or []
        lines.append(f"### {label} / {r['concept']}" + (f" ({r['method']}: {' '.join(overrides)})" if overrides else ""))
        lines.append(", ".join(f"{m} {_cell(r[m])}" for m in SUBJECT_METRICS))
        lines.append(f"![{label} {r['concept']}]({r['grid']})  ")
        lines.append("rows: " + " | ".join(r["prompts"]))
        lines.append("")
    (output / "report.md").write_text("\n".join(lines) + "\n")
    series = {label: [_mean_or_none([r[m] for r in records if r.get("variant", r["method"]) == label])
                      for m in SUBJECT_METRICS] for label in labels}
    write_variant_report(output, suite, "\n".join(lines) + "\n", list(SUBJECT_METRICS), series)
    print("\n".join(lines[:6 + len(labels)]))


def write_variant_report(output: Path, suite: str, markdown: str, metrics: list[str], series: dict) -> None:
    """report.html beside report.md: its tables, and one bar per metric and variant (means)."""
    from conceptkit.bench.report import BarChart, write_html_report

    write_html_report(output, f"conceptkit bench: {suite}", markdown,
                      [BarChart(f"{suite}: mean per variant", metrics, series, "score")])


# --- shapes_multi, and the references of shapes_motion (its runner: motion.py) ---------------------


def write_multi_reference(combos, folder: Path, seed: int, resolution: int = 64,
                          objects: str = "heldout") -> tuple[Path, str, np.ndarray]:
    """One image with two objects (held-out triples, or with objects="seen" two that pretraining
    shows), and the sentence that marks both: MCPL's input; also each object's visible pixels,
    (2, H, W) in sentence order."""
    from PIL import Image

    from conceptkit.world.factors import HELDOUT_COMBOS, sample_scene
    from conceptkit.world.render import object_masks, render_scene

    heldout = objects == "heldout"
    if len(combos) != 2 or any((tuple(c) in HELDOUT_COMBOS) != heldout for c in combos):
        raise UserError(f"shapes_multi takes two {'held-out' if heldout else 'pretraining'} combinations")
    allowed = {"size": ["large"]}
    if not heldout:  # the pretraining split has ~180 triples: draw from the pair's own factors only
        allowed.update({factor: sorted({c[i] for c in combos}) for i, factor in enumerate(("shape", "colour", "pattern"))})
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        scene = sample_scene(rng, n_objects=2, split="heldout" if heldout else "pretrain", allowed=allowed,
                             orientation=TOY_ORIENTATION)
        if sorted(o.combo for o in scene.objects) == sorted(tuple(c) for c in combos):
            break
    else:
        raise UserError(f"no two-object scene with {combos} found; pick other combinations")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_scene(scene, resolution)).save(folder / "pair.png")
    names = [concept_name(o.combo) for o in scene.objects]
    sentence = f"a photo of a {{{names[0]}}} and a {{{names[1]}}} on a {scene.background.colour} background"
    return folder / "pair.png", sentence, object_masks(scene, resolution)


def score_multi(images_alone: list[np.ndarray], word_combo, other_combo) -> dict[str, float]:
    """Samples prompted with ONE learned word: that object present (word_fidelity) and the other
    object absent (separation); per factor, an object with the word's shape / colour / pattern
    (shape_, colour_, pattern_fidelity, each on its own as in shapes_subject) and no object in the
    other word's colour (colour_separation; the pairs' objects differ in colour)."""
    from conceptkit.world.oracle import read_image

    present, separate, colour_apart = [], [], []
    factors = {"shape": [], "colour": [], "pattern": []}
    for image in images_alone:
        objects = read_image(image).objects
        found = {(o.shape, o.colour, o.pattern) for o in objects}
        present.append(tuple(word_combo) in found)
        separate.append(tuple(other_combo) not in found)
        for factor, value in zip(factors, word_combo):
            factors[factor].append(any(getattr(o, factor) == value for o in objects))
        colour_apart.append(all(o.colour != other_combo[1] for o in objects))
    return {"word_fidelity": float(np.mean(present)), "separation": float(np.mean(separate)),
            **{f"{factor}_fidelity": float(np.mean(hits)) for factor, hits in factors.items()},
            "colour_separation": float(np.mean(colour_apart))}


MULTI_PROMPTS = ("a picture of a large {}", "a large {} on a plain {} background")  # the caption grammar (see subject_prompts)


@dataclass
class MultiCase:
    name: str  # concept name, e.g. "pair0"
    combos: tuple  # the two objects' (shape, colour, pattern), in sentence order
    words: tuple[str, str]  # the sentence's marked words (the objects' concept names)
    image: Path
    sentence: str
    background: str
    masks: np.ndarray  # (2, H, W) bool: each object's visible pixels, in sentence order


MULTI_OBJECTS = ("heldout", "seen")


def multi_cases(count: int, folder: Path, seed: int, resolution: int, objects: str = "heldout") -> list[MultiCase]:
    """Up to 4 disjoint pairs of held-out objects (combos 0+1, 2+3, ...), one two-object image each;
    objects="seen": each held-out object's nearest pretraining neighbour instead (same shape and
    colour, another pattern: `seen_neighbour`), objects the base model was trained to draw when named."""
    from conceptkit.world.factors import HELDOUT_COMBOS, seen_neighbour

    check_multi_count(count)
    if objects not in MULTI_OBJECTS:
        raise UserError(f"objects: shapes_multi takes {' or '.join(MULTI_OBJECTS)}, got {objects!r}")
    cases = []
    for i in range(count):
        pair = HELDOUT_COMBOS[2 * i:2 * i + 2]
        if objects == "seen":
            pair = tuple(seen_neighbour(c) for c in pair)
        image, sentence, masks = write_multi_reference(pair, folder / f"pair{i}", seed + i, resolution, objects)
        words = tuple(sorted((concept_name(c) for c in pair), key=sentence.index))  # sentence order
        by_word = {concept_name(c): tuple(c) for c in pair}
        background = sentence.rsplit(" on a ", 1)[1].split()[0]
        cases.append(MultiCase(name=f"pair{i}", combos=tuple(by_word[w] for w in words), words=words, image=image,
                               sentence=sentence, background=background, masks=masks))
    return cases


def check_multi_count(count: int) -> None:
    from conceptkit.world.factors import HELDOUT_COMBOS

    if not 1 <= count <= len(HELDOUT_COMBOS) // 2:
        raise UserError(f"concepts: shapes_multi has 1 to {len(HELDOUT_COMBOS) // 2} pairs of held-out objects, got {count}")


def multi_variants(cfg, allow_empty: bool = False) -> list[tuple[str, str, list[str]]]:
    """(label, method, train overrides): each of `methods` with its defaults, then `variants`
    (label -> [method, overrides...]), e.g. MCPL without regularisers or with masking only.
    allow_empty: shapes_multi with methods=[] still renders its untrained ceiling row."""
    from conceptkit.registry import method_names

    rows = [(m, m, []) for m in cfg.methods]
    for label, spec in (cfg.variants or {}).items():
        if label == NAMED_ROW[0]:
            raise UserError(f"variants.{label}: that label is the suite's own untrained row; choose another")
        spec = list(spec)
        if not spec:
            raise UserError(f"variants.{label}: give [method, override, ...]")
        rows.append((str(label), str(spec[0]), [str(o) for o in spec[1:]]))
    for label, method, _ in rows:
        if method not in method_names():
            raise UserError(f"{label}: unknown method {method!r}; choose from {', '.join(method_names())}")
    if not rows and not allow_empty:
        raise UserError(f"{cfg.suite}: nothing to run; pass methods=[...] and/or variants")
    return rows


def word_prompt(method, name: str, word: str) -> str:
    """The token(s) that should render one object: a method that learned words answers to
    {name/word}; a method with one token for the image (Textual Inversion) gets that token for each."""
    text = method.prompt("{%s/%s}" % (name, word))
    return text if "{" not in text else method.prompt("{%s}" % name)


def base_word_shares(backbone, case: MultiCase, seed: int) -> list[float]:
    """Before any training: the share of each object's shape word's cross-attention (the init word
    MCPL starts from) that lies on its own object in the reference, at MCPL's default mask sites.
    MCPL binds a word to an object only through these maps (bench/word_attention.py)."""
    from PIL import Image

    from conceptkit.bench.word_attention import own_object_shares
    from conceptkit.attention import word_map_sites

    nouns = [combo[0] for combo in case.combos]
    sentence = case.sentence
    for word, noun in zip(case.words, nouns):
        sentence = sentence.replace("{%s}" % word, noun)
    sites = word_map_sites([s for s in backbone.attention_sites() if s.kind == "cross"])
    image = np.asarray(Image.open(case.image).convert("RGB"))
    return own_object_shares(backbone, image, case.masks, sentence, nouns, sites, seed=seed)


def training_terms(concept_folder: Path) -> dict[str, float]:
    """The loss terms a concept's training reported, averaged over its steps (concept.json: each
    stage's mean_terms; a later stage's value of a term replaces an earlier one)."""
    meta = json.loads((Path(concept_folder) / "concept.json").read_text())
    terms: dict[str, float] = {}
    for stage in meta["training"]["stages"]:
        terms.update(stage.get("mean_terms", {}))
    return terms


def run_multi_suite(cfg) -> Path:
    from conceptkit.artifact import load_concept
    from conceptkit.config import compose
    from conceptkit.training.run import train

    variants = multi_variants(cfg, allow_empty=True)
    check_multi_count(cfg.concepts)  # before the backbone loads
    if cfg.objects not in MULTI_OBJECTS:
        raise UserError(f"objects: shapes_multi takes {' or '.join(MULTI_OBJECTS)}, got {cfg.objects!r}")
    output, work, backbone, _ = _suite_setup(cfg)
    cases = multi_cases(cfg.concepts, work / "references", cfg.seed, backbone.resolution, cfg.objects)
    shares = {case.name: base_word_shares(backbone, case, cfg.seed) for case in cases}
    records = []
    total = len(cases) * len(variants)
    for number, (case, (label, method_name, extra)) in enumerate(((c, v) for c in cases for v in variants), 1):
        print(f"[{number}/{total}] {label} on {case.name} ({' + '.join(case.words)}) ...", flush=True)
        overrides = [f"method={method_name}", *suite_backbone_overrides(cfg), f"data.images={case.image}",
                     f"name={case.name}", f"output={work / f'{label}_{case.name}.concept'}", "sample.count=0",
                     "trainer.progress_bar=false", f"seed={cfg.seed}", "overwrite=true", *cfg.train_overrides]
        if cfg.train_steps is not None:
            overrides.append(f"trainer.max_steps={cfg.train_steps}")
        # Methods that learn words from a sentence (MCPL) get the scene's. Each word starts from its
        # object's class noun (its shape word), as the paper's users write "a {ball} and a {cactus}":
        # the noun is what ties a word to one of the objects. With one init for both ("object", the
        # suite before session 8) the sentence is symmetric in the two words and which word takes
        # which object is left to chance (measured on release 4: each word rendered the OTHER object).
        # The held-out combination as a whole is still not nameable by the base model.
        init_words = {w: combo[0] for w, combo in zip(case.words, case.combos)}
        scene = registry.method_class(method_name).scene_overrides(case.sentence, init_words)
        overrides += scene
        init_words = init_words if scene else None
        started = time.time()
        folder = train(compose("train", overrides + list(extra)))
        seconds = time.time() - started
        method, _ = load_concept(folder, backbone)
        terms = training_terms(folder)
        for k, word in enumerate(case.words):
            records.append({"variant": label, "method": method_name, "overrides": list(extra),
                            **_render_word(backbone, word_prompt(method, case.name, word), case, k, label, cfg, output),
                            "train_seconds": round(seconds, 1), "process_peak_rss_mb": _process_peak_rss_mb(),
                            "training_terms": terms, "init_words": init_words})
        method.detach(backbone)
    # The ceiling on this backbone: no training, each object named by the world's own words ("blue
    # dotted circle"). A learned word can at best draw its object as well as the base model draws it
    # when told what it is (held-out combinations: the base model's compositional generalisation).
    for case in cases:
        for k, word in enumerate(case.words):
            records.append({"variant": NAMED_ROW[0], "method": NAMED_ROW[1], "overrides": [],
                            **_render_word(backbone, named_object(case.combos[k]), case, k, NAMED_ROW[0], cfg, output),
                            "train_seconds": 0.0, "process_peak_rss_mb": _process_peak_rss_mb(),
                            "training_terms": {}, "init_words": None})
    own_share = {(c.name, w): shares[c.name][k] for c in cases for k, w in enumerate(c.words)}
    for record in records:
        record["base_own_attention"] = round(own_share[(record["concept"], record["word"])], 4)
    _write_multi_results(output, cfg, [*variants, (*NAMED_ROW, [])], records)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return output


NAMED_ROW = ("named_words", "none")  # (label, method) of the untrained ceiling row


def named_object(combo) -> str:
    """The world's words for a (shape, colour, pattern) object, e.g. "blue dotted circle"."""
    from conceptkit.world.captions import describe_object
    from conceptkit.world.factors import ObjectSpec

    return describe_object(ObjectSpec(combo[0], combo[1], combo[2], "large", (0.5, 0.5)))


def _render_word(backbone, text: str, case: MultiCase, k: int, label: str, cfg, output: Path) -> dict:
    """Sample `text` (a learned word's token, or words) alone in the suite's prompts, save the grid and
    score it against the case's k-th object (and the other one for separation)."""
    from conceptkit.media import grid, save_png

    texts = [MULTI_PROMPTS[0].format(text), MULTI_PROMPTS[1].format(text, case.background)]
    texts = [t for t in texts for _ in range(cfg.samples_per_prompt)]
    media = torch.cat([backbone.generate(texts[i:i + 8], seed=cfg.seed + i, steps=cfg.sample_steps,
                                         guidance=cfg.guidance) for i in range(0, len(texts), 8)])
    metrics = score_multi(_to_uint8(media), case.combos[k], case.combos[1 - k])
    word = case.words[k]
    grid_name = f"{label}_{case.name}_{word}.png"
    save_png(grid(media, columns=cfg.samples_per_prompt), output / grid_name)
    return {"backbone": cfg.suite_backbone, "concept": case.name, "word": word,
            **{m: round(v, 4) for m, v in metrics.items()}, "grid": grid_name,
            "prompts": list(dict.fromkeys(texts)), "sentence": case.sentence}


MULTI_METRICS = ("word_fidelity", "separation", "shape_fidelity", "colour_fidelity", "pattern_fidelity",
                 "colour_separation")


def _write_multi_results(output: Path, cfg, variants, records: list[dict]) -> None:
    objects = "held-out objects" if cfg.objects == "heldout" else "seen objects (pretraining triples: objects=seen)"
    write_variant_results(output, cfg, "shapes_multi", variants, records, MULTI_METRICS,
                          f"one two-object image per pair of {objects}, each learned word prompted alone", "words",
                          heading=lambda r: f"{r['variant']} / {r['concept']} / {r['word']}",
                          detail=_multi_detail, image_label=lambda r: f"{r['variant']} {r['word']}")


def _multi_detail(record: dict) -> str:
    share = record.get("base_own_attention")
    own = "" if share is None else f"; the base model's init word looks at its own object: {share:.2f} (0.5 = no preference)"
    return f"sentence: {record['sentence']}{own}"


def _mask_area(record: dict) -> float | None:
    """The fraction of the latent an attention-masked method (MCPL) kept in its loss, averaged over
    training: near 1 means the mask did not mask (diffuse cross-attention)."""
    return record.get("training_terms", {}).get("mask_area")


def write_variant_results(output: Path, cfg, suite: str, variants, records: list[dict], metrics: tuple[str, ...],
                          what: str, unit: str, heading, detail, image_label) -> None:
    """results.json and report.md of a suite whose rows are variants (label, method, overrides):
    the summary table (means over the records of each variant) and one section per record."""
    settings = {k: cfg[k] for k in ("methods", "suite_backbone", "suite_backbone_path", "concepts", "train_steps",
                                    "samples_per_prompt", "sample_steps", "guidance", "seed")}
    if suite == "shapes_multi":
        settings["objects"] = cfg.objects
    settings["variants"] = {label: [method, *extra] for label, method, extra in variants}
    results = {"version": 1, "suite": suite, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "settings": settings, "records": records}
    (output / "results.json").write_text(json.dumps(results, indent=2, default=list) + "\n")
    masked = any(_mask_area(r) is not None for r in records)  # the column only when a variant masked
    lines = [f"# conceptkit bench: {suite}", "",
             f"backbone {cfg.suite_backbone}, seed {cfg.seed}, {cfg.train_steps or 'default'} steps per stage; {what}", "",
             "| variant | method | overrides | " + " | ".join(metrics) + f" | {unit} | train s |" +
             (" train mask area |" if masked else ""),
             "|---" * (len(metrics) + 5 + masked) + "|"]
    for label, method, extra in variants:
        rows = [r for r in records if r["variant"] == label]
        if rows:
            means = [np.mean([r[m] for r in rows]) for m in metrics]
            line = (f"| {label} | {method} | {' '.join(extra) or '-'} | " + " | ".join(f"{v:.3f}" for v in means) +
                    f" | {len(rows)} | {np.mean([r['train_seconds'] for r in rows]):.0f} |")
            if masked:
                areas = [_mask_area(r) for r in rows]
                line += f" {np.mean(areas):.3f} |" if all(a is not None for a in areas) else " - |"
            lines.append(line)
    lines += ["", "## Per record", ""]
    for r in records:
        lines.append(f"### {heading(r)}")
        lines.append(", ".join(f"{m} {r[m]:.3f}" for m in metrics) + f"; {detail(r)}")
        lines.append(f"![{image_label(r)}]({r['grid']})  ")
        lines.append("")
    (output / "report.md").write_text("\n".join(lines) + "\n")
    series = {label: [float(np.mean([r[m] for r in records if r["variant"] == label])) for m in metrics]
              for label, _, _ in variants if any(r["variant"] == label for r in records)}
    write_variant_report(output, suite, "\n".join(lines) + "\n", list(metrics), series)
    print("\n".join(lines[:6 + len(variants)]))


def write_motion_references(subject_combo, direction: str, folder: Path, seed: int, frames: int = 9,
                            resolution: int = 64) -> tuple[Path, Path]:
    """A still image of the held-out subject and a clip of a DIFFERENT (pretrain) object moving in
    `direction`: BiCo's image-subject + video-motion composition. The mover shares no shape, colour or
    pattern with the subject, so what of the subject a composed clip shows came from the still; the two
    sources stand on two different training backgrounds, never a test one, so a requested background is
    told apart from a leaked one."""
    import imageio.v3 as iio
    from PIL import Image

    from conceptkit.world.factors import COLOURS, PATTERNS, SHAPES, sample_scene
    from conceptkit.world.render import render_clip, render_scene

    shape, colour, pattern = subject_combo
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    still_background, clip_background = (TRAIN_BACKGROUNDS[i] for i in rng.choice(len(TRAIN_BACKGROUNDS), 2, replace=False))
    subject = sample_scene(rng, n_objects=1, split="heldout", allowed={
        "shape": [shape], "colour": [colour], "pattern": [pattern], "size": ["large"],
        "background_colour": [still_background[0]], "background_pattern": [still_background[1]]},
        orientation=TOY_ORIENTATION)
    Image.fromarray(render_scene(subject, resolution)).save(folder / "subject.png")
    mover = sample_scene(rng, n_objects=1, split="pretrain", clip_frames=frames, allowed={
        "shape": [s for s in SHAPES if s != shape], "colour": [c for c in COLOURS if c != colour],
        "pattern": [p for p in PATTERNS if p != pattern], "direction": [direction], "speed": ["fast"],
        "rotation": ["none"], "background_colour": [clip_background[0]],
        "background_pattern": [clip_background[1]]}, orientation=TOY_ORIENTATION)
    clip = render_clip(mover, frames, resolution)
    iio.imwrite(folder / "motion.mp4", clip, fps=8, codec="libx264", macro_block_size=1)
    return folder / "subject.png", folder / "motion.mp4"
