"""Hydra configs: where they live, composing them, and checking them against what they configure.

The configs ship inside the package as `conceptkit.conf`, so editable and wheel installs find them.
Every key is checked: `_target_` nodes must bind to their class's keyword signature, and the plain
sections (data, trainer, sample, top level) against the dataclasses below. Nothing here builds a model.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from conceptkit.errors import UserError


@dataclass
class DataSettings:
    images: str | None = None
    captions: str | None = None
    captioner: str | None = None
    frames: int | None = None
    corpus: Any = None  # encoder methods' corpus (TrainCorpusSettings)


@dataclass
class TrainCorpusSettings:  # data.corpus (conf/data/default.yaml): what encoder methods train on
    source: str = "shapeworld"
    size: int = 100_000
    seed: int = 0
    max_objects: int = 3
    object_word: str = "shape"
    workers: int = 1


@dataclass
class TrainerSettings:
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    max_steps: int | None = None
    accumulate: int | None = None
    gradient_clip: float | None = None
    checkpoint_every: int = 50
    preview_every: int = 0
    progress_bar: bool = True
    keep_checkpoints: bool = False
    logger: str = "csv"
    log_every: int = 10


@dataclass
class SampleSettings:
    prompts: Any = None
    count: int = 1
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    scheduler: str | None = None
    negative_prompt: str = ""


@dataclass
class TrainSettings:
    backbone: Any = None
    method: Any = None
    data: Any = None
    trainer: Any = None
    sample: Any = None
    name: str = "concept"
    output: str | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    debug: bool = False


@dataclass
class ComposeSettings:
    concepts: list = dataclasses.field(default_factory=list)
    prompt: str | None = None
    negative_prompt: str = ""
    output: str | None = None
    count: int = 4
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    device: str = "auto"
    backbone_path: str | None = None
    attention_maps: bool = False
    references: Any = None
    compositional_guidance: Any = "auto"
    overwrite: bool = False
    debug: bool = False


@dataclass
class BenchSettings:  # values live in conf/bench.yaml; this class names the keys
    suite: str
    methods: list
    backbones: list
    steps: int
    warmup: int
    device: str
    precision: str
    overrides: list
    suite_backbone: str | None
    suite_backbone_path: str | None
    objects: str
    concepts: int
    train_steps: Any
    train_overrides: list
    variants: Any
    samples_per_prompt: int
    drift_prompts: int
    quality_prompts: int
    sample_steps: int
    guidance: float | None
    seed: int
    concept_folder: str | None
    keep_work: bool
    output: str
    debug: bool


@dataclass
class AuxiliaryPretrainSettings:  # what conf/pretrain_encoder.yaml and conf/pretrain_vlm.yaml share
    trainer: Any = None
    corpus: Any = None
    evaluation: Any = None
    model: Any = None
    train: Any = None
    output: str | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    debug: bool = False


@dataclass
class PretrainVlmSettings(AuxiliaryPretrainSettings):  # conf/pretrain_vlm.yaml
    vlm: str = "shapes_qwen25vl"
    init: str | None = None


@dataclass
class PretrainEncoderSettings(AuxiliaryPretrainSettings):  # conf/pretrain_encoder.yaml
    encoder: str = "shapes_clip"


@dataclass
class PretrainSettings:
    backbone: Any = None
    trainer: Any = None
    corpus: Any = None
    vae: Any = None
    denoiser: Any = None
    output: str | None = None
    seed: int = 0
    init: str | None = None
    resume: bool = False
    overwrite: bool = False
    debug: bool = False


@dataclass
class CorpusSettings:  # values live in conf/pretrain.yaml; these classes only name the keys
    images: int
    clips: int
    clip_fraction: float
    object_weights: list | None
    allowed: dict | None
    orientation: str


@dataclass
class VaeRecipe:
    steps: int
    lr: float
    batch_size: int
    kl_weight: float
    clip_fraction: float | None = None
    latent_gain: float = 1.0


@dataclass
class DenoiserRecipe:
    steps: int
    lr: float
    batch_size: int
    weight_decay: float
    caption_dropout: float
    grounding_weight: float = 0.0
    grounding_sites: list[str] | None = None


SECTIONS = {
    "train": (TrainSettings, {"data": DataSettings, "trainer": TrainerSettings, "sample": SampleSettings}),
    "compose": (ComposeSettings, {}),
    "bench": (BenchSettings, {}),
    "pretrain_encoder": (PretrainEncoderSettings, {"trainer": TrainerSettings}),
    "pretrain_vlm": (PretrainVlmSettings, {"trainer": TrainerSettings}),
    "pretrain": (PretrainSettings, {"trainer": TrainerSettings, "corpus": CorpusSettings, "vae": VaeRecipe,
                                    "denoiser": DenoiserRecipe}),
}


def conf_dir() -> Path:
    return Path(str(resources.files("conceptkit.conf")))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose(config_name: str, overrides: list[str]):
    """Compose conf/<config_name>.yaml with command-line overrides; bad overrides -> one UserError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as error:
        raise UserError(_explain_hydra_error(str(error))) from None
    except OmegaConfBaseException as error:
        raise UserError(f"bad override: {str(error).splitlines()[0]}") from None
    validate(config_name, cfg)
    return cfg


def _explain_hydra_error(message: str) -> str:
    first = message.strip().splitlines()[0]
    for group in ("method", "backbone", "data", "trainer", "experiment"):
        if f"'{group}/" in first or f"group {group}" in first:
            return f"unknown {group} in {first!r}: choose one of {', '.join(group_options(group))}"
    if "no viable alternative" in first or "mismatched input" in first or "extraneous input" in first:
        return f"cannot parse a command-line override ({first}); quote values that contain '=' or spaces"
    if "Could not override" in first or "Key '" in first:
        return f"{first} (check the key name; `conceptkit <command> --cfg` is not needed, see conf/)"
    return first


def bind_target(node, section: str, extra: dict | None = None) -> None:
    """Check a `_target_` node against its class's keyword signature without building anything."""
    import importlib

    target = node.get("_target_")
    if not target:
        raise UserError(f"{section}: no _target_")
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(f"{section}._target_ {target!r} does not exist") from None
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    try:
        inspect.signature(cls).bind(**kwargs, **(extra or {}))
    except TypeError as error:
        raise UserError(f"{section}: {error} (keys: {', '.join(kwargs)})") from None


def _check_keys(node, settings_cls, section: str) -> None:
    known = {f.name for f in dataclasses.fields(settings_cls)}
    for key in node.keys():
        if key not in known:
            where = f"{section}.{key}" if section else key
            raise UserError(f"unknown config key {where!r}: known keys are {', '.join(sorted(known))}")


def validate(config_name: str, cfg) -> None:
    top, sections = SECTIONS[config_name]
    _check_keys(cfg, top, "")
    for key, settings_cls in sections.items():
        _check_keys(cfg[key], settings_cls, key)
    if config_name == "train" and cfg.data.get("corpus") is not None:
        _check_keys(cfg.data.corpus, TrainCorpusSettings, "data.corpus")
    if config_name in ("train", "pretrain"):
        bind_target(cfg.backbone, "backbone")
    if config_name == "train":
        bind_target(cfg.method, "method", extra={"concept_name": cfg.name})
