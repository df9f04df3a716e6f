"""`conceptkit bench`: speed and memory (speed.py), base quality (quality.py), quality suites (suites.py)."""

from __future__ import annotations

from conceptkit.errors import UserError

SUITES = ("speed", "base_quality", "shapes_subject", "shapes_multi", "shapes_motion", "shapes_visual_prompts",
          "shapes_s2v", "layout")


DEFAULT_SUITE_BACKBONES = {"shapes_motion": "wan21_shapes", "shapes_s2v": "wan21_i2v_shapes"}  # others: sd15_shapes


def run_suite(cfg):
    if cfg.get("suite_backbone") is None:  # shapes_motion composes a clip: it needs the video backbone
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.suite_backbone = DEFAULT_SUITE_BACKBONES.get(cfg.suite, "sd15_shapes")
    if cfg.suite == "speed":
        from conceptkit.bench.speed import run_bench

        return run_bench(cfg)
    if cfg.suite == "base_quality":
        from conceptkit.bench.quality import run_base_quality

        return run_base_quality(cfg)
    if cfg.suite == "shapes_subject":
        from conceptkit.bench.suites import run_subject_suite

        return run_subject_suite(cfg)
    if cfg.suite == "shapes_multi":
        from conceptkit.bench.suites import run_multi_suite

        return run_multi_suite(cfg)
    if cfg.suite == "shapes_motion":
        from conceptkit.bench.motion import run_motion_suite

        return run_motion_suite(cfg)
    if cfg.suite == "shapes_visual_prompts":
        from conceptkit.bench.visual_prompts import run_visual_prompts_suite

        return run_visual_prompts_suite(cfg)
    if cfg.suite == "layout":
        from conceptkit.bench.layout import run_layout_suite

        return run_layout_suite(cfg)
    if cfg.suite == "shapes_s2v":
        from conceptkit.bench.subject_video import run_subject_video_suite

        return run_subject_video_suite(cfg)
    raise UserError(f"unknown suite {cfg.suite!r}: choose one of {', '.join(SUITES)}")
