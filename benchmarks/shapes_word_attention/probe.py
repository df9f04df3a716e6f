"""Where sd15_shapes' words look on shapes_multi's two-object references (held-out pairs, seed 0).

    python benchmarks/shapes_word_attention/probe.py [<backbone folder>]   # default: the shipped release

Prints, for each cross-attention site alone, the share of each shape word's attention on its own
object in the MCPL sentence with the shape words as the objects' names ("a photo of a star and a
circle on a pink background": where an MCPL word starts), then, averaged over every site, the shares
of the shape, colour and pattern words when each object is fully named ("... a large red striped
star and a large blue dotted circle ..."). 0.5 = no preference between the two objects.
"""

import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from hydra.utils import instantiate
from PIL import Image

from conceptkit.bench.suites import multi_cases
from conceptkit.bench.word_attention import own_object_shares
from conceptkit.config import compose


def shares(backbone, cases, name_object, part, sites):
    values = []
    for case in cases:
        sentence = case.sentence
        for word, combo in zip(case.words, case.combos):
            sentence = sentence.replace("{%s}" % word, name_object(combo))
        words = [combo[part] for combo in case.combos]
        if words[0] == words[1]:
            continue
        image = np.asarray(Image.open(case.image).convert("RGB"))
        values += own_object_shares(backbone, image, case.masks, sentence, words, sites)
    return values


def line(label, values):
    return f"{label:55s} {' '.join(f'{v:.2f}' for v in values)}  mean {np.mean(values):.3f}"


def main():
    overrides = ["backbone=sd15_shapes"] + ([f"backbone.path={sys.argv[1]}"] if len(sys.argv) > 1 else [])
    backbone = instantiate(compose("train", overrides).backbone).load()
    sites = [site.name for site in backbone.attention_sites() if site.kind == "cross"]
    with TemporaryDirectory() as folder:
        cases = multi_cases(4, Path(folder), 0, backbone.resolution, "heldout")
        print("shape word as the object's name, per site:")
        for site in sites:
            print(line(site, shares(backbone, cases, lambda c: c[0], 0, [site])))
        print("object fully named, every site:")
        for part, label in enumerate(("shape", "colour", "pattern")):
            print(line(label, shares(backbone, cases, lambda c: f"large {c[1]} {c[2]} {c[0]}", part, sites)))


if __name__ == "__main__":
    main()
