"""Read ShapeWorld factors back from pixels, analytically (no training).

The oracle scores images that small diffusion models generate, so every decision is a nearest
neighbour among known values (palette colours, shape profiles, size classes), never an equality.

Pipeline for an image:
1. Background: fit an affine colour model (per channel a + b x + c y) to the border ring, which the
   sampler keeps free of objects. Its value at the centre names the colour; its slope tells a
   gradient; grain that is identical in all channels tells the noise pattern.
2. Foreground: pixels whose lightly smoothed colour is far from the background model, split into
   4-connected components (label propagation in numpy).
3. Per component: colour = the palette pair (object colour, pattern colour) whose colour segment
   most pixels lie close to; each pixel unmixed into coverage of object colour, pattern colour and
   background (anti-aliasing and blur mix linearly); shape and size by matching the radial profile
   of coverage around its centroid against every shape's profile at every rotation; pattern from
   the pattern-colour share (how much) and its structure tensor (stripes: one direction).
Clips: the first frame is read in full, then every object is tracked by its centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from conceptkit.world.factors import (BACKGROUND_COLOURS, COLOURS, PATTERN_COLOURS, SHAPES, SIZE_FRACTION,
                                      SIZES, Scene, shape_outline)
from conceptkit.world.render import polygon_mask

REFERENCE = 64  # pixel thresholds below are for this resolution and scale with the image
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background model that counts as object
PURE_DISTANCE = 40.0  # a pixel this close to a colour segment counts as that object's colour
MIN_AREA = 15  # px at 64: smaller components are noise (the smallest object covers ~75 px)
PROFILE_ANGLES = 72  # radial-profile bins: 5 degrees
TEMPLATE_BLURS = (0.0, 0.7, 1.4)  # px at 64: the blurs shape templates are made for
PLAIN_MAX_FRACTION = 0.09  # mean pattern-colour fraction below which an object is plain
DOTTED_MAX_FRACTION = 0.39  # dots cover ~21 %, stripes and checks ~50 %
STRIPED_MIN_COHERENCE = 0.5  # stripes: gradients of the pattern share one direction
GRADIENT_MIN_RISE = 25.0  # grey levels across the image (rendered gradients rise 50)
NOISE_MIN_COVARIANCE = 12.0  # cross-channel covariance of grain (rendered: 144; iid noise: 0)
STILL_MAX_STEP = 0.5  # px per frame at 64: slower than this is "none"
SLOW_MAX_STEP = 1.75  # px per frame at 64: between slow (1) and fast (2.5)


@dataclass
class ObjectReading:
    shape: str
    colour: str
    pattern: str
    size: str
    centre: tuple[float, float]  # normalised (x, y), y downwards, like ObjectSpec.centre
    bbox: tuple[int, int, int, int]  # pixels: x0, y0, x1, y1 (exclusive)
    angle: float  # best-matching orientation in degrees (only defined up to the shape's symmetry)
    shape_error: float  # relative radial-profile mismatch of the chosen shape (0 = perfect)
    pattern_fraction: float  # mean share of pattern colour inside the object
    pattern_coherence: float  # 1 when the pattern varies along one direction only (stripes)


@dataclass
class SceneReading:
    background_colour: str
    background_pattern: str
    objects: list[ObjectReading] = field(default_factory=list)


@dataclass
class MotionReading:
    direction: str  # none / left / right / up / down
    speed: str | None  # slow / fast; None when still
    velocity: tuple[float, float]  # normalised units per frame over the first half of the clip
    track: list[tuple[float, float]]  # normalised centre per frame until the object was lost


@dataclass
class ClipReading:
    background_colour: str
    background_pattern: str
    objects: list[ObjectReading]  # as read in the first frame
    motions: list[MotionReading]  # one per object


# ------------------------------------------------------------------ array helpers


def _shift_stack(mask: np.ndarray, fill) -> np.ndarray:
    """The 4-neighbours of every pixel (4, H, W), padding with `fill`."""
    p = np.pad(mask, 1, constant_values=fill)
    return np.stack([p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])


def erode(mask: np.ndarray) -> np.ndarray:
    return mask & _shift_stack(mask, False).all(0)


def dilate(mask: np.ndarray) -> np.ndarray:
    return mask | _shift_stack(mask, False).any(0)


def box_blur3(image: np.ndarray) -> np.ndarray:
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: labels 1..n (0 = background) and n.

    Every pixel starts with its own index and repeatedly takes the smallest label among itself
    and its neighbours; jumping through the labels (a label is a pixel index) makes it converge
    in a few dozen cheap numpy passes.
    """
    h, w = mask.shape
    sentinel = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        neighbours = _shift_stack(np.where(mask, labels, sentinel), sentinel)
        smallest = np.minimum(labels, neighbours.min(0))
        jumped = smallest.ravel()[np.maximum(smallest, 1) - 1]
        new = np.where(mask, np.minimum(smallest, jumped), 0)
        if np.array_equal(new, labels):
            break
        labels = new
    roots = np.unique(labels[mask])
    relabelled = np.zeros_like(labels)
    relabelled[mask] = np.searchsorted(roots, labels[mask]) + 1
    return relabelled, len(roots)


