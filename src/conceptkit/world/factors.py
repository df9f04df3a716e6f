"""ShapeWorld vocabulary, scene description and scene sampling.

Everything geometric is in normalised image units (the image is the unit square, x to the right,
y downwards) so that one scene renders at any resolution; pixel figures in comments are for the
default 64 px. Sizes, gaps and speeds were tuned at 64 px so the oracle reads every factor back.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

RGB = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")

# Object colours, and for each the second colour its patterns are drawn in. The RGB values were
# chosen by a small search so that (a) object colours are >= 100 apart, (b) every object colour is
# >= 65 away from the base-to-pattern segment of every other colour (so blurred stripe edges are not
# mistaken for another colour), (c) every object or pattern colour is >= 84 away from every
# background colour (so segmentation by colour distance is easy). Pattern colours may repeat
# (white and black share grey): they are never read on their own, only as part of a pair.
COLOURS: dict[str, RGB] = {
    "red": (210, 30, 30), "green": (30, 190, 50), "blue": (30, 65, 225), "yellow": (250, 225, 40),
    "purple": (135, 40, 190), "orange": (245, 125, 25), "white": (245, 245, 245), "black": (15, 15, 15),
}
PATTERN_COLOURS: dict[str, RGB] = {
    "red": (110, 20, 35), "green": (10, 105, 15), "blue": (170, 130, 255), "yellow": (120, 90, 10),
    "purple": (195, 140, 250), "orange": (115, 50, 5), "white": (135, 135, 135), "black": (135, 135, 135),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 14 / 64, "large": 24 / 64}  # extent of the shape's unit box, ~14 / 24 px
REGIONS = ("left", "center", "right")

BACKGROUND_COLOURS: dict[str, RGB] = {
    "sky": (120, 215, 240), "sand": (220, 200, 140), "grass": (120, 175, 55),
    "navy": (20, 45, 110), "pink": (255, 170, 200), "teal": (20, 140, 145),
}
BACKGROUND_PATTERNS = ("plain", "gradient", "noise")

DIRECTIONS = ("none", "left", "right", "up", "down")
DIRECTION_VECTORS = {"none": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = ("slow", "fast")
SPEED_FRACTION = {"slow": 1.0 / 64, "fast": 2.5 / 64}  # per frame: 1 px and 2.5 px at 64 px
ROTATIONS = ("none", "spin")
SPIN_DEGREES_PER_FRAME = 20.0

# Personalization concepts: these (shape, colour, pattern) triples never occur in pretraining data,
# while every single value does. Together they cover all shapes, colours and patterns.
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("star", "red", "striped"), ("circle", "blue", "dotted"), ("heart", "green", "checkered"),
    ("square", "yellow", "striped"), ("triangle", "purple", "dotted"), ("cross", "orange", "checkered"),
    ("heart", "white", "plain"), ("triangle", "black", "striped"),
)



def seen_neighbour(combo: tuple[str, str, str]) -> tuple[str, str, str]:
    """A held-out triple's nearest pretraining object: the same shape and colour, the next pattern
    (in PATTERNS order) whose triple pretraining shows. The suites' `objects=seen` cases use these, to
    tell what a method cannot learn from what the base model cannot draw (a held-out triple is a new
    combination; its neighbour is one the base model was trained to draw when named)."""
    shape, colour, pattern = combo
    start = PATTERNS.index(pattern)
    for step in range(1, len(PATTERNS)):
        candidate = (shape, colour, PATTERNS[(start + step) % len(PATTERNS)])
        if candidate not in HELDOUT_COMBOS:
            return candidate
    raise ValueError(f"{combo}: every pattern of this shape and colour is held out")


BORDER = 2 / 64  # free margin between any object and the image edge (the oracle reads the border)
GAP = 4 / 64  # free space between two objects, so blur and noise never merge them
SPLITS = ("pretrain", "heldout", "all")
# "random": any angle in [0, 360); "upright": every object at angle 0 (a clip's spin still turns it).
# The toy backbones pretrain on upright objects: captions never name the angle, so with random
# angles the denoiser's best guess at high noise is the same rotation-averaged disc for every shape
# word (measured on sd15_shapes release 2: at t = 800 its one-step prediction read as a circle for 34
# of 36 (shape, word) pairs; model card).
ORIENTATIONS = ("random", "upright")
TOY_ORIENTATION = "upright"  # the shipped toy backbones' corpus (conf/pretrain.yaml); the suites' references too
ALLOWED_KEYS = ("shape", "colour", "pattern", "size", "background_colour", "background_pattern",
                "direction", "speed", "rotation")


@lru_cache(maxsize=None)
def shape_outline(shape: str) -> np.ndarray:
    """Polygon (N, 2) of a shape at size 1 and angle 0, centred on its area centroid.

    Centring on the centroid means rotation (spin) does not make the centroid wobble, so the
    oracle's centroid track measures motion only.
    """
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        points = 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        points = 0.42 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    elif shape == "triangle":  # equilateral, apex up
        t = np.radians([-90, 30, 150])
        points = 0.55 * np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":  # five points, fat enough that its arms survive 14 px
        t = np.radians(np.arange(10) * 36 - 90)
        radius = np.where(np.arange(10) % 2 == 0, 0.55, 0.28)
        points = radius[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "cross":  # plus sign
        a, w = 0.5, 0.18
        points = np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                           [-w, w], [-a, w], [-a, -w], [-w, -w]], float)
    elif shape == "heart":  # classic parametric heart, point down
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        points = np.stack([x, y], 1) / 33.0
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return points - _polygon_centroid(points)


def _polygon_centroid(points: np.ndarray) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    return np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6 * area)


def shape_radius(shape: str) -> float:
    """Radius of the circle around the centroid that holds the shape at any angle, at size 1."""
    return float(np.linalg.norm(shape_outline(shape), axis=1).max())


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    pattern: str
    size: str
    centre: tuple[float, float]  # (x, y) in [0, 1]^2, y downwards; the rotation centre
    orientation: float = 0.0  # degrees, counter-clockwise on screen

    @property
    def region(self) -> str:
        return REGIONS[min(2, int(self.centre[0] * 3))]

    @property
    def radius(self) -> float:
        """Bounding-circle radius in image units."""
        return shape_radius(self.shape) * SIZE_FRACTION[self.size]

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.pattern)

    def to_dict(self) -> dict:
        return {**asdict(self), "centre": list(self.centre), "region": self.region}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ObjectSpec":
        return cls(data["shape"], data["colour"], data["pattern"], data["size"],
                   (float(data["centre"][0]), float(data["centre"][1])), float(data.get("orientation", 0.0)))


@dataclass(frozen=True)
class Background:
    colour: str
    pattern: str = "plain"
    angle: float = 0.0  # gradient direction in degrees (dark towards light)
    seed: int = 0  # grain of the noise pattern

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Background":
        return cls(data["colour"], data.get("pattern", "plain"), float(data.get("angle", 0.0)),
                   int(data.get("seed", 0)))


@dataclass(frozen=True)
class Motion:
    direction: str = "none"
    speed: str = "slow"  # ignored when direction is "none"
    rotation: str = "none"
    bounce: bool = False  # reflect off the image edges instead of leaving the frame

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Motion":
        return cls(data.get("direction", "none"), data.get("speed", "slow"), data.get("rotation", "none"),
                   bool(data.get("bounce", False)))


@dataclass(frozen=True)
class Scene:
    objects: list[ObjectSpec]
    background: Background
    motions: list[Motion] | None = None  # one per object for clips; None for still images

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background.to_dict(),
                "motions": None if self.motions is None else [m.to_dict() for m in self.motions]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Scene":
        motions = data.get("motions")
        return cls([ObjectSpec.from_dict(o) for o in data["objects"]], Background.from_dict(data["background"]),
                   None if motions is None else [Motion.from_dict(m) for m in motions])


def is_heldout(obj: ObjectSpec) -> bool:
    return obj.combo in HELDOUT_COMBOS


def _wall_bounds(obj: ObjectSpec) -> tuple[float, float]:
    low = obj.radius + BORDER
    return low, 1.0 - low


def _reflect(x: float, low: float, high: float) -> float:
    span = high - low
    y = (x - low) % (2 * span)
    return low + (y if y <= span else 2 * span - y)


def pose_at(obj: ObjectSpec, motion: Motion | None, frame: int) -> tuple[tuple[float, float], float]:
    """Centre and orientation of an object at a frame of its clip (frame 0 is the scene itself)."""
    if motion is None:
        return obj.centre, obj.orientation
    dx, dy = DIRECTION_VECTORS[motion.direction]
    step = SPEED_FRACTION[motion.speed] * frame
    x, y = obj.centre[0] + dx * step, obj.centre[1] + dy * step
    if motion.bounce:
        low, high = _wall_bounds(obj)
        x, y = _reflect(x, low, high), _reflect(y, low, high)
    spin = SPIN_DEGREES_PER_FRAME * frame if motion.rotation == "spin" else 0.0
    return (x, y), (obj.orientation + spin) % 360.0


# ---------------------------------------------------------------- sampling


def factor_combos(split: str = "pretrain", allowed: Mapping[str, Sequence[str]] | None = None
                  ) -> list[tuple[str, str, str]]:
    """(shape, colour, pattern) triples a split may draw, restricted by `allowed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    allowed = allowed or {}
    combos = [c for c in itertools.product(SHAPES, COLOURS, PATTERNS)
              if all(value in allowed.get(key, (value,)) for key, value in zip(("shape", "colour", "pattern"), c))]
    if split == "pretrain":
        combos = [c for c in combos if c not in HELDOUT_COMBOS]
    elif split == "heldout":
        combos = [c for c in combos if c in HELDOUT_COMBOS]
    if not combos:
        raise ValueError(f"no (shape, colour, pattern) combination is allowed in split {split!r}")
    return combos


def _choose(rng: np.random.Generator, key: str, values: Sequence[str], allowed: Mapping) -> str:
    options = [v for v in values if v in allowed.get(key, values)]
    if not options:
        raise ValueError(f"allowed[{key!r}] leaves no value out of {tuple(values)}")
    return options[int(rng.integers(len(options)))]


def _sample_motion(rng: np.random.Generator, allowed: Mapping) -> Motion:
    direction = _choose(rng, "direction", DIRECTIONS, allowed)
    speed = _choose(rng, "speed", SPEEDS, allowed)
    if "rotation" in allowed:
        rotation = _choose(rng, "rotation", ROTATIONS, allowed)
    else:  # spinning is the exception, so that most clips show the shape at a steady angle
        rotation = "spin" if rng.random() < 0.3 else "none"
    bounce = direction != "none" and bool(rng.random() < 0.3)
    if direction == "none":
        speed = "slow"  # canonical: a still object has no speed
    return Motion(direction, speed, rotation, bounce)


def _start_coordinate(low: float, high: float, sign: int, motion: Motion | None, frames: int,
                      rng: np.random.Generator) -> float | None:
    """Start along one axis that keeps the object in [low, high] for the clip; None if impossible.

    A bouncing object starts so that it reaches the wall in the second half of the clip: the first
    half then shows the stated direction unambiguously (the oracle reads it there), and the bounce
    is visible.
    """
    if sign == 0 or motion is None:
        return float(rng.uniform(low, high))
    speed = SPEED_FRACTION[motion.speed]
    if motion.bounce:
        distance = min(speed * rng.uniform(frames // 2, frames - 1), high - low)
        return high - distance if sign > 0 else low + distance
    travel = speed * (frames - 1)
    if travel > high - low:
        return None
    return float(rng.uniform(low, high - travel) if sign > 0 else rng.uniform(low + travel, high))


def _place(combos: list[tuple[str, str, str]], sizes: list[str], motions: list[Motion] | None, frames: int,
           rng: np.random.Generator, upright: bool) -> list[ObjectSpec] | None:
    """One placement attempt: objects inside the frame at every frame, or None."""
    objects = []
    for i, ((shape, colour, pattern), size) in enumerate(zip(combos, sizes)):
        low, high = _wall_bounds(ObjectSpec(shape, colour, pattern, size, (0.5, 0.5)))
        motion = motions[i] if motions else None
        dx, dy = DIRECTION_VECTORS[motion.direction] if motion else (0, 0)
        x = _start_coordinate(low, high, dx, motion, frames, rng)
        y = _start_coordinate(low, high, dy, motion, frames, rng)
        if x is None or y is None:
            return None
        angle = float(rng.uniform(0.0, 360.0))  # drawn either way: the same seed places the same scene
        objects.append(ObjectSpec(shape, colour, pattern, size, (x, y), 0.0 if upright else angle))
    return objects


def _trajectories_clear(objects: list[ObjectSpec], motions: list[Motion] | None, frames: int) -> bool:
    for frame in range(frames):
        centres = [pose_at(o, None if motions is None else motions[i], frame)[0] for i, o in enumerate(objects)]
        for i, j in itertools.combinations(range(len(objects)), 2):
            if math.dist(centres[i], centres[j]) < objects[i].radius + objects[j].radius + GAP:
                return False
    return True


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, split: str = "pretrain",
                 allowed: Mapping[str, Sequence[str]] | None = None, clip_frames: int | None = None,
                 orientation: str = "random") -> Scene:
    """Draw a scene of 1-3 non-overlapping objects; `clip_frames` adds a motion per object.

    Deterministic for the state of `rng`. With `clip_frames`, every object stays inside the frame
    and clear of the others over that many frames. `allowed` maps any of ALLOWED_KEYS to the values
    that may be drawn for it. `orientation` is one of ORIENTATIONS; "upright" draws the same scene
    as "random" with every angle set to 0.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; use one of {ORIENTATIONS}")
    allowed = dict(allowed or {})
    unknown = set(allowed) - set(ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"unknown allowed keys {sorted(unknown)}; use {ALLOWED_KEYS}")
    combos = factor_combos(split, allowed)
    count = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= count <= 3:
        raise ValueError("n_objects must be 1, 2 or 3")
    frames = clip_frames or 1
    for _ in range(1000):  # redraw everything when these objects cannot be placed
        drawn = [combos[int(rng.integers(len(combos)))] for _ in range(count)]
        sizes = [_choose(rng, "size", SIZES, allowed) for _ in range(count)]
        motions = [_sample_motion(rng, allowed) for _ in range(count)] if clip_frames else None
        for _ in range(50):
            objects = _place(drawn, sizes, motions, frames, rng, orientation == "upright")
            if objects is None:
                break
            if _trajectories_clear(objects, motions, frames):
                return Scene(objects, _sample_background(rng, allowed), motions)
    raise RuntimeError("could not place the objects; allow fewer or smaller objects, or fewer clip frames")


def _sample_background(rng: np.random.Generator, allowed: Mapping) -> Background:
    colour = _choose(rng, "background_colour", tuple(BACKGROUND_COLOURS), allowed)
    pattern = _choose(rng, "background_pattern", BACKGROUND_PATTERNS, allowed)
    angle = float(rng.uniform(0.0, 360.0)) if pattern == "gradient" else 0.0
    seed = int(rng.integers(2**31)) if pattern == "noise" else 0
    return Background(colour, pattern, angle, seed)
