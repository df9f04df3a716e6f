"""ShapeWorld: a procedural ground-truth world of simple shapes.

Scenes are sampled from a fixed vocabulary (factors), rendered to images or clips (render),
described in words (captions) and read back from pixels (oracle), so that a generated image can be
scored factor by factor. Some (shape, colour, pattern) combinations are held out of pretraining to
serve as personalization concepts.

    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    image = render_scene(scene)                      # (64, 64, 3) uint8
    caption = caption_scene(scene, rng)              # "a large red striped star on a sky background"
    hits = score_reading(read_image(image), scene)   # {"shape": [True], ...}
"""

from conceptkit.world.captions import caption_scene, describe_object
from conceptkit.world.factors import (BACKGROUND_COLOURS, BACKGROUND_PATTERNS, COLOURS, DIRECTIONS,
                                      HELDOUT_COMBOS, PATTERNS, SHAPES, SIZES, SPEEDS, Background, Motion,
                                      ObjectSpec, Scene, is_heldout, sample_scene)
from conceptkit.world.oracle import (ClipReading, MotionReading, ObjectReading, SceneReading, match_objects,
                                     read_clip, read_image, score_reading)
from conceptkit.world.render import render_clip, render_scene

__all__ = [
    "BACKGROUND_COLOURS", "BACKGROUND_PATTERNS", "COLOURS", "DIRECTIONS", "HELDOUT_COMBOS", "PATTERNS",
    "SHAPES", "SIZES", "SPEEDS", "Background", "ClipReading", "Motion", "MotionReading", "ObjectReading",
    "ObjectSpec", "Scene", "SceneReading", "caption_scene", "describe_object", "is_heldout", "match_objects",
    "read_clip", "read_image", "render_clip", "render_scene", "sample_scene", "score_reading",
]