def _bilinear(values: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample a 2-D array at continuous pixel coordinates (pixel k's centre is k + 0.5); 0 outside."""
    h, w = values.shape
    padded = np.pad(values, 1)
    x, y = np.clip(x - 0.5 + 1, 0, w + 0.999), np.clip(y - 0.5 + 1, 0, h + 0.999)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, w + 1), np.minimum(y0 + 1, h + 1)
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def radial_profile(alpha: np.ndarray, centre: tuple[float, float], reach: float) -> np.ndarray:
    """Coverage integrated along PROFILE_ANGLES rays from `centre` (pixels), rays CCW on screen.

    An integral rather than the first edge crossing: it is unbiased under blur and needs no
    threshold.
    """
    step = 0.25
    theta = np.arange(PROFILE_ANGLES) * (2 * np.pi / PROFILE_ANGLES)
    s = np.arange(step / 2, reach, step)
    x = centre[0] + np.cos(theta)[:, None] * s[None, :]
    y = centre[1] - np.sin(theta)[:, None] * s[None, :]
    return _bilinear(alpha, x, y).sum(1) * step


def gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding)."""
    if sigma <= 0:
        return values
    offsets = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.apply_along_axis(np.convolve, 1, values, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="same")


@lru_cache(maxsize=8)
def shape_templates(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Radial profiles of every shape as rendered at this resolution, per unit size.

    One profile per (shape, size class, blur), rendered like the renderer does (supersampled,
    box-filtered) and then blurred: blur fills a small cross's inner corners and rounds a small
    star's tips, so a sharp template would call them a square and a circle. Returns profiles
    (T, rotations, angles), every rotation of each, and the shape index of each template.
    """
    supersample, canvas = 4, resolution
    profiles, shapes = [], []
    for index, shape in enumerate(SHAPES):
        for size in SIZES:
            pixels = SIZE_FRACTION[size] * resolution
            outline = (shape_outline(shape) * pixels + canvas / 2) * supersample
            big = polygon_mask(outline, canvas * supersample, canvas * supersample).astype(float)
            alpha = big.reshape(canvas, supersample, canvas, supersample).mean((1, 3))
            for blur in TEMPLATE_BLURS:
                blurred = gaussian_blur(alpha, blur * resolution / REFERENCE)
                profile = radial_profile(blurred, (canvas / 2, canvas / 2), canvas / 2) / pixels
                profiles.append(np.stack([np.roll(profile, k) for k in range(PROFILE_ANGLES)]))
                shapes.append(index)
    return np.stack(profiles), np.array(shapes)


# ------------------------------------------------------------------ background


@dataclass
class _BackgroundModel:
    colour: str
    pattern: str
    image: np.ndarray  # (H, W, 3) float model of the background at every pixel


