"""Training callbacks: preview samples every N steps, a resume hint on Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from conceptkit.media import grid, save_png


class PreviewCallback(L.Callback):
    """Renders the method's sample prompts every `every` optimiser steps into a PNG grid (frame strips
    for video) under `<output>.partial/previews/`. Sampling uses its own seeded generator, so it
    never changes the training trajectory."""

    def __init__(self, method, backbone, folder: Path, every: int, stage_name: str, sample_cfg, texts: list[str]):
        self.method, self.backbone = method, backbone
        self.folder, self.every, self.stage_name = Path(folder), every, stage_name
        self.sample_cfg, self.texts = sample_cfg, texts
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last or step % self.every != 0 or step == 0 or not trainer.is_global_zero:
            return  # previews are files: only the first process renders and writes them
        self._last = step
        prompts = [self.method.prompt(p) for p in self.texts]
        media = self.backbone.generate(prompts, negative_prompt=self.sample_cfg.negative_prompt,
                                       steps=self.sample_cfg.steps, guidance=self.sample_cfg.guidance,
                                       seed=self.sample_cfg.seed, scheduler=self.sample_cfg.scheduler)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_png(grid(media), self.folder / f"{self.stage_name}_step{step:05d}.png")


class ResumeHint(L.Callback):
    """Lightning answers Ctrl-C by exiting; say first how to continue."""

    def __init__(self, partial: Path):
        self.partial = partial

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            import sys

            print(f"\ninterrupted at step {trainer.global_step}; continue with the same command plus resume=true "
                  f"(state in {self.partial})", file=sys.stderr)
