"""The one LightningModule that trains every method, one stage at a time.

It owns nothing but the method (its only registered submodule, so Lightning checkpoints hold the
method's tensors and optimiser state, never the frozen backbone). Every micro-step draws all its
randomness (which images, noise, timesteps, templates) from a generator seeded by
(seed, stage, micro-step), so a run resumed from a checkpoint continues exactly as if never stopped.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData


class MicroSteps(Dataset):
    """Micro-step numbers; the module turns each into a batch. Lightning needs a dataloader, but the
    data itself (cached latents) lives on the module's device already."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return index


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
    def __init__(self, method: ConceptMethod, backbone, data: TrainingData, stage: Stage, stage_index: int,
                 seed: int):
        super().__init__()
        self.method = method
        self.backbone = backbone  # a plain object, not an nn.Module: never registered, never checkpointed
        self.data = data
        self.stage = stage
        self.stage_index = stage_index
        self.seed = seed
        # Running sums of every term the method reports (loss, rec, mask_area, ...), for the stage's
        # record in concept.json: a final step's value is one noisy draw, the stage mean says what the
        # term did (e.g. how much of the latent MCPL's attention mask kept). Kept in checkpoints so a
        # resumed stage reports the same means as an uninterrupted one.
        # The sums stay tensors on the training device: no host sync per step, only when read.
        self.term_sums: dict[str, torch.Tensor | float] = {}
        self.term_counts: dict[str, int] = {}

    def term_means(self) -> dict[str, float]:
        return {key: float(self.term_sums[key]) / self.term_counts[key] for key in sorted(self.term_sums)}

    def _accumulate_terms(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            if value.numel() == 1:
                self.term_sums[key] = self.term_sums.get(key, 0.0) + value.detach().float().reshape(())
                self.term_counts[key] = self.term_counts.get(key, 0) + 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["conceptkit_term_sums"] = {key: float(value) for key, value in self.term_sums.items()}
        checkpoint["conceptkit_term_counts"] = dict(self.term_counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.term_sums = dict(checkpoint.get("conceptkit_term_sums", {}))
        self.term_counts = dict(checkpoint.get("conceptkit_term_counts", {}))

    def setup(self, stage: str) -> None:
        self.backbone.to(self.device)
        if self.data.latents is not None:  # backbone pretraining encodes its latents later
            self.data.latents = self.data.latents.to(self.device)

    def train_dataloader(self):
        total = self.stage.steps * self.stage.accumulate
        return DataLoader(MicroSteps(total), batch_size=1, shuffle=False, num_workers=0)

    def training_step(self, batch, batch_idx):
        micro = self.trainer.global_step * self.stage.accumulate + batch_idx % self.stage.accumulate
        # Each data-parallel rank draws its own images, noise and timesteps.
        seed = self.seed + 7_777_777 * self.global_rank
        generator = micro_step_generator(seed, self.stage_index, micro)
        indices = batch_indices(seed, self.stage_index, micro, self.stage.batch_size, self.data.count)
        losses = self.method.training_loss(TrainBatch(indices=indices.to(self.device), data=self.data,
                                                      generator=generator), self.backbone, self.stage)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at stage {self.stage.name} step "
                                     f"{self.trainer.global_step}; lower the learning rate or use precision=32")
        self._accumulate_terms(losses)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, batch_size=len(indices))
        for key, value in losses.items():
            if key != "loss":
                self.log(key, value.detach(), prog_bar=True, on_step=True, batch_size=len(indices))
        return loss

    def configure_optimizers(self):
        groups = self.method.param_groups(self.stage)
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise RuntimeError(f"stage {self.stage.name} has no trainable parameters")
        return torch.optim.AdamW(groups, lr=self.stage.lr, betas=self.stage.betas,
                                 weight_decay=self.stage.weight_decay)