def _border_ring(h: int, w: int, width: int) -> np.ndarray:
    ring = np.zeros((h, w), bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    return ring


def _read_background(image: np.ndarray) -> _BackgroundModel:
    h, w = image.shape[:2]
    ring = _border_ring(h, w, max(1, round(2 * h / REFERENCE)))
    ys, xs = np.nonzero(ring)
    design = np.stack([np.ones_like(xs), xs / w - 0.5, ys / h - 0.5], 1).astype(float)
    pixels = image[ring].astype(float)
    keep = np.ones(len(pixels), bool)
    for _ in range(2):  # refit without outliers (a blurred object edge touching the border)
        coef = np.linalg.lstsq(design[keep], pixels[keep], rcond=None)[0]
        error = np.linalg.norm(pixels - design @ coef, axis=1)
        keep = error <= max(3 * np.median(error), 10.0)
    centre = coef[0]
    colour = min(BACKGROUND_COLOURS, key=lambda n: np.linalg.norm(centre - BACKGROUND_COLOURS[n]))
    rise = float(np.hypot(coef[1].mean(), coef[2].mean()))  # grey levels across the image
    residual = (pixels - design @ coef)[keep]
    r, g, b = residual.T
    grain = float(np.mean(r * g + g * b + r * b) / 3)
    pattern = "gradient" if rise > GRADIENT_MIN_RISE else "noise" if grain > NOISE_MIN_COVARIANCE else "plain"
    gy, gx = np.mgrid[0:h, 0:w]
    model = coef[0] + (gx / w - 0.5)[..., None] * coef[1] + (gy / h - 0.5)[..., None] * coef[2]
    return _BackgroundModel(colour, pattern, model)


def _foreground_components(image: np.ndarray, background: _BackgroundModel) -> tuple[np.ndarray, int]:
    distance = np.linalg.norm(box_blur3(image.astype(float)) - background.image, axis=-1)
    labels, count = label_components(distance > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= MIN_AREA * (image.shape[0] / REFERENCE) ** 2
    keep[0] = False
    remap = np.zeros(count + 1, int)
    remap[keep] = np.arange(1, keep.sum() + 1)
    return remap[labels], int(keep.sum())


# ------------------------------------------------------------------ objects


def _segment_distance(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each pixel colour to the segment start-end, and its position t along it."""
    axis = end - start
    t = np.clip((pixels - start) @ axis / (axis @ axis), 0.0, 1.0)
    return np.linalg.norm(pixels - (start + t[:, None] * axis), axis=1), t


def _read_colour(pixels: np.ndarray) -> str:
    """The colour whose (object colour, pattern colour) segment most pixels lie close to."""
    votes = {}
    for name in COLOURS:
        distance, _ = _segment_distance(pixels, np.array(COLOURS[name], float), np.array(PATTERN_COLOURS[name], float))
        votes[name] = (np.sum(distance < PURE_DISTANCE), -distance.mean())  # ties: closer on average
    return max(votes, key=votes.get)


def _unmix(window: np.ndarray, background: np.ndarray, base: np.ndarray, second: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, least-squares coverage of object colour `a` and pattern colour `b` over the background.

    pixel = bg + a (base - bg) + b (second - bg); the palette keeps the three colours far from
    collinear, so this 2x2 system is well conditioned. Returns coverage a + b and the pattern share
    b / (a + b), both unclipped so that noise averages out.
    """
    u, v, y = base - background, second - background, window - background
    uu, vv, uv = (u * u).sum(-1), (v * v).sum(-1), (u * v).sum(-1)
    uy, vy = (u * y).sum(-1), (v * y).sum(-1)
    det = np.maximum(uu * vv - uv * uv, 1e-6)
    a = (vv * uy - uv * vy) / det
    b = (uu * vy - uv * uy) / det
    coverage = a + b
    return coverage, b / np.where(np.abs(coverage) < 1e-3, 1e-3, coverage)


def _read_pattern(share: np.ndarray, interior: np.ndarray) -> tuple[str, float, float]:
    """Pattern from the pattern-colour share of the interior pixels: (name, fraction, coherence)."""
    if interior.sum() < 3:
        return "plain", 0.0, 0.0
    fraction = float(share[interior].mean())
    # Structure tensor of the share: stripes have all gradients along one direction, dots and
    # checks have them in every direction.
    t = np.clip(share, 0, 1)
    gx = t[1:-1, 2:] - t[1:-1, :-2]
    gy = t[2:, 1:-1] - t[:-2, 1:-1]
    valid = interior[1:-1, 2:] & interior[1:-1, :-2] & interior[2:, 1:-1] & interior[:-2, 1:-1]
    gx, gy = gx[valid], gy[valid]
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    coherence = math.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / max(jxx + jyy, 1e-9)
    if fraction < PLAIN_MAX_FRACTION:
        return "plain", fraction, coherence
    if coherence > STRIPED_MIN_COHERENCE:
        return "striped", fraction, coherence
    return ("dotted" if fraction < DOTTED_MAX_FRACTION else "checkered"), fraction, coherence


def _match_shape(alpha: np.ndarray, centre: tuple[float, float], resolution: int
                 ) -> tuple[int, int, float, float]:
    """Best (shape index, rotation bin, relative error, size in pixels)."""
    profile = radial_profile(alpha, centre, reach=0.6 * max(alpha.shape))
    templates, shapes = shape_templates(resolution)  # (T, K, K), (T,)
    dots = templates @ profile  # (T, K)
    norms = (templates[:, 0] ** 2).sum(-1)  # a rotation keeps the norm
    errors = 1.0 - dots ** 2 / (norms[:, None] * max(profile @ profile, 1e-9))
    t, k = np.unravel_index(np.argmin(errors), errors.shape)
    return int(shapes[t]), int(k), float(errors[t, k]), float(dots[t, k] / norms[t])


def _read_object(image: np.ndarray, component: np.ndarray, background: np.ndarray) -> ObjectReading:
    h, w = component.shape
    ys, xs = np.nonzero(component)
    pad = 2
    y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
    x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    window = image[y0:y1, x0:x1].astype(float)
    mask = component[y0:y1, x0:x1]
    inner = erode(mask)
    colour = _read_colour(window[inner if inner.sum() >= 5 else mask])
    base, second = np.array(COLOURS[colour], float), np.array(PATTERN_COLOURS[colour], float)
    coverage, share = _unmix(window, background[y0:y1, x0:x1], base, second)

    alpha = np.where(dilate(mask), np.clip(coverage, 0, 1), 0.0)
    # Pattern share from pixels at least half covered: unmixing keeps it right on anti-aliased
    # edges, but below half coverage it divides by too little and mostly carries noise.
    interior = alpha > 0.5
    pattern, fraction, coherence = _read_pattern(share, interior)

    gy, gx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    total = max(alpha.sum(), 1e-9)
    centre = ((alpha * (gx + 0.5)).sum() / total, (alpha * (gy + 0.5)).sum() / total)
    s, k, error, scale = _match_shape(alpha, centre, h)
    threshold = math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]) * h
    return ObjectReading(
        shape=SHAPES[s], colour=colour, pattern=pattern, size=SIZES[int(scale > threshold)],
        centre=((x0 + centre[0]) / w, (y0 + centre[1]) / h),
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        angle=k * 360.0 / PROFILE_ANGLES, shape_error=error, pattern_fraction=fraction,
        pattern_coherence=coherence)


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape}")
    return image


