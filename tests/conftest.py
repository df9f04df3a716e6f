"""Shared helpers: tiny backbones, methods and example data built from the real configs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

from conceptkit.registry import method_names  # noqa: E402

METHODS = method_names()  # every method folder joins the conformance table automatically
BACKBONES = ["sd15_tiny", "wan21_tiny"]
PAIRS = [(m, b) for b in BACKBONES for m in METHODS]


def train_config(method: str = "conceptprism", backbone: str = "sd15_tiny", *extra: str):
    from conceptkit.config import compose

    return compose("train", [f"method={method}", f"backbone={backbone}", *extra])


def make_backbone(backbone: str = "sd15_tiny"):
    from hydra.utils import instantiate

    return instantiate(train_config("conceptprism", backbone).backbone).load()


def make_method(method: str, backbone: str = "sd15_tiny", name: str = "thing", *extra: str):
    from hydra.utils import instantiate

    return instantiate(train_config(method, backbone, *extra).method, concept_name=name)


def example_data(backbone_obj, backbone: str = "sd15_tiny", *extra: str):
    from conceptkit.training.run import prepare_data

    return prepare_data(train_config("conceptprism", backbone, *extra), backbone_obj)


def fixed_inputs(backbone, n: int = 2, seed: int = 0):
    """Noisy latents and timesteps of the right shape for this backbone."""
    generator = torch.Generator().manual_seed(seed)
    frames = 1
    latents = backbone.initial_latents(n, backbone.resolution, backbone.resolution, frames, generator)
    timesteps = torch.tensor([100.0, 700.0][:n])
    if backbone.family == "sd15":
        timesteps = timesteps.long()
    return latents, timesteps


def predict(backbone, prompts, seed: int = 0) -> torch.Tensor:
    latents, timesteps = fixed_inputs(backbone, len(prompts), seed)
    with torch.no_grad():
        context, _ = backbone.encode_text(prompts)
        return backbone.denoise(latents, timesteps, context)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    yield
