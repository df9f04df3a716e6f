"""ShapeWorld: sampling, the held-out split, rendering, captions and the oracle's accuracy.

The accuracy tests use seeds that were not used while the oracle was tuned.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conceptkit.world import (BACKGROUND_COLOURS, COLOURS, HELDOUT_COMBOS, PATTERNS, SHAPES, Background,
                              ObjectSpec, Scene, caption_scene, describe_object, is_heldout, match_objects,
                              read_clip, read_image, render_clip, render_scene, sample_scene, score_reading)
from conceptkit.world.captions import relation
from conceptkit.world.factors import PATTERN_COLOURS, factor_combos
from conceptkit.world.oracle import label_components

N_SCENES = 300
FRESH_IMAGE_SEED = 424242
FRESH_CLIP_SEED = 515151


def degrade(image: np.ndarray, rng: np.random.Generator, sigma: float = 8.0, blur: float = 0.6) -> np.ndarray:
    """Slight Gaussian blur, then Gaussian noise of `sigma` grey levels."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), float)
    return np.clip(np.rint(blurred + rng.normal(0.0, sigma, blurred.shape)), 0, 255).astype(np.uint8)


def accuracies(readings, scenes) -> dict[str, float]:
    hits = defaultdict(list)
    for reading, scene in zip(readings, scenes):
        for factor, values in score_reading(reading, scene).items():
            hits[factor] += values
    return {factor: float(np.mean(values)) for factor, values in hits.items()}


def check(accuracy: dict[str, float], factors, minimum: float, what: str) -> None:
    table = ", ".join(f"{f} {accuracy[f]:.1%}" for f in sorted(accuracy))
    print(f"{what}: {table}")
    low = {f: accuracy[f] for f in factors if accuracy[f] < minimum}
    assert not low, f"{what}: oracle accuracy below {minimum:.0%} for {low} (all: {table})"


IMAGE_FACTORS = ("shape", "colour", "pattern", "size", "background_colour", "count")


@pytest.fixture(scope="module")
def still_scenes():
    rng = np.random.default_rng(FRESH_IMAGE_SEED)
    scenes = [sample_scene(rng) for _ in range(N_SCENES)]
    return scenes, [render_scene(s) for s in scenes]


@pytest.fixture(scope="module")
def clip_scenes():
    rng = np.random.default_rng(FRESH_CLIP_SEED)
    scenes = [sample_scene(rng, clip_frames=9) for _ in range(N_SCENES)]
    return scenes, [render_clip(s, frames=9) for s in scenes]


# ------------------------------------------------------------------ vocabulary and sampling


def test_palettes_are_well_separated():
    def distance(a, b):
        return float(np.linalg.norm(np.subtract(a, b, dtype=float)))

    names = list(COLOURS)
    assert min(distance(COLOURS[a], COLOURS[b]) for a in names for b in names if a < b) >= 100
    foreground = list(COLOURS.values()) + list(PATTERN_COLOURS.values())
    assert min(distance(f, b) for f in foreground for b in BACKGROUND_COLOURS.values()) >= 80
    assert min(distance(COLOURS[n], PATTERN_COLOURS[n]) for n in names) >= 90  # patterns stay visible


def test_sampling_is_deterministic_for_a_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, clip_frames=9)
        return scene, caption_scene(scene, rng)

    (a, caption_a), (b, caption_b) = draw(7), draw(7)
    assert a == b and caption_a == caption_b
    assert np.array_equal(render_clip(a), render_clip(b))
    assert draw(8)[0] != a


def test_scenes_hold_one_to_three_separate_objects_inside_the_frame():
    rng = np.random.default_rng(1)
    counts = set()
    for _ in range(200):
        scene = sample_scene(rng)
        counts.add(len(scene.objects))
        for i, obj in enumerate(scene.objects):
            assert all(obj.radius <= c <= 1 - obj.radius for c in obj.centre)
            for other in scene.objects[i + 1:]:
                assert np.hypot(*np.subtract(obj.centre, other.centre)) > obj.radius + other.radius
    assert counts == {1, 2, 3}


