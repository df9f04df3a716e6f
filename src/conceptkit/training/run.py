"""`conceptkit train`: media -> frozen encodings once -> method stages under Lightning -> concept folder.

Work in progress lives in `<output>.partial/` (checkpoints per stage, finished-stage snapshots,
previews); `resume=true` continues from there. The concept folder appears only when training ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from conceptkit.errors import UserError


def _snapshot(method, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(path))


def _restore(method, path: Path) -> None:
    from safetensors.torch import load_file

    method.load_state_dict(load_file(str(path)), strict=True)


def stage_with_overrides(stage, trainer_cfg):
    """trainer.max_steps / accumulate / gradient_clip, when set, override every stage's own value."""
    changes = {}
    if trainer_cfg.get("max_steps") is not None:
        changes["steps"] = int(trainer_cfg.max_steps)
    if trainer_cfg.get("accumulate") is not None:
        changes["accumulate"] = int(trainer_cfg.accumulate)
    if trainer_cfg.get("gradient_clip") is not None:
        changes["grad_clip"] = float(trainer_cfg.gradient_clip) or None
    return replace(stage, **changes)


def sample_texts(cfg: DictConfig, method) -> list[str]:
    """Sample/preview prompts: `sample.prompts` with {name} standing for this concept, else the method's."""
    if cfg.sample.prompts:
        return [p.replace("{name}", "{%s}" % method.concept_name) for p in cfg.sample.prompts]
    return method.sample_prompts()


def default_output(cfg: DictConfig) -> Path:
    return Path(cfg.output) if cfg.get("output") else Path("outputs") / f"{cfg.name}.concept"


