"""BiCo learns a subject from images on sd15_shapes, read back by the oracle (slow: `pytest -m slow`, ~3 min).

The ShapeWorld check of binding itself: the concept is described by the neutral word "object" and trained
without captions, so what the samples show of the held-out red striped star can only come from the binders
(the toy text encoder knows every world word; naming the star would score the base model). At the official
lr (1e-4) the zero-initialised scales stay ~0.02 in the official budget and nothing binds on SD1.5's context
scale (methods/bico/README.md, "ShapeWorld check on sd15_shapes"); lr 3e-3 is the setting measured there.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_bico_binds_a_held_out_subject_on_sd15_shapes(tmp_path):
    from hydra.utils import instantiate

    from conceptkit.artifact import load_concept
    from conceptkit.bench.suites import _to_uint8, write_subject_references
    from conceptkit.config import compose
    from conceptkit.training.run import train
    from conceptkit.world.oracle import read_image

    case = write_subject_references(("star", "red", "striped"), tmp_path / "red_striped_star", seed=0)
    for caption in case.folder.glob("*.txt"):
        caption.unlink()
    folder = train(compose("train", [
        "method=bico", "backbone=sd15_shapes", f"data.images={case.folder}", "name=red_striped_star",
        "method.description=object", "method.lr=0.003",
        # the official mask (binders on the absorbent slot) binds nothing here (0 of 6): see the BiCo card
        "method.binders_on_absorbent=false", "sample.count=0", "trainer.progress_bar=false",
        f"output={tmp_path / 'star.concept'}"]))
    backbone = instantiate(compose("train", ["backbone=sd15_shapes"]).backbone).load()

    def red_stars(prompt: str) -> int:
        images = _to_uint8(backbone.generate([prompt] * 6, seed=0))
        return sum(any((o.shape, o.colour) == ("star", "red") for o in read_image(image).objects) for image in images)

    base = red_stars("a large object on a plain sand background")
    method, _ = load_concept(folder, backbone)
    bound = red_stars(method.prompt("a large {red_striped_star} on a plain sand background"))
    assert bound >= 5 and base <= 1, (bound, base)
