"""The one interface every concept method implements.

A method is an nn.Module whose state_dict IS the concept: learned token vectors, LoRA matrices
(PEFT-created, held by reference), adapters, binders. The backbone is never a submodule of the
method; the method plugs into it in `attach` through the three sanctioned mechanisms (attention
hooks, PEFT adapters, token rows) and `detach` undoes exactly that.

Life cycle
  training:  m = Method(**cfg); m.initialize(backbone, data); m.attach(backbone);
             for stage in m.stages(backbone): m.begin_stage(stage, backbone);
                 ... m.training_loss(TrainBatch(..., data=m.stage_data(stage, data)), ...)
  loading:   m = Method(**hparams); m.import_info(info); m.attach(backbone); m.load_state_dict(tensors)
Encoder methods (kind = "encoder") train the same way on a CorpusData (each TrainBatch carries its
corpus `items`) and, once loaded, are conditioned with `set_references` before prompting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from conceptkit.backbones.base import LatentDistribution
from conceptkit.errors import UserError


@dataclass(frozen=True)
class Stage:
    """One training stage: which parameters train (the method decides by name) and its budget."""

    name: str
    steps: int  # optimiser steps
    lr: float
    batch_size: int = 1
    accumulate: int = 1
    grad_clip: float | None = 1.0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainingData:
    """The training media after the frozen encoders ran once."""

    latents: LatentDistribution  # cached VAE posterior, indexable by image
    captions: list[str | None]  # one per item, None where none was given
    names: list[str]  # file names, in the (sorted) order of `latents`
    frames: int  # 1 for images
    # The media before the VAE, (N, 3, F, H, W) in [-1, 1] on the CPU, for methods that encode them
    # another way (BiCo trains a clip's frames as images); None where the data has no pixels.
    pixels: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return len(self.names)


@dataclass
class TrainBatch:
    # (B,) items of TrainingData for this micro-step: a CPU tensor (int(i) / .tolist() cost no device
    # sync); move it with .to(device, non_blocking=True) only where it indexes a device tensor.
    indices: torch.Tensor
    data: TrainingData
    generator: torch.Generator  # all randomness of the micro-step: makes resumed runs reproduce exactly
    extras: dict[str, Any] = field(default_factory=dict)
    # Encoder methods: the corpus items (conceptkit.corpus.CorpusItem) of this micro-step, which the
    # loader drew for it; `data` is then the CorpusData and `indices` the items' corpus indices.
    items: list | None = None


@dataclass
class CorpusData:
    """What an encoder method trains on: a map-style corpus (conceptkit.corpus), streamed by a loader
    that draws each micro-step's items from (seed, stage, micro-step), like TrainingData's indices."""

    corpus: Any  # torch Dataset of CorpusItem
    description: str  # for concept.json: where the corpus came from
    workers: int = 0  # DataLoader worker processes that render / read items ahead of the step

    @property
    def count(self) -> int:
        return len(self.corpus)


class ConceptMethod(nn.Module):
    name: ClassVar[str]  # short name stored in artifacts, e.g. "conceptprism"
    version: ClassVar[str] = "1"
    # "per_concept": optimised on a few images of one concept (TrainingData), used by {name} in prompts.
    # "encoder": an adapter trained once on a corpus (CorpusData), then conditioned at inference on any
    # reference pictures (`set_references`), which prompts name as {reference name}.
    kind: ClassVar[str] = "per_concept"
    families: ClassVar[tuple[str, ...]] = ("sd15", "wan21")  # backbone families the method runs on

    def __init__(self, concept_name: str = "concept"):
        super().__init__()
        self.concept_name = concept_name

    @classmethod
    def compose_example(cls, concept: str, name: str, prompt: str) -> str:
        """The arguments of a `conceptkit compose` call rendering a trained concept, which the train CLI
        prints: `prompt` (the first sample prompt) with {name}. Encoder methods say how they take references."""
        return f"concepts=[{concept}] prompt=\"{prompt.replace('{name}', '{' + name + '}')}\""

    # hyperparameters and identity ------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild the method with `Method(**hparams)`."""
        raise NotImplementedError

    def export_info(self) -> dict[str, Any]:
        """Data-derived facts needed to allocate parameters on load (e.g. the number of images)."""
        return {}

    def import_info(self, info: dict[str, Any]) -> None:
        return None

    def token_names(self) -> list[str]:
        """Placeholder strings this concept adds to prompts (for concept.json and `ls`)."""
        return []

    # wiring ----------------------------------------------------------------------------------
    def initialize(self, backbone, data: TrainingData) -> None:
        """Create parameters with their training initial values (training only)."""
        raise NotImplementedError

    def attach(self, backbone) -> None:
        raise NotImplementedError

    def detach(self, backbone) -> None:
        raise NotImplementedError

    # training ----------------------------------------------------------------------------------
    def stages(self, backbone) -> list[Stage]:
        """The training schedule: a function of the method's own settings (and data-derived facts set
        by initialize / import_info, e.g. BiCo's clip length) and of the backbone passed in (budgets
        that differ per family), never of state that only attach sets."""
        raise NotImplementedError

    def begin_stage(self, stage: Stage, backbone) -> None:
        """Set requires_grad for this stage and precompute what the stage keeps fixed."""
        raise NotImplementedError

    def stage_data(self, stage: Stage, data: TrainingData) -> TrainingData:
        """The media this stage trains on: `data` itself unless the method trains a stage on another
        view of it (BiCo's first video stage: the clip's frames as images)."""
        return data

    def param_groups(self, stage: Stage) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}]

    def training_loss(self, batch: TrainBatch, backbone, stage: Stage) -> dict[str, torch.Tensor]:
        """Returns {"loss": scalar, ...other scalars to log}."""
        raise NotImplementedError

    # what benchmark suites may tell a method (bench/ never names a method) ---------------------
    # True where the class word IS what prompts render for the concept (BiCo's description) rather
    # than a word beside a learned identifier (DreamBooth's class noun). Such a method is told a
    # neutral word and given no captions in the quality suites: naming the held-out object would
    # score the base model, not the learning.
    renders_class_word: ClassVar[bool] = False

    @classmethod
    def class_word_overrides(cls, word: str) -> list[str]:
        """Config overrides that give this method the concept's class word; [] if it takes none."""
        return []

    @classmethod
    def scene_overrides(cls, sentence: str, init_words: dict[str, str]) -> list[str]:
        """Config overrides for a method that learns one word per `{word}` of a sentence describing one
        image (MCPL), each word starting from its init word; [] for methods that learn no words from
        a sentence."""
        return []

    # inference -------------------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """Replace this concept's `{name}` placeholder with what the method feeds the text encoder."""
        raise NotImplementedError

    def interop_files(self, backbone) -> dict[str, dict[str, torch.Tensor]]:
        """Extra files in formats other tools load (diffusers LoRA, textual-inversion embeddings),
        written beside weights.safetensors. Called while attached."""
        return {}

    def set_references(self, backbone, pictures: dict, words: dict | None = None) -> None:
        """Encoder methods: condition on {reference name: (H, W, 3) uint8 picture}; prompts then name
        each as {reference name}, which renders as its word (`words`, default the name) and the
        reference's tokens. Per-concept methods take no references."""
        raise UserError(f"concept {self.concept_name} ({self.name}) is a per-concept method: it takes no references")

    def max_references(self) -> int:
        """How many references one prompt may hold (encoder methods); 0: the method takes none."""
        return 0

    def steered_generate(self, backbone, prompts: list[str], generate_kwargs: dict, compositional="auto"):
        """A method that steers sampling itself (KV-mixed's compositional guidance) returns
        (media, extras: {"first_pass": media, "log": dict}); None: compose calls backbone.generate."""
        return None

    def sample_prompts(self) -> list[str]:
        """Prompts (with `{name}`) rendered into samples/ and training previews."""
        return ["a photo of {%s}" % self.concept_name, "a photo of {%s} on the beach" % self.concept_name]
