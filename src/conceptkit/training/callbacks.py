"""Training callbacks: preview samples every N steps, a resume hint on Ctrl-C, progress as plain lines
when the output is not a terminal."""

from __future__ import annotations

import sys
import time
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


class ProgressLines(L.Callback):
    """One plain progress line every `every_s` seconds and at the stage's end, for output that is not a
    terminal (a log file, a batch job): Lightning's bar redraws in place and, off a terminal, shows
    nothing until the stage ends. The loss terms are the training module's latest flushed ones."""

    def __init__(self, stage_name: str, every_s: float = 30.0):
        self.stage_name, self.every_s = stage_name, every_s
        self._started = self._printed = None
        self._first_step = 0

    def on_train_start(self, trainer, pl_module):
        self._started = self._printed = time.time()
        self._first_step = trainer.global_step  # > 0 when resumed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        now = time.time()
        if not trainer.is_global_zero or (now - self._printed < self.every_s and step < total):
            return
        if step == self._first_step:
            return
        self._printed = now
        per_step = (now - self._started) / (step - self._first_step)
        terms = getattr(pl_module, "last_terms", {}) or {}
        losses = "".join(f", {key} {value:.4g}" for key, value in terms.items())
        left = max(0, total - step) * per_step
        left_text = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
        print(f"{self.stage_name}: step {step}/{total} ({100 * step // max(1, total)} %), {per_step:.2f} s/step, "
              f"~{left_text} left{losses}", flush=True)


def progress_display(enabled: bool, stage_name: str) -> tuple[bool, list]:
    """(Lightning's enable_progress_bar, extra callbacks) for `trainer.progress_bar`: the bar on a
    terminal, ProgressLines elsewhere, nothing when disabled."""
    if not enabled:
        return False, []
    if sys.stdout.isatty():
        return True, []
    return False, [ProgressLines(stage_name)]