def _read_objects(image: np.ndarray, background: _BackgroundModel) -> list[ObjectReading]:
    labels, count = _foreground_components(image, background)
    objects = [_read_object(image, labels == i, background.image) for i in range(1, count + 1)]
    return sorted(objects, key=lambda o: o.centre)  # left to right


def foreground_segments(image: np.ndarray) -> list[np.ndarray]:
    """The image's object masks as the oracle separates them from the background ((H, W) bool each,
    left to right): the ShapeWorld segmenter of compositional guidance."""
    image = _as_rgb(image)
    labels, count = _foreground_components(image, _read_background(image))
    masks = [labels == i for i in range(1, count + 1)]
    return sorted(masks, key=lambda m: float(np.nonzero(m)[1].mean()))


def read_image(image: np.ndarray) -> SceneReading:
    """Background and objects (left to right) of an (H, W, 3) uint8 image."""
    image = _as_rgb(image)
    background = _read_background(image)
    return SceneReading(background.colour, background.pattern, _read_objects(image, background))


# ------------------------------------------------------------------ clips


def _component_centres(image: np.ndarray, background: _BackgroundModel) -> list[tuple[float, float]]:
    """Normalised centroids of the foreground components of one frame."""
    labels, count = _foreground_components(image, background)
    h, w = labels.shape
    gy, gx = np.mgrid[0:h, 0:w]
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    sx = np.bincount(labels.ravel(), weights=(gx + 0.5).ravel(), minlength=count + 1)[1:]
    sy = np.bincount(labels.ravel(), weights=(gy + 0.5).ravel(), minlength=count + 1)[1:]
    return [(float(x / a / w), float(y / a / h)) for x, y, a in zip(sx, sy, area)]


