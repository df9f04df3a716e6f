"""The one LightningModule that trains every method, one stage at a time.

It owns nothing but the method (its only registered submodule, so Lightning checkpoints hold the
method's tensors and optimiser state, never the frozen backbone). Every micro-step draws all its
randomness (which images, noise, timesteps, templates) from a generator seeded by
(seed, stage, micro-step), so a run resumed from a checkpoint continues exactly as if never stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from conceptkit.method import ConceptMethod, CorpusData, Stage, TrainBatch, TrainingData


class MicroSteps(Dataset):
    """Micro-step numbers; the module turns each into a batch. Lightning needs a dataloader, but the
    data itself (cached latents) lives on the module's device already."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return index


def as_drawn(sample):
    """A corpus micro-step arrives as drawn: (micro-step, indices, items); items stay CorpusItems."""
    return sample


def micro_step_generator(seed: int, stage_index: int, micro_step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 10_007_741 + micro_step)


def batch_indices(seed: int, stage_index: int, micro_step: int, batch_size: int, count: int) -> torch.Tensor:
    """Shuffled passes over the images (each image once per pass), deterministic per micro-step."""
    picks = []
    for slot in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, position = divmod(slot, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + stage_index * 104729 + epoch))
        picks.append(int(order[position]))
    return torch.tensor(picks, dtype=torch.long)


