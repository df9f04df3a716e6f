"""Rasterise ShapeWorld scenes and clips to uint8 RGB arrays.

Everything is drawn at SUPERSAMPLE x the target resolution with hard edges and then box-filtered
down (PIL's reduce), which gives exact area anti-aliasing: an edge pixel is the coverage-weighted
mix of the two colours, the model the oracle inverts.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from conceptkit.world.factors import (BACKGROUND_COLOURS, COLOURS, PATTERN_COLOURS, SIZE_FRACTION,
                                      Background, Motion, ObjectSpec, Scene, pose_at, shape_outline)

SUPERSAMPLE = 4
# Pattern geometry in image units (pixels at 64 px), in the object's own rotated frame. The periods
# are >= 5 px so that a slight blur still leaves the structure readable.
STRIPE_PERIOD = 5 / 64  # half of each period is pattern colour
DOT_SPACING = 5 / 64
DOT_RADIUS = 1.3 / 64  # dots cover ~21 % of the object, well apart from stripes' and checks' 50 %
CHECKER_CELL = 3 / 64
GRADIENT_AMPLITUDE = 25.0  # grey levels added at one edge and removed at the opposite one
NOISE_SIGMA = 12.0  # grey-level grain, the same in all channels (monochrome film grain)


def rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (N, 2) points counter-clockwise on screen (y points down)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return np.stack([points[:, 0] * c + points[:, 1] * s, -points[:, 0] * s + points[:, 1] * c], 1)


def polygon_mask(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Hard-edged boolean mask of a polygon given in pixel units (pixel k spans [k, k+1))."""
    image = Image.new("L", (width, height), 0)
    # No half-pixel shift: in these units the pixel centroid of a filled disc is the disc's centre.
    ImageDraw.Draw(image).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(image) > 0


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern colour goes, given object-frame coordinates u, v in image units."""
    if pattern == "plain":
        return np.zeros(np.broadcast(u, v).shape, bool)
    if pattern == "striped":  # a stripe centred on the object's centre
        return (v / STRIPE_PERIOD + 0.25) % 1.0 < 0.5
    if pattern == "dotted":  # square lattice of dots, one on the centre
        du = ((u / DOT_SPACING + 0.5) % 1.0 - 0.5) * DOT_SPACING
        dv = ((v / DOT_SPACING + 0.5) % 1.0 - 0.5) * DOT_SPACING
        return du * du + dv * dv < DOT_RADIUS * DOT_RADIUS
    if pattern == "checkered":
        return (np.floor(u / CHECKER_CELL) + np.floor(v / CHECKER_CELL)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def render_background(background: Background, resolution: int) -> np.ndarray:
    """Float (H, W, 3) background at the supersampled resolution."""
    size = resolution * SUPERSAMPLE
    base = np.array(BACKGROUND_COLOURS[background.colour], np.float32)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    if background.pattern == "gradient":
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        a = math.radians(background.angle)
        ramp = coords[None, :] * math.cos(a) + coords[:, None] * math.sin(a)  # 0.5 at an edge
        image += (2 * GRADIENT_AMPLITUDE * ramp)[..., None]
    elif background.pattern == "noise":
        # One grain value per output pixel, so the box filter keeps it at full strength.
        grain = np.random.default_rng(background.seed).normal(0.0, NOISE_SIGMA, (resolution, resolution))
        image += np.kron(grain, np.ones((SUPERSAMPLE, SUPERSAMPLE))).astype(np.float32)[..., None]
    elif background.pattern != "plain":
        raise ValueError(f"unknown background pattern {background.pattern!r}")
    return np.clip(image, 0, 255)  # palette colours are in range too, so frames need no clipping


def draw_object(canvas: np.ndarray, obj: ObjectSpec, centre: tuple[float, float], angle: float) -> None:
    """Paint one object into a supersampled float canvas, in place (only its bounding window)."""
    size = canvas.shape[0]
    reach = obj.radius + 2 / size
    x0, x1 = max(0, int((centre[0] - reach) * size)), min(size, int(math.ceil((centre[0] + reach) * size)))
    y0, y1 = max(0, int((centre[1] - reach) * size)), min(size, int(math.ceil((centre[1] + reach) * size)))
    if x0 >= x1 or y0 >= y1:
        return  # entirely outside the frame
    outline = rotate(shape_outline(obj.shape) * SIZE_FRACTION[obj.size], angle) + np.asarray(centre)
    inside = polygon_mask(outline * size - [x0, y0], x1 - x0, y1 - y0)
    xs = (np.arange(x0, x1) + 0.5) / size - centre[0]
    ys = (np.arange(y0, y1) + 0.5) / size - centre[1]
    a = math.radians(angle)
    u = xs[None, :] * math.cos(a) - ys[:, None] * math.sin(a)  # inverse of `rotate`
    v = xs[None, :] * math.sin(a) + ys[:, None] * math.cos(a)
    second = pattern_mask(obj.pattern, u, v)
    colours = np.where(second[..., None], np.float32(PATTERN_COLOURS[obj.colour]), np.float32(COLOURS[obj.colour]))
    window = canvas[y0:y1, x0:x1]
    window[inside] = colours[inside]


def _render_frame(scene: Scene, background: np.ndarray, frame: int) -> np.ndarray:
    canvas = background.copy()
    for i, obj in enumerate(scene.objects):
        motion: Motion | None = scene.motions[i] if scene.motions is not None else None
        centre, angle = pose_at(obj, motion, frame)
        draw_object(canvas, obj, centre, angle)
    big = Image.fromarray(np.rint(canvas).astype(np.uint8))
    return np.asarray(big.reduce(SUPERSAMPLE))  # box filter: exact area anti-aliasing


def render_scene(scene: Scene, resolution: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 image of the scene (frame 0 when it has motions)."""
    return _render_frame(scene, render_background(scene.background, resolution), 0)


def object_masks(scene: Scene, resolution: int = 64) -> np.ndarray:
    """(N, H, W) bool: the pixels where each object of the scene shows in frame 0 (an object drawn
    later covers an earlier one), found by rendering each object alone over the empty background."""
    from dataclasses import replace

    background = render_background(scene.background, resolution)
    empty = _render_frame(replace(scene, objects=[], motions=None), background, 0).astype(np.int16)
    alone = []
    for i, obj in enumerate(scene.objects):
        motions = [scene.motions[i]] if scene.motions is not None else None
        frame = _render_frame(replace(scene, objects=[obj], motions=motions), background, 0)
        alone.append(np.abs(frame.astype(np.int16) - empty).sum(-1) > 0)
    masks = np.stack(alone) if alone else np.zeros((0, resolution, resolution), bool)
    for i in range(len(masks)):
        masks[i] &= ~masks[i + 1:].any(0)
    return masks


def render_clip(scene: Scene, frames: int = 9, resolution: int = 64) -> np.ndarray:
    """(F, H, W, 3) uint8 clip; objects follow their Motion (a still scene gives still frames).

    Scenes sampled with `clip_frames=n` stay in frame for n frames; render no more than that.
    """
    background = render_background(scene.background, resolution)  # static, so drawn once
    return np.stack([_render_frame(scene, background, f) for f in range(frames)])