def build_parts(cfg: DictConfig):
    """Backbone (loaded) and method (not yet initialised) from the config."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    backbone = instantiate(cfg.backbone).load()
    try:
        method = instantiate(cfg.method, concept_name=cfg.name)
    except InstantiationException as error:
        # Hydra wraps what the constructor raised in a multi-line message; a bad hyperparameter's
        # UserError is the one line users should see.
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise
    return backbone, method


def prepare_data(cfg: DictConfig, backbone, method=None):
    from conceptkit.data import load_media
    from conceptkit.method import CorpusData, TrainingData

    if method is not None and method.kind == "encoder":
        from conceptkit.corpus import corpus_from_config

        corpus_cfg = cfg.data.corpus
        frames = int(cfg.data.frames or backbone.default_frames) if backbone.is_video else 1
        corpus = corpus_from_config(corpus_cfg, backbone.resolution, frames)
        return CorpusData(corpus=corpus, description=f"{corpus_cfg.source} ({len(corpus)} items)",
                          workers=int(corpus_cfg.workers))

    frames = int(cfg.data.frames or 1)
    media = load_media(cfg.data.images, backbone.resolution, frames, backbone.is_video, cfg.data.captions,
                       cfg.data.captioner)
    latents = backbone.encode_media(media.pixels)
    return TrainingData(latents=latents, captions=media.captions, names=media.names, frames=media.pixels.shape[2],
                        pixels=media.pixels)


def encoder_samples(cfg: DictConfig, method, backbone, data):
    """An encoder concept's samples: the first `sample.count` corpus items re-rendered from their own
    captions and reference pictures (what the adapter learned to do; compose renders new references)."""
    if cfg.sample.count <= 0:
        return None, []
    renders, texts = [], []
    for index in range(min(int(cfg.sample.count), data.count)):
        item = data.corpus[index]
        objects = item.objects[: method.max_references()]
        names = [f"ref{k}" for k in range(len(objects))]
        text = item.caption
        for name, obj in reversed(list(zip(names, objects))):
            text = text[: obj.span[0]] + "{%s}" % name + text[obj.span[1]:]
        method.set_references(backbone, {name: obj.reference for name, obj in zip(names, objects)},
                              words={name: obj.word for name, obj in zip(names, objects)})
        prompt = method.prompt(text)
        renders.append(backbone.generate([prompt], negative_prompt=cfg.sample.negative_prompt, steps=cfg.sample.steps,
                                         guidance=cfg.sample.guidance, seed=cfg.sample.seed,
                                         scheduler=cfg.sample.scheduler))
        texts.append(item.caption)
    method.set_references(backbone, {})
    return torch.cat(renders), texts


CONCEPT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# Keys that may change between an interrupted run and its resume without changing the result.
RESUME_FREE_KEYS = {"resume", "overwrite", "debug", "output"}
RESUME_FREE_TRAINER_KEYS = {"progress_bar", "preview_every", "keep_checkpoints", "checkpoint_every", "logger",
                            "log_every"}


def is_main_process() -> bool:
    """Lightning's multi-GPU launcher re-runs this command once per extra rank (LOCAL_RANK/NODE_RANK
    set); only the first process may create, clean or write files."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def training_device(trainer_cfg) -> torch.device:
    """Where frozen work runs before Lightning starts: the trainer's accelerator (auto: cuda if any)."""
    accelerator = str(trainer_cfg.accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def _comparable(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_FREE_KEYS:
        plain.pop(key, None)
    for key in RESUME_FREE_TRAINER_KEYS:
        plain["trainer"].pop(key, None)
    return plain


def check_resumable(cfg: DictConfig, partial: Path) -> None:
    import yaml

    saved = partial / "config.yaml"
    if not saved.exists():
        return
    before = _comparable(OmegaConf.create(yaml.safe_load(saved.read_text())))
    now = _comparable(cfg)
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise UserError(f"resume=true with a different config than the interrupted run ({', '.join(changed)} "
                        f"changed; see {saved}); resume with the same settings or drop resume=true")


def train(cfg: DictConfig, callbacks: list | None = None) -> Path:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conceptkit.artifact import write_concept
    from conceptkit.training.callbacks import PreviewCallback, ResumeHint, progress_display
    from conceptkit.training.logs import check_logger, stage_loggers
    from conceptkit.training.module import ConceptTrainingModule

    # Lightning's banner lines (GPU/TPU availability, tips) are noise for a one-command tool.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if not CONCEPT_NAME.match(str(cfg.name)):
        raise UserError(f"name={cfg.name!r}: a concept name is a letter followed by letters, digits or _ "
                        f"(prompts refer to it as {{name}})")
    output = default_output(cfg)
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output {output} already exists; choose another output or pass overwrite=true")
    partial = output.with_name(output.name + ".partial")
    if cfg.resume:
        check_resumable(cfg, partial)
    check_logger(cfg.trainer.logger)

    L.seed_everything(cfg.seed, verbose=False)
    device = training_device(cfg.trainer)
    backbone, method = build_parts(cfg)
    if backbone.family not in method.families:
        raise UserError(f"method {method.name} runs on {', '.join(method.families)} backbones, not {backbone.family}; "
                        f"pick one of those with backbone=")
    backbone.to(device)  # frozen encoders (media, captions, class images) run once, on the training device
    data = prepare_data(cfg, backbone, method)
    method.initialize(backbone, data)
    method.attach(backbone)
    method.to(device)
    # Inputs are valid: from here on an interrupted run leaves <output>.partial/ to resume from.
    main = is_main_process()
    if main:
        if partial.exists() and not cfg.resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    if method.kind == "encoder":
        summary = {"corpus": data.description, "seed": cfg.seed, "stages": []}
    else:
        summary = {"images": data.names, "captions": data.captions, "seed": cfg.seed, "stages": []}
    started = time.time()
    for index, stage in enumerate(method.stages(backbone)):
        stage = stage_with_overrides(stage, cfg.trainer)
        done = partial / f"stage{index}_{stage.name}.safetensors"
        if cfg.resume and done.exists():
            _restore(method, done)
            summary["stages"].append(json.loads(done.with_suffix(".json").read_text()))
            continue
        method.begin_stage(stage, backbone)
        module = ConceptTrainingModule(method, backbone, method.stage_data(stage, data), stage, index, cfg.seed,
                                       log_every=cfg.trainer.log_every)
        checkpoint_dir = partial / "checkpoints" / stage.name
        # No version counter: a resumed run must overwrite last.ckpt, not write last-v1.ckpt beside it
        # (a second resume would otherwise load the stale first checkpoint).
        checkpointing = ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=cfg.trainer.checkpoint_every,
                                        save_last=True, save_top_k=0, enable_version_counter=False)
        progress_bar, progress_lines = progress_display(cfg.trainer.progress_bar, f"stage {stage.name}")
        stage_callbacks = [checkpointing, ResumeHint(partial), *progress_lines, *(callbacks or [])]
        if cfg.trainer.preview_every:
            stage_callbacks.append(PreviewCallback(method, backbone, partial / "previews", cfg.trainer.preview_every,
                                                   stage.name, cfg.sample, sample_texts(cfg, method)))
        trainer = L.Trainer(
            max_steps=stage.steps, accumulate_grad_batches=stage.accumulate, gradient_clip_val=stage.grad_clip,
            precision=cfg.trainer.precision, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
            strategy=cfg.trainer.strategy, callbacks=stage_callbacks,
            # Every loss term, one row per step (module.flush_terms), in <output>.partial/logs/<stage>/.
            logger=stage_loggers(cfg.trainer.logger, partial / "logs", stage.name) or False,
            enable_model_summary=False, enable_progress_bar=progress_bar, max_epochs=1,
            default_root_dir=str(partial), num_sanity_val_steps=0, log_every_n_steps=cfg.trainer.log_every,
            # Each rank draws its own batches from the micro-step number (module.py): Lightning's
            # distributed sampler would give each rank a shard of MicroSteps, ending it early.
            use_distributed_sampler=False,
        )
        last = checkpoint_dir / "last.ckpt"
        stage_start = time.time()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            # Batches derive from the global step (module.py), so a restarted dataloader is exact.
            warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
            # The module flushes its rows itself (and at the stage's end), whatever the stage's length.
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            trainer.fit(module, ckpt_path=str(last) if cfg.resume and last.exists() else None)
        # Lightning's teardown moves the LightningModule (and so the method, whose LoRA modules live
        # inside the denoiser) to the CPU; the backbone stays where it is. Put them back together.
        method.to(backbone.device)
        if trainer.interrupted or trainer.global_step < stage.steps:
            raise UserError(f"training stopped in stage {stage.name} at step {trainer.global_step}/{stage.steps}; "
                            f"rerun the same command with resume=true to continue from {partial}")
        loss = module.last_terms.get("loss")  # the last step's loss (mean over its micro-steps)
        record = {"name": stage.name, "steps": stage.steps, "lr": stage.lr, "accumulate": stage.accumulate,
                  "seconds": round(time.time() - stage_start, 2),
                  "final_loss": None if loss is None else round(float(loss), 6),
                  "mean_terms": {key: round(value, 6) for key, value in module.term_means().items()}}
        if main:
            _snapshot(method, done)
            done.with_suffix(".json").write_text(json.dumps(record))
        summary["stages"].append(record)
    summary["seconds"] = round(time.time() - started, 2)
    if not main:
        return output  # the first process renders samples and writes the concept

    if method.kind == "encoder":
        samples, texts = encoder_samples(cfg, method, backbone, data)
    else:
        texts = sample_texts(cfg, method)
        prompts = [method.prompt(p) for p in texts]
        samples = None
        if cfg.sample.count > 0:
            samples = backbone.generate(prompts * cfg.sample.count, negative_prompt=cfg.sample.negative_prompt,
                                        steps=cfg.sample.steps, guidance=cfg.sample.guidance, seed=cfg.sample.seed,
                                        scheduler=cfg.sample.scheduler)
        texts = texts * cfg.sample.count
    write_concept(output, method, backbone, OmegaConf.to_yaml(cfg, resolve=True), summary, samples,
                  texts, fps=getattr(backbone, "fps", 16), overwrite=cfg.overwrite, logs=partial / "logs")
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(partial, ignore_errors=True)
    return output
