"""Captions for ShapeWorld scenes: a small grammar with several phrasings, deterministic for an rng.

Every caption names each object's size, colour, shape and (unless plain, which is said only
sometimes) its pattern by the factor's own word, the background colour, the background pattern
when it is not plain ("gradient", "noisy"/"grainy"), spatial relations for still scenes, and for
clips each object's motion ("moving left slowly", "spinning", "bouncing").
"""

from __future__ import annotations

import numpy as np

from conceptkit.world.factors import Background, Motion, ObjectSpec, Scene

SPEED_ADVERBS = {"slow": ("slowly",), "fast": ("fast", "quickly")}
NOISE_WORDS = ("noisy", "grainy")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_object(obj: ObjectSpec, with_size: bool = False) -> str:
    """Canonical name of an object, e.g. "red striped star" ("large red star" with size, plain)."""
    words = [obj.size] if with_size else []
    words += [obj.colour] + ([] if obj.pattern == "plain" else [obj.pattern]) + [obj.shape]
    return " ".join(words)


def _object_phrase(obj: ObjectSpec, rng: np.random.Generator) -> str:
    say_plain = obj.pattern != "plain" or rng.random() < 0.5
    if rng.random() < 0.6:  # "a large red striped star"
        pattern = [obj.pattern] if say_plain else []
        return _with_article(" ".join([obj.size, obj.colour, *pattern, obj.shape]))
    if obj.pattern == "plain":  # "a large star in plain red" / "a large star in red"
        return f"{_with_article(obj.size)} {obj.shape} in {'plain ' if say_plain else ''}{obj.colour}"
    return f"{_with_article(obj.size)} {obj.shape} in {obj.colour} with a {obj.pattern} pattern"


def _background_phrase(background: Background, rng: np.random.Generator) -> str:
    colour = background.colour
    if background.pattern == "gradient":
        return _pick(rng, (f"on a {colour} gradient background", f"against a {colour} backdrop with a soft gradient"))
    if background.pattern == "noise":
        return f"{_pick(rng, ('on', 'against'))} a {_pick(rng, NOISE_WORDS)} {colour} background"
    return _pick(rng, (f"on a {colour} background", f"on a plain {colour} background",
                       f"against a {colour} backdrop"))


def background_phrase(background: Background, rng: np.random.Generator) -> str:
    """One phrasing of the background ("on a plain teal background", "against a grainy sand background")."""
    return _background_phrase(background, rng)


def relation(first: ObjectSpec, second: ObjectSpec) -> str:
    """Where `first` is relative to `second` along the axis that separates them most."""
    dx = first.centre[0] - second.centre[0]
    dy = first.centre[1] - second.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _motion_phrase(motion: Motion, rng: np.random.Generator) -> str:
    spinning = motion.rotation == "spin"
    if motion.direction == "none":
        return "spinning in place" if spinning else _pick(rng, ("standing still", "staying still"))
    phrase = f"moving {motion.direction} {_pick(rng, SPEED_ADVERBS[motion.speed])}"
    extras = (["spinning"] if spinning else []) + (["bouncing off the edges"] if motion.bounce else [])
    return _join([phrase, *extras])  # "moving left slowly, spinning and bouncing off the edges"


def motion_phrase(motion: Motion, rng: np.random.Generator) -> str:
    """How a clip caption says an object's motion ("moving left slowly, spinning")."""
    return _motion_phrase(motion, rng)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _still_caption(scene: Scene, rng: np.random.Generator) -> str:
    objects = scene.objects
    background = _background_phrase(scene.background, rng)
    if len(objects) == 2 and rng.random() < 0.7:
        first, second = (objects[0], objects[1]) if rng.random() < 0.5 else (objects[1], objects[0])
        body = f"{_object_phrase(first, rng)} {relation(first, second)} {_object_phrase(second, rng)}"
    elif len(objects) == 3 and rng.random() < 0.5:
        ordered = sorted(objects, key=lambda o: o.centre[0])
        body = "from left to right, " + _join([_object_phrase(o, rng) for o in ordered])
        return f"{body}, {background}"
    else:
        body = _join([_object_phrase(o, rng) for o in objects])
    if rng.random() < 0.25:
        return f"{_pick(rng, ('a picture of', 'an image of'))} {body} {background}"
    return f"{body} {background}"


def _clip_caption(scene: Scene, rng: np.random.Generator) -> str:
    parts = [f"{_object_phrase(o, rng)} {_motion_phrase(m, rng)}" for o, m in zip(scene.objects, scene.motions)]
    # Semicolons keep each object's motion with it: motion phrases have commas and "and"s of their own.
    body = "; ".join(parts)
    return f"{_pick(rng, ('', 'a clip of ', 'a video of '))}{body}, {_background_phrase(scene.background, rng)}"


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of the scene (of the clip, when the scene has motions)."""
    if scene.motions is not None:
        return _clip_caption(scene, rng)
    return _still_caption(scene, rng)


def _alternatives(words) -> str:
    return "(" + "|".join(sorted(words, key=len, reverse=True)) + ")"


def read_caption(text: str) -> dict:
    """What a caption in the world's grammar says, the inverse of `caption_scene` (a captioner's answers
    are scored with it): {"objects": [(size, colour, pattern, shape), ...] in the order named,
    "background": (colour, pattern) or None, "motions": [direction or "none", ...] for clip captions
    (one per object part, None where a part names no motion)}. Words outside the grammar are ignored;
    an unsaid pattern reads "plain", as the grammar says plain only sometimes."""
    import re

    from conceptkit.world.factors import BACKGROUND_COLOURS, COLOURS, PATTERNS, SHAPES, SIZES

    size, colour, shape = _alternatives(SIZES), _alternatives(COLOURS), _alternatives(SHAPES)
    pattern = _alternatives(PATTERNS)
    named = re.compile(rf"\b{size} {colour} (?:{pattern} )?{shape}\b")  # "large red striped star"
    worded = re.compile(rf"\b{size} {shape} in (?:plain )?{colour}(?: with an? {pattern} pattern)?")  # "large star in red ..."
    text = " ".join(str(text).lower().split())
    found = []
    for match in named.finditer(text):
        found.append((match.start(), (match.group(1), match.group(2), match.group(3) or "plain", match.group(4))))
    for match in worded.finditer(text):
        found.append((match.start(), (match.group(1), match.group(3), match.group(4) or "plain", match.group(2))))
    objects = [obj for _, obj in sorted(found)]
    background = None
    backdrop = re.search(rf"\b(?:on|against) an? (?:(plain|noisy|grainy) )?{_alternatives(BACKGROUND_COLOURS)} "
                         r"(gradient )?(?:background|backdrop)( with a soft gradient)?", text)
    if backdrop:
        word, bg_colour, gradient, soft = backdrop.groups()
        bg_pattern = "gradient" if gradient or soft else "noise" if word in NOISE_WORDS else "plain"
        background = (bg_colour, bg_pattern)
    motions = None
    if ";" in text or re.search(r"\b(moving|standing still|staying still|spinning in place)\b", text):
        motions = []
        for part in text.split(";"):
            moving = re.search(r"\bmoving (left|right|up|down)\b", part)
            still = re.search(r"\b(standing still|staying still|spinning in place)\b", part)
            motions.append(moving.group(1) if moving else "none" if still else None)
    return {"objects": objects, "background": background, "motions": motions}