class ConceptTrainingModule(L.LightningModule):
    """Trains one stage of a method.

    No host sync per step: each micro-step's loss terms stay on the training device in a short
    buffer; every `log_every` optimiser steps, before every checkpoint and at the end of the stage,
    `flush_terms` copies the buffer to the host in one transfer, raises FloatingPointError on the
    first non-finite loss (naming the stage and step), writes one row per optimiser step to the
    trainer's loggers and refreshes the progress bar. A NaN is therefore reported up to `log_every`
    steps late, but never saved: a checkpoint flushes first."""

    def __init__(self, method: ConceptMethod, backbone, data: TrainingData, stage: Stage, stage_index: int,
                 seed: int, log_every: int = 10):
        super().__init__()
        self.method = method
        self.backbone = backbone  # a plain object, not an nn.Module: never registered, never checkpointed
        self.data = data
        self.stage = stage
        self.stage_index = stage_index
        self.seed = seed
        self.log_every = max(1, int(log_every))
        # The stage's settings, written beside the logged rows (hparams.yaml) by the trainer's loggers.
        self.save_hyperparameters({"stage_index": stage_index, "seed": seed, "method": getattr(method, "name", ""),
                                   **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(stage).items()}})
        # Running sums of every term the method reports (loss, rec, mask_area, ...), for the stage's
        # record in concept.json: a final step's value is one noisy draw, the stage mean says what the
        # term did (e.g. how much of the latent MCPL's attention mask kept). Kept in checkpoints so a
        # resumed stage reports the same means as an uninterrupted one.
        # The sums stay tensors on the training device: no host sync per step, only when read.
        self.term_sums: dict[str, torch.Tensor | float] = {}
        self.term_counts: dict[str, int] = {}
        # Micro-steps not yet flushed: (optimiser step, {term: 0-d tensor on the training device}).
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.last_terms: dict[str, float] = {}  # the latest flushed step's terms (host floats)
        self._progress_shown = True
        self._seen_step = 0

    def term_means(self) -> dict[str, float]:
        return {key: float(self.term_sums[key]) / self.term_counts[key] for key in sorted(self.term_sums)}

    def _accumulate_terms(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            if value.numel() == 1:
                self.term_sums[key] = self.term_sums.get(key, 0.0) + value.detach().float().reshape(())
                self.term_counts[key] = self.term_counts.get(key, 0) + 1

    def record_terms(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """Keep one micro-step's scalar terms on their device until the next flush (no host sync)."""
        self.pending.append((step, {key: value.detach().float().reshape(()) for key, value in losses.items()
                                    if value.numel() == 1}))
        self._accumulate_terms(losses)

    def flush_terms(self) -> list[dict]:
        """One device->host transfer for every pending micro-step. Raises FloatingPointError on the first
        non-finite loss; otherwise returns (and logs) one row per optimiser step, each term averaged
        over that step's micro-steps."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        keys = [list(terms) for _, terms in pending]
        values = torch.stack([v for _, terms in pending for v in terms.values()]).tolist()  # the one sync
        sums: dict[int, dict[str, float]] = {}
        counts: dict[int, dict[str, int]] = {}
        position = 0
        for (step, _), names in zip(pending, keys):
            for name in names:
                value = values[position]
                position += 1
                if name == "loss" and not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} at stage {self.stage.name} step {step}; "
                                             f"lower the learning rate or use precision=32")
                sums.setdefault(step, {})[name] = sums.get(step, {}).get(name, 0.0) + value
                counts.setdefault(step, {})[name] = counts.get(step, {}).get(name, 0) + 1
        rows = [{"step": step, **{name: total / counts[step][name] for name, total in terms.items()}}
                for step, terms in sums.items()]
        for logger in self.loggers:
            for row in rows:
                logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
            logger.save()
        self.last_terms = {k: v for k, v in rows[-1].items() if k != "step"}
        self._progress_shown = False
        return rows

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.flush_terms()  # never write a checkpoint past a non-finite loss
        checkpoint["conceptkit_term_sums"] = {key: float(value) for key, value in self.term_sums.items()}
        checkpoint["conceptkit_term_counts"] = dict(self.term_counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.term_sums = dict(checkpoint.get("conceptkit_term_sums", {}))
        self.term_counts = dict(checkpoint.get("conceptkit_term_counts", {}))

    def setup(self, stage: str) -> None:
        self.backbone.to(self.device)
        if getattr(self.data, "latents", None) is not None:  # backbone pretraining encodes its latents later
            self.data.latents = self.data.latents.to(self.device)

    @property
    def rank_seed(self) -> int:
        return self.seed + 7_777_777 * self.global_rank  # each data-parallel rank draws its own batches

    def train_dataloader(self):
        total = self.stage.steps * self.stage.accumulate
        if isinstance(self.data, CorpusData):
            from conceptkit.corpus import CorpusMicroSteps

            # Starts at the next micro-step (Lightning restores the step before asking for the loader),
            # so a resumed run draws the same items as an uninterrupted one.
            start = self.trainer.global_step * self.stage.accumulate
            draw = partial(batch_indices, self.rank_seed, self.stage_index, batch_size=self.stage.batch_size,
                           count=self.data.count)
            workers = int(self.data.workers)
            return DataLoader(CorpusMicroSteps(self.data.corpus, draw, start, total), batch_size=None,
                              shuffle=False, num_workers=workers, collate_fn=as_drawn,
                              persistent_workers=False, prefetch_factor=2 if workers else None)
        return DataLoader(MicroSteps(total), batch_size=1, shuffle=False, num_workers=0)

    def training_step(self, batch, batch_idx):
        micro = self.trainer.global_step * self.stage.accumulate + batch_idx % self.stage.accumulate
        seed = self.rank_seed
        generator = micro_step_generator(seed, self.stage_index, micro)
        items = None
        if isinstance(self.data, CorpusData):
            drawn_for, indices, items = batch
            if int(drawn_for) != micro:
                raise RuntimeError(f"the corpus loader drew items for micro-step {drawn_for}, training is at {micro}")
        else:
            # Indices stay on the CPU (TrainBatch): methods read them as Python ints for free and move
            # them only where a device tensor is indexed.
            indices = batch_indices(seed, self.stage_index, micro, self.stage.batch_size, self.data.count)
        losses = self.method.training_loss(TrainBatch(indices=indices, data=self.data, generator=generator,
                                                      items=items), self.backbone, self.stage)
        self.record_terms(self.trainer.global_step, losses)
        return losses["loss"]

    def on_train_start(self) -> None:
        self._seen_step = self.trainer.global_step  # > 0 when resumed from a checkpoint

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step  # optimiser steps done
        if step == self._seen_step:
            return  # mid-accumulation: no optimiser step happened
        self._seen_step = step
        if step % self.log_every == 0 or step >= self.stage.steps:
            self.flush_terms()
        if not self._progress_shown and self.last_terms:
            # Host floats as CPU tensors: the progress bar's .item() then needs no device sync.
            for key, value in self.last_terms.items():
                self.log(key, torch.tensor(value), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                         batch_size=1)
            self._progress_shown = True

    def on_train_epoch_end(self) -> None:
        self.flush_terms()

    def on_train_end(self) -> None:
        self.flush_terms()

    def configure_optimizers(self):
        groups = self.method.param_groups(self.stage)
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise RuntimeError(f"stage {self.stage.name} has no trainable parameters")
        return torch.optim.AdamW(groups, lr=self.stage.lr, betas=self.stage.betas,
                                 weight_decay=self.stage.weight_decay)