def _greedy_pairs(first: list[tuple[float, float]], second: list[tuple[float, float]], max_distance: float
                  ) -> list[tuple[int, int]]:
    """Index pairs (i, j), closest first, each index used once, none farther than max_distance."""
    candidates = sorted((math.dist(a, b), i, j) for i, a in enumerate(first) for j, b in enumerate(second))
    used_i, used_j, pairs = set(), set(), []
    for distance, i, j in candidates:
        if distance <= max_distance and i not in used_i and j not in used_j:
            pairs.append((i, j))
            used_i.add(i)
            used_j.add(j)
    return pairs


def _motion_from_track(track: list[tuple[float, float]], frames: int) -> MotionReading:
    # Only the first half of the clip: a bouncing object reverses in the second half at the earliest.
    steps = min(frames // 2, len(track) - 1)
    if steps < 1:
        return MotionReading("none", None, (0.0, 0.0), track)
    vx = (track[steps][0] - track[0][0]) / steps
    vy = (track[steps][1] - track[0][1]) / steps
    fastest = max(abs(vx), abs(vy)) * REFERENCE  # px per frame at the reference resolution
    if fastest < STILL_MAX_STEP:
        return MotionReading("none", None, (vx, vy), track)
    if abs(vx) >= abs(vy):
        direction = "right" if vx > 0 else "left"
    else:
        direction = "down" if vy > 0 else "up"
    return MotionReading(direction, "slow" if fastest < SLOW_MAX_STEP else "fast", (vx, vy), track)


def read_clip(frames: np.ndarray, max_step: float = 6 / REFERENCE) -> ClipReading:
    """Objects of the first frame, each tracked by nearest centroid through the (F, H, W, 3) clip."""
    frames = np.asarray(frames)
    background = _read_background(_as_rgb(frames[0]))  # the background does not move
    objects = _read_objects(frames[0], background)
    tracks = [[o.centre] for o in objects]
    alive = list(range(len(tracks)))
    for frame in frames[1:]:
        centres = _component_centres(frame, background)
        pairs = _greedy_pairs([tracks[i][-1] for i in alive], centres, max_step)
        for i, j in pairs:
            tracks[alive[i]].append(centres[j])
        alive = [alive[i] for i, _ in pairs]  # an object lost once stays lost
    motions = [_motion_from_track(track, len(frames)) for track in tracks]
    return ClipReading(background.colour, background.pattern, objects, motions)


# ------------------------------------------------------------------ scoring against ground truth


def match_objects(reading: SceneReading | ClipReading, scene: Scene, max_distance: float = 0.15
                  ) -> list[tuple[int, int]]:
    """(reading index, scene index) pairs, greedily by centre distance (frame 0 for clips)."""
    pairs = _greedy_pairs([o.centre for o in reading.objects], [o.centre for o in scene.objects], max_distance)
    return sorted(pairs, key=lambda pair: pair[1])


def score_reading(reading: SceneReading | ClipReading, scene: Scene) -> dict[str, list[bool]]:
    """Per factor, one hit or miss per ground-truth item; an undetected object misses everything.

    Keys: background_colour, background_pattern, count, shape, colour, pattern, size, and for a clip
    reading of a scene with motions also direction (every object) and speed (moving objects).
    """
    hits: dict[str, list[bool]] = {"background_colour": [reading.background_colour == scene.background.colour],
                                   "background_pattern": [reading.background_pattern == scene.background.pattern],
                                   "count": [len(reading.objects) == len(scene.objects)]}
    found = {j: i for i, j in match_objects(reading, scene)}
    with_motion = isinstance(reading, ClipReading) and scene.motions is not None
    for j, truth in enumerate(scene.objects):
        seen = reading.objects[found[j]] if j in found else None
        for factor in ("shape", "colour", "pattern", "size"):
            hits.setdefault(factor, []).append(seen is not None and getattr(seen, factor) == getattr(truth, factor))
        if with_motion:
            motion = reading.motions[found[j]] if j in found else None
            expected = scene.motions[j]
            hits.setdefault("direction", []).append(motion is not None and motion.direction == expected.direction)
            if expected.direction != "none":
                hits.setdefault("speed", []).append(motion is not None and motion.speed == expected.speed)
    return hits
