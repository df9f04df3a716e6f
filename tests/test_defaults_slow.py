"""Every method trains with its full default budget on both tiny backbones (slow: `pytest -m slow`).

Wall-clock times are measured outside tests (see the closing notes / README), never asserted here.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import PAIRS, train_config


@pytest.mark.slow
@pytest.mark.parametrize("method_name,backbone_name", PAIRS)
def test_full_default_training(tmp_path, method_name, backbone_name):
    from conceptkit.training.run import train
    from conftest import make_backbone, make_method

    cfg = train_config(method_name, backbone_name, "trainer.progress_bar=false", f"output={tmp_path / 'c.concept'}")
    folder = train(cfg)
    meta = json.loads((folder / "concept.json").read_text())
    expected = [(s.name, s.steps) for s in make_method(method_name, backbone_name).stages(make_backbone(backbone_name))]
    assert [(s["name"], s["steps"]) for s in meta["training"]["stages"]] == expected
    assert all(s["final_loss"] is not None and math.isfinite(s["final_loss"]) for s in meta["training"]["stages"])