def test_heldout_combos_never_appear_in_pretraining_but_every_value_does():
    rng = np.random.default_rng(2)
    seen = defaultdict(set)
    for _ in range(400):
        for obj in sample_scene(rng, split="pretrain").objects:
            assert not is_heldout(obj), obj
            for factor in ("shape", "colour", "pattern", "size"):
                seen[factor].add(getattr(obj, factor))
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS) and seen["pattern"] == set(PATTERNS)
    assert len(HELDOUT_COMBOS) == 8 and len(set(HELDOUT_COMBOS)) == 8
    heldout = [o for _ in range(50) for o in sample_scene(rng, split="heldout").objects]
    assert all(is_heldout(o) for o in heldout)
    assert {o.combo for o in heldout} == set(HELDOUT_COMBOS)
    # The held-out triples only hold out the combination: each value has pretraining combos.
    pretrain = factor_combos("pretrain")
    for combo in HELDOUT_COMBOS:
        for position, value in enumerate(combo):
            assert any(c[position] == value for c in pretrain)


def test_allowed_restricts_sampling_and_rejects_impossible_requests():
    rng = np.random.default_rng(3)
    allowed = {"shape": ["star"], "colour": ["red", "blue"], "background_colour": ["sand"]}
    for _ in range(20):
        scene = sample_scene(rng, n_objects=2, allowed=allowed)
        assert all(o.shape == "star" and o.colour in ("red", "blue") for o in scene.objects)
        assert scene.background.colour == "sand"
    with pytest.raises(ValueError, match="no .* combination"):
        sample_scene(rng, split="heldout", allowed={"shape": ["star"], "colour": ["blue"]})
    with pytest.raises(ValueError, match="unknown allowed"):
        sample_scene(rng, allowed={"hue": ["red"]})


def test_scenes_round_trip_through_json():
    rng = np.random.default_rng(4)
    for scene in (sample_scene(rng), sample_scene(rng, clip_frames=9)):
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


# ------------------------------------------------------------------ rendering and captions


def test_render_shapes_and_resolutions():
    rng = np.random.default_rng(5)
    scene = sample_scene(rng, clip_frames=9)
    for resolution in (64, 32):
        image = render_scene(scene, resolution)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        clip = render_clip(scene, frames=9, resolution=resolution)
        assert clip.shape == (9, resolution, resolution, 3) and clip.dtype == np.uint8
        assert np.array_equal(clip[0], image)


def test_clips_move_in_the_stated_direction():
    """Foreground centroid of one object on a plain background, independent of the oracle."""
    rng = np.random.default_rng(6)
    for direction in ("left", "right", "up", "down", "none"):
        for _ in range(4):
            allowed = {"direction": [direction], "rotation": ["none"], "background_pattern": ["plain"]}
            scene = sample_scene(rng, n_objects=1, clip_frames=9, allowed=allowed)
            clip = render_clip(scene).astype(float)
            background = np.array(BACKGROUND_COLOURS[scene.background.colour], float)
            centres = []
            for frame in clip:
                weight = np.linalg.norm(frame - background, axis=-1) > 40
                ys, xs = np.nonzero(weight)
                centres.append((xs.mean(), ys.mean()))
            dx, dy = np.subtract(centres[4], centres[0])  # first half: before any bounce
            expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "none": (0, 0)}[direction]
            assert np.sign(np.round([dx, dy])).tolist() == list(expected), (direction, dx, dy)


def test_captions_name_every_factor():
    rng = np.random.default_rng(9)
    pattern_words = {"gradient": ("gradient",), "noise": ("noisy", "grainy"), "plain": ("",)}
    for clip in (False, True):
        for _ in range(60):
            scene = sample_scene(rng, clip_frames=9 if clip else None)
            caption = caption_scene(scene, rng)
            for obj in scene.objects:
                for word in (obj.size, obj.colour, obj.shape) + ((obj.pattern,) if obj.pattern != "plain" else ()):
                    assert word in caption, (word, caption)
            assert scene.background.colour in caption
            assert any(w in caption for w in pattern_words[scene.background.pattern]), caption
            for motion in scene.motions or []:
                assert (motion.direction if motion.direction != "none" else "still" if motion.rotation == "none"
                        else "spinning in place") in caption, caption
                if motion.direction != "none":
                    assert {"slow": "slowly", "fast": "fast"}[motion.speed] in caption or "quickly" in caption
                if motion.rotation == "spin":
                    assert "spinning" in caption


