"""The 36-sample shape grid of the sd15_shapes model card: "a large <colour> <shape> on a plain
<background> background", 6 shapes x 6 colour/background pairs, 25 DPM++ steps, guidance 7.5, seeds
0 / 12 / 24 per batch of 12, read by the oracle. Prints the share of samples with the asked shape,
colour and background, the correct count per shape, and how often each shape was read.

    python benchmarks/shapes_grid/grid.py <diffusers folder of an sd15_shapes pretrain output>
"""

import sys
from collections import Counter

import numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from conceptkit.world.oracle import read_image

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
BACKGROUNDS = ["sand", "sky", "grass", "navy", "pink", "teal"]


def main(path: str) -> None:
    with initialize_config_module("conceptkit.conf", version_base=None):
        cfg = compose("train", overrides=["backbone=sd15_shapes", f"backbone.path={path}"])
    backbone = instantiate(cfg.backbone).load()
    prompts, truth = [], []
    for i, shape in enumerate(SHAPES):
        for j in range(6):
            colour, background = COLOURS[(i + j) % 6], BACKGROUNDS[(2 * i + j) % 6]
            prompts.append(f"a large {colour} {shape} on a plain {background} background")
            truth.append((shape, colour, background))
    hits = Counter()
    per_shape = Counter()
    read_shapes = Counter()
    for start in range(0, len(prompts), 12):
        media = backbone.generate(prompts[start:start + 12], steps=25, guidance=7.5, seed=start, frames=1)
        for sample, (shape, colour, background) in zip(media, truth[start:start + 12]):
            pixels = (sample[:, 0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            reading = read_image(pixels)
            shapes = [o.shape for o in reading.objects]
            read_shapes.update(shapes)
            hits["shape"] += shape in shapes
            per_shape[shape] += shape in shapes
            hits["colour"] += any(o.colour == colour for o in reading.objects)
            hits["background"] += reading.background_colour == background
    print({k: round(hits[k] / len(prompts), 3) for k in ("shape", "colour", "background")}, dict(per_shape))
    print("shapes read:", dict(read_shapes))


if __name__ == "__main__":
    main(sys.argv[1])
