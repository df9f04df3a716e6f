"""Re-score a shapes_subject results folder from its saved sample grids with the current oracle metrics.

    python benchmarks/rescore_subject.py <results folder>

The grids are the exact uint8 samples the suite scored (lossless PNG, one row per prompt, one column
per sample), so every metric but drift (which needs concept-free samples, not saved) is recomputed
from them. The script first checks that the fidelity / leakage metrics it recomputes equal the recorded
ones, then rewrites results.json and report.md with the metrics the current code defines (session 8:
diversity over the object that carries the concept, undefined under 2 samples), keeping drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from conceptkit.bench.suites import (TRAIN_BACKGROUNDS, concept_name, score_subject, subject_prompts,
                                     write_suite_results)
from conceptkit.world.factors import HELDOUT_COMBOS


def main(folder: Path) -> None:
    results = json.loads((folder / "results.json").read_text())
    combos = {concept_name(c): tuple(c) for c in HELDOUT_COMBOS}
    train = {b for b, _ in TRAIN_BACKGROUNDS}
    columns = results["settings"]["samples_per_prompt"]
    wanted = [b for _, b in subject_prompts("x") for _ in range(columns)]
    for record in results["records"]:
        canvas = np.asarray(Image.open(folder / record["grid"]).convert("RGB"))
        size = canvas.shape[1] // columns
        tiles = [canvas[r * size:(r + 1) * size, c * size:(c + 1) * size]
                 for r in range(canvas.shape[0] // size) for c in range(columns)]
        scores = score_subject(tiles, wanted, combos[record["concept"]], train)
        for key in ("concept_fidelity", "shape_fidelity", "colour_fidelity", "pattern_fidelity", "prompt_fidelity",
                    "leakage"):
            if abs(scores[key] - record[key]) > 1e-3:
                raise SystemExit(f"{record['method']}/{record['concept']}: {key} {scores[key]} from the grid, "
                                 f"{record[key]} recorded: the grid is not what was scored")
        record["diversity"] = None if scores["diversity"] is None else round(scores["diversity"], 4)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cfg = OmegaConf.create(results["settings"])
    write_suite_results(folder, "shapes_subject", cfg, results["records"], results["notes"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