def test_describe_object_and_relations():
    star = ObjectSpec("star", "red", "striped", "large", (0.2, 0.5))
    circle = ObjectSpec("circle", "blue", "plain", "small", (0.8, 0.55))
    assert describe_object(star) == "red striped star"
    assert describe_object(circle) == "blue circle"
    assert describe_object(star, with_size=True) == "large red striped star"
    assert relation(star, circle) == "left of" and relation(circle, star) == "right of"
    above = ObjectSpec("square", "white", "dotted", "small", (0.25, 0.1))
    assert relation(above, star) == "above" and relation(star, above) == "below"
    scene = Scene([star, circle], Background("sand"))
    captions = {caption_scene(scene, np.random.default_rng(seed)) for seed in range(20)}
    assert len(captions) > 3  # several phrasings
    assert all(("left of" in c or "right of" in c or " and " in c) for c in captions)


# ------------------------------------------------------------------ oracle


def test_label_components_finds_separate_blobs():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:4] = True
    mask[5:9, 6:8] = True
    mask[8, 1] = True
    mask[4, 4] = mask[3, 5] = True  # diagonal neighbours are separate under 4-connectivity
    labels, count = label_components(mask)
    assert count == 5
    assert len(set(labels[1:3, 1:4].ravel())) == 1 and labels[1, 1] != labels[5, 6]


def test_match_objects_pairs_by_centre():
    rng = np.random.default_rng(10)
    scene = sample_scene(rng, n_objects=3)
    reading = read_image(render_scene(scene))
    pairs = match_objects(reading, scene)
    assert [j for _, j in pairs] == [0, 1, 2]
    for i, j in pairs:
        assert np.hypot(*np.subtract(reading.objects[i].centre, scene.objects[j].centre)) < 1 / 64
    far = Scene([ObjectSpec("star", "red", "plain", "small", (0.9, 0.9))], scene.background)
    lonely = Scene([ObjectSpec("star", "red", "plain", "small", (0.1, 0.1))], scene.background)
    assert match_objects(read_image(render_scene(far)), lonely) == []


def test_oracle_reads_an_empty_background():
    for pattern in ("plain", "gradient", "noise"):
        scene = Scene([], Background("teal", pattern, angle=30.0, seed=3))
        reading = read_image(render_scene(scene))
        assert (reading.background_colour, reading.background_pattern, reading.objects) == ("teal", pattern, [])


def test_oracle_reads_clean_images(still_scenes):
    scenes, images = still_scenes
    accuracy = accuracies([read_image(image) for image in images], scenes)
    check(accuracy, IMAGE_FACTORS + ("background_pattern",), 0.99, f"clean images (n={len(scenes)})")


def test_oracle_survives_noise_and_blur(still_scenes):
    scenes, images = still_scenes
    rng = np.random.default_rng(11)
    accuracy = accuracies([read_image(degrade(image, rng)) for image in images], scenes)
    check(accuracy, IMAGE_FACTORS, 0.95, f"noisy blurred images (n={len(scenes)})")


def test_oracle_reads_clip_motion(clip_scenes):
    scenes, clips = clip_scenes
    accuracy = accuracies([read_clip(clip) for clip in clips], scenes)
    check(accuracy, IMAGE_FACTORS + ("direction", "speed"), 0.99, f"clean clips (n={len(scenes)})")


def test_clip_oracle_survives_noise_and_blur(clip_scenes):
    scenes, clips = clip_scenes
    rng = np.random.default_rng(12)
    readings = [read_clip(np.stack([degrade(frame, rng) for frame in clip])) for clip in clips]
    check(accuracies(readings, scenes), IMAGE_FACTORS + ("direction", "speed"), 0.95,
          f"noisy blurred clips (n={len(scenes)})")


def test_upright_orientation_draws_the_same_scene_with_every_angle_zero():
    for seed in range(5):
        tilted = sample_scene(np.random.default_rng(seed), clip_frames=9)
        upright = sample_scene(np.random.default_rng(seed), clip_frames=9, orientation="upright")
        assert all(o.orientation == 0.0 for o in upright.objects)
        assert any(o.orientation != 0.0 for o in tilted.objects)
        assert [(o.combo, o.size, o.centre) for o in upright.objects] == [(o.combo, o.size, o.centre) for o in tilted.objects]
        assert upright.background == tilted.background and upright.motions == tilted.motions
    with pytest.raises(ValueError, match="orientation"):
        sample_scene(np.random.default_rng(0), orientation="sideways")
