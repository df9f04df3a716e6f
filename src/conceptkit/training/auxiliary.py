"""One training stage of an auxiliary model (an image encoder, a captioner) through the concept
training loop: the same LightningModule, checkpoints in `<output>.partial`, resume and progress bar.

Auxiliary models train without a backbone; what they train is registered on the `trainable` module
(a Stage interface like a ConceptMethod's), so Lightning checkpoints it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from omegaconf import DictConfig

from conceptkit.errors import UserError
from conceptkit.method import Stage, TrainingData


class NoBackbone:
    """What the training module moves to its device when no backbone takes part."""

    def to(self, device):
        return self


def fit_stage(trainable, data: TrainingData, stage: Stage, trainer_cfg: DictConfig, partial: Path, seed: int,
              resume: bool, log_every: int = 50):
    """Train `trainable` for `stage` (its params on `trainer_cfg`'s device already); return the training
    module (its `last_terms` are the final loss terms). Stopped early: one line naming resume=true."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conceptkit.training.callbacks import progress_display
    from conceptkit.training.module import ConceptTrainingModule

    module = ConceptTrainingModule(trainable, NoBackbone(), data, stage, 0, int(seed), log_every=log_every)
    checkpoint_dir = partial / "checkpoints" / stage.name
    progress_bar, progress_lines = progress_display(trainer_cfg.progress_bar, f"stage {stage.name}")
    trainer = L.Trainer(
        max_steps=stage.steps, max_epochs=-1, gradient_clip_val=stage.grad_clip, precision=trainer_cfg.precision,
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, strategy=trainer_cfg.strategy,
        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=trainer_cfg.checkpoint_every,
                                   save_last=True, save_top_k=0, enable_version_counter=False), *progress_lines],
        logger=False, enable_model_summary=False, enable_progress_bar=progress_bar,
        default_root_dir=str(partial), num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False)
    last = checkpoint_dir / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, ckpt_path=str(last) if resume and last.exists() else None)
    if trainer.interrupted or trainer.global_step < stage.steps:
        raise UserError(f"pretraining stopped at step {trainer.global_step}/{stage.steps}; rerun with resume=true "
                        f"to continue from {partial}")
    return module


def fresh_partial(output: Path, resume: bool) -> Path:
    """`<output>.partial`, emptied unless resuming."""
    partial = output.with_name(output.name + ".partial")
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def publish(staging: Path, output: Path) -> None:
    """Replace `output` with the finished `staging` folder (no half-written output)."""
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def output_folder(cfg: DictConfig, default: Path) -> Path:
    """Where a pretrain run writes (`output`, else the package's folder); refuses to replace it unasked."""
    output = Path(cfg.output) if cfg.output else default
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output {output} already exists; choose another output or pass overwrite=true")
    return output


def train_auxiliary(trainable, data: TrainingData, cfg: DictConfig, output: Path):
    """Train `trainable`'s one stage (trainer overrides applied) on the configured device, checkpoints in
    `<output>.partial`: (training module, stage, device, partial folder)."""
    from conceptkit.training.run import stage_with_overrides, training_device

    partial = fresh_partial(output, bool(cfg.resume))
    device = training_device(cfg.trainer)
    stage = stage_with_overrides(trainable.stages()[0], cfg.trainer)
    trainable.to(device)
    trainable.begin_stage(stage)
    module = fit_stage(trainable, data, stage, cfg.trainer, partial, int(cfg.seed), bool(cfg.resume))
    return module, stage, device, partial
