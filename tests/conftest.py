"""Shared helpers: tiny backbones, methods and example data built from the real configs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers share the cores
    torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*LeafSpec.*")

from conceptkit.registry import method_class, method_names  # noqa: E402

def family_of(backbone: str) -> str:
    """The family of a backbone config name: sd15_tiny -> sd15, wan21_i2v_tiny -> wan21_i2v."""
    return backbone.rsplit("_", 1)[0] if backbone.endswith(("_tiny", "_shapes")) else backbone


METHODS = method_names()  # every method folder joins the conformance table automatically
BACKBONES = ["sd15_tiny", "wan21_tiny", "wan21_i2v_tiny"]
# ... on every tiny backbone of the families it runs on
PAIRS = [(m, b) for b in BACKBONES for m in METHODS if family_of(b) in method_class(m).families]


def train_config(method: str = "conceptprism", backbone: str = "sd15_tiny", *extra: str):
    from conceptkit.config import compose

    return compose("train", [f"method={method}", f"backbone={backbone}", *extra])


def make_backbone(backbone: str = "sd15_tiny"):
    from hydra.utils import instantiate

    return instantiate(train_config("conceptprism", backbone).backbone).load()


def make_method(method: str, backbone: str = "sd15_tiny", name: str = "thing", *extra: str):
    from hydra.utils import instantiate

    return instantiate(train_config(method, backbone, *extra).method, concept_name=name)


def example_data(backbone_obj, backbone: str = "sd15_tiny", *extra: str, method=None):
    """The example images (per-concept methods), or for an encoder method a small ShapeWorld corpus."""
    from conceptkit.training.run import prepare_data

    if method is not None and method.kind == "encoder":
        return prepare_data(train_config(method.name, backbone, "data.corpus.size=16", "data.corpus.workers=0", *extra),
                            backbone_obj, method)
    return prepare_data(train_config("conceptprism", backbone, *extra), backbone_obj)


def held_out_reference(index: int = 0):
    """A held-out ShapeWorld object's reference picture (never in any training corpus)."""
    from conceptkit.corpus import ShapeWorldCorpus

    item = ShapeWorldCorpus(size=8, resolution=64, split="heldout", seed=3, max_objects=1)[index]
    return item.objects[0].reference


def condition(method, backbone, name: str = "thing") -> None:
    """What prompting `{name}` needs: an encoder method is given a reference named `name`."""
    if method.kind == "encoder":
        method.set_references(backbone, {name: held_out_reference()})


def full_batch(method, data, seed: int = 0):
    """Every example image (or the first four corpus items) in one TrainBatch."""
    from conceptkit.method import TrainBatch

    generator = torch.Generator().manual_seed(seed)
    if method.kind == "encoder":
        indices = torch.arange(min(4, data.count))
        return TrainBatch(indices=indices, data=data, generator=generator,
                          items=[data.corpus[int(i)] for i in indices])
    return TrainBatch(indices=torch.arange(data.count), data=data, generator=generator)


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


@pytest.fixture(scope="session")
def tiny_qwen_vl(tmp_path_factory):
    """A folder holding a tiny random Qwen2.5-VL (real classes, conceptkit/backbones/tiny_qwen_vl.py), loadable by path
    exactly like a hub model; built once per session (well under a second once transformers is imported)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the tiny Qwen2.5-VL is built with transformers 5's tokenizer and config API")
    from conceptkit.backbones.tiny_qwen_vl import build_tiny_qwen25_vl

    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("qwen25_vl"))


class GenerateSpy:
    """Records what a VLM's `generate` was given and returned (install with monkeypatch, tests only);
    `answer` (token ids, or a function of the call's input_ids giving them), when set, replaces what
    the model wrote after the prompt."""

    def __init__(self, monkeypatch, network_class, answer=None):
        self.calls: list[dict] = []
        self.answer = answer
        original = network_class.generate

        def generate(network, **inputs):
            if self.answer is None:
                output = original(network, **inputs)
            else:  # as generate returns: the prompt, then the answer
                prompt = inputs["input_ids"]
                answer = self.answer(prompt) if callable(self.answer) else self.answer
                output = torch.cat([prompt, torch.tensor([answer], dtype=prompt.dtype).expand(len(prompt), -1)], 1)
            self.calls.append(dict(inputs=dict(inputs), output=output))
            return output

        monkeypatch.setattr(network_class, "generate", generate)
