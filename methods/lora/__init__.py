"""DreamBooth-LoRA (Ruiz et al., 2023 with Hu et al.'s LoRA): PEFT LoRA on the denoiser's attention,
trained on "a photo of <identifier> <class>", with optional prior preservation on class images the
frozen base model generates once before training. Defaults follow diffusers' train_dreambooth_lora;
see README.md beside this file.
"""

from __future__ import annotations

import torch
from torch import nn

from conceptkit.embeddings import attach_lora, diffusers_lora_state_dict, owner_id
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData
from conceptkit.training.losses import denoising_loss


class DreamBoothLoRA(ConceptMethod):
    name = "lora"
    version = "1"

    @classmethod
    def class_word_overrides(cls, word):
        return [f"method.class_noun={word}"]

    def __init__(self, concept_name: str = "concept", identifier: str = "sks", class_noun: str = "object",
                 rank: int = 4, alpha: float | None = None,
                 target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
                 steps: int = 500, lr: float = 1e-4, batch_size: int = 1, accumulate: int = 1,
                 grad_clip: float | None = 1.0, weight_decay: float = 1e-2,
                 prior_preservation: bool = False, num_class_images: int = 100, prior_loss_weight: float = 1.0,
                 class_prompt: str | None = None, class_steps: int = 25, class_seed: int = 0):
        super().__init__(concept_name)
        self.identifier, self.class_noun = identifier, class_noun
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.target_modules = list(target_modules)
        self.steps, self.lr, self.batch_size, self.accumulate = steps, lr, batch_size, accumulate
        self.grad_clip, self.weight_decay = grad_clip, weight_decay
        self.prior_preservation = prior_preservation
        self.num_class_images, self.prior_loss_weight = num_class_images, prior_loss_weight
        self.class_prompt = class_prompt or f"a photo of {class_noun}"
        self.class_steps, self.class_seed = class_steps, class_seed
        self.lora = nn.ModuleDict()
        self._class_latents = None
        self._cached_context = None

    def hparams(self):
        return dict(identifier=self.identifier, class_noun=self.class_noun, rank=self.rank, alpha=self.alpha,
                    target_modules=list(self.target_modules), steps=self.steps, lr=self.lr,
                    batch_size=self.batch_size, accumulate=self.accumulate, grad_clip=self.grad_clip,
                    weight_decay=self.weight_decay, prior_preservation=self.prior_preservation,
                    num_class_images=self.num_class_images, prior_loss_weight=self.prior_loss_weight,
                    class_prompt=self.class_prompt, class_steps=self.class_steps, class_seed=self.class_seed)

    @property
    def phrase(self) -> str:
        return f"{self.identifier} {self.class_noun}"

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.phrase}"

    def initialize(self, backbone, data: TrainingData) -> None:
        if self.prior_preservation:
            self._class_latents = self._generate_class_latents(backbone, data.frames)

    @torch.no_grad()
    def _generate_class_latents(self, backbone, frames: int):
        """Prior preservation's class images, generated once by the frozen base model (before any
        adapter is attached) and encoded once, like diffusers' example does."""
        if backbone.lora_owners() or backbone.tokens.placeholders():
            raise UserError("prior preservation must generate class images from the bare base model; train alone")
        media = []
        for start in range(0, self.num_class_images, 8):
            n = min(8, self.num_class_images - start)
            media.append(backbone.generate([self.class_prompt] * n, steps=self.class_steps,
                                           seed=self.class_seed + start, frames=frames))
        pixels = torch.cat(media) * 2 - 1
        return backbone.encode_media(pixels)

    def attach(self, backbone) -> None:
        attach_lora(self.lora, backbone, owner_id(self.concept_name), self.rank, self.alpha,
                    self.target_modules, init="gaussian")  # as diffusers' train_dreambooth_lora

    def detach(self, backbone) -> None:
        backbone.remove_lora(owner_id(self.concept_name))

    def stages(self, backbone):
        return [Stage("lora", steps=self.steps, lr=self.lr, batch_size=self.batch_size, accumulate=self.accumulate,
                      grad_clip=self.grad_clip, weight_decay=self.weight_decay)]

    def begin_stage(self, stage, backbone):
        self.lora.requires_grad_(True)
        # The prompts never change and the text encoder is frozen: encode them once.
        with torch.no_grad():
            self._cached_context = {
                "instance": backbone.encode_text([self.instance_prompt])[0],
                "class": backbone.encode_text([self.class_prompt])[0],
            }

    def training_loss(self, batch: TrainBatch, backbone, stage):
        latents = batch.data.latents.sample(batch.indices, batch.generator)
        n = latents.shape[0]
        context = self._cached_context["instance"].expand(n, -1, -1)
        if self.prior_preservation:
            picks = torch.randint(0, self._class_latents.mean.shape[0], (n,), generator=batch.generator)
            class_latents = self._class_latents.to(latents.device).sample(picks, batch.generator)
            latents = torch.cat([latents, class_latents])
            context = torch.cat([context, self._cached_context["class"].expand(n, -1, -1)])
        noisy = backbone.make_noisy(latents, batch.generator)
        # Instance and class samples share one denoiser call.
        prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context.to(noisy.noisy.device))
        instance = denoising_loss(prediction[:n], noisy.target[:n])
        if not self.prior_preservation:
            return {"loss": instance}
        prior = denoising_loss(prediction[n:], noisy.target[n:])
        return {"loss": instance + self.prior_loss_weight * prior, "instance": instance, "prior": prior}

    def interop_files(self, backbone):
        return {"pytorch_lora_weights.safetensors": diffusers_lora_state_dict(backbone, owner_id(self.concept_name), self.rank, self.alpha)}

    def prompt(self, text: str) -> str:
        return text.replace("{%s}" % self.concept_name, self.phrase)


METHOD = DreamBoothLoRA
