"""ConceptPrism (arXiv 2602.19575): a target token shared by all reference images plus a group of
residual vectors per image; a cross-image exclusion loss pushes what the images share out of the
residuals and into the target; then LoRA. Inference uses the target token only.

Stage 1 ("tokens", frozen backbone):
    L = L_rec + beta * L_excl
    L_rec  = MSE(eps_hat(z_t^i, "<target> <residual_i>"), eps)
    L_excl = mean over K anchors j != i of MSE(eps_hat(z_t^j, "<residual_i>"), sg[eps_hat(z_t^j, "")])
    Each anchor has its own posterior sample, noise and timestep; the residual and null predictions of
    an anchor share them. The K null predictions are targets: by default (`null_predictions=no_grad`,
    as the official code) they run in their own call under no_grad, so backward covers K + 1 rows;
    `null_predictions=batched` runs all 2K + 1 rows as one denoiser call (one launch, larger graph).
Stage 2 ("lora"): L_rec only, LoRA on to_q/to_k/to_v/to_out.0, tokens frozen (option: co-train).
Defaults from the official code; see README.md beside this file for every value's source.
"""

from __future__ import annotations

import torch
from torch import nn

from conceptkit.embeddings import (attach_lora, diffusers_lora_state_dict, mean_text_output, owner_id,
                                   vocabulary_statistics_init)
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData
from conceptkit.methods.conceptprism.losses import exclusion_loss, sample_others
from conceptkit.training.losses import denoising_loss


# How the exclusion loss's null predictions run (identical losses and gradients; speed differs):
# no_grad: a second denoiser call without autograd (the official code); batched: one call of 2K + 1 rows.
NULL_PREDICTIONS = ("no_grad", "batched")


class ConceptPrism(ConceptMethod):
    name = "conceptprism"
    version = "1"

    def __init__(self, concept_name: str = "concept", residual_vectors: int = 8, anchors: int = 3,
                 beta: float = 0.05, token_steps: int = 200, token_lr: float = 5e-4, lora_steps: int = 200,
                 lora_lr: float = 4e-4, lora_accumulate: int = 4, lora_rank: int = 4, lora_alpha: float = 4.0,
                 lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                 cotrain_tokens: bool = False, grad_clip: float | None = 1.0, weight_decay: float = 1e-2,
                 init_seed: int = 0, fallback_caption: str = "a photo", null_predictions: str = "no_grad"):
        super().__init__(concept_name)
        self.residual_vectors, self.anchors, self.beta = residual_vectors, anchors, beta
        self.token_steps, self.token_lr = token_steps, token_lr
        self.lora_steps, self.lora_lr, self.lora_accumulate = lora_steps, lora_lr, lora_accumulate
        self.lora_rank, self.lora_alpha, self.lora_targets = lora_rank, float(lora_alpha), list(lora_targets)
        self.cotrain_tokens = cotrain_tokens
        self.grad_clip, self.weight_decay = grad_clip, weight_decay
        self.init_seed = init_seed
        self.fallback_caption = fallback_caption
        if null_predictions not in NULL_PREDICTIONS:
            raise UserError(f"method.null_predictions={null_predictions!r}: choose one of {', '.join(NULL_PREDICTIONS)}")
        self.null_predictions = null_predictions
        self.num_images = 0
        self.target: nn.Parameter | None = None
        self.residuals = nn.ParameterList()
        self.lora = nn.ModuleDict()
        self._null_context = None
        self._reconstruction_context = None

    # identity --------------------------------------------------------------------------------
    def hparams(self):
        return dict(residual_vectors=self.residual_vectors, anchors=self.anchors, beta=self.beta,
                    token_steps=self.token_steps, token_lr=self.token_lr, lora_steps=self.lora_steps,
                    lora_lr=self.lora_lr, lora_accumulate=self.lora_accumulate, lora_rank=self.lora_rank,
                    lora_alpha=self.lora_alpha, lora_targets=list(self.lora_targets),
                    cotrain_tokens=self.cotrain_tokens, grad_clip=self.grad_clip, weight_decay=self.weight_decay,
                    init_seed=self.init_seed, fallback_caption=self.fallback_caption,
                    null_predictions=self.null_predictions)

    def export_info(self):
        return {"num_images": self.num_images}

    def import_info(self, info):
        self.num_images = int(info["num_images"])

    @property
    def target_token(self) -> str:
        return f"<{self.concept_name}>"

    def residual_token(self, i: int) -> str:
        return f"<{self.concept_name}/r{i}>"

    def token_names(self):
        return [self.target_token] + [self.residual_token(i) for i in range(self.num_images)]

    # wiring ----------------------------------------------------------------------------------
    def initialize(self, backbone, data: TrainingData) -> None:
        if data.count < 2:
            raise UserError(
                f"conceptprism needs at least 2 reference images (the exclusion loss pairs image i with "
                f"images j != i); data.images has {data.count}"
            )
        self.num_images = data.count
        generator = torch.Generator().manual_seed(self.init_seed)
        self.target = nn.Parameter(vocabulary_statistics_init(backbone, 1, generator))
        # Residual group i starts as the mean text-encoder OUTPUT of image i's caption, the same vector
        # in all of its slots (official code). Registering tokens first is not needed: captions are plain text.
        self.residuals = nn.ParameterList([
            nn.Parameter(mean_text_output(backbone, caption or self.fallback_caption)
                         .unsqueeze(0).repeat(self.residual_vectors, 1))
            for caption in data.captions
        ])

    def attach(self, backbone) -> None:
        dim = backbone.text_embedding_matrix().shape[1]
        if self.target is None:
            if self.num_images < 2:
                raise UserError("conceptprism concept has no images recorded; the artifact is incomplete")
            self.target = nn.Parameter(torch.zeros(1, dim))
            self.residuals = nn.ParameterList([nn.Parameter(torch.zeros(self.residual_vectors, dim))
                                               for _ in range(self.num_images)])
        owner = owner_id(self.concept_name)
        backbone.tokens.register(owner, self.target_token, self.target)
        for i, vectors in enumerate(self.residuals):
            backbone.tokens.register(owner, self.residual_token(i), vectors)
        if self.lora_steps > 0:
            # Gaussian-A / zero-B init: the adapter changes nothing until stage 2 trains it.
            attach_lora(self.lora, backbone, owner, self.lora_rank, self.lora_alpha, self.lora_targets,
                        init="gaussian")

    def detach(self, backbone) -> None:
        owner = owner_id(self.concept_name)
        backbone.tokens.unregister(owner)
        backbone.remove_lora(owner)

    # training --------------------------------------------------------------------------------
    def stages(self, backbone):
        stages = [Stage("tokens", steps=self.token_steps, lr=self.token_lr, grad_clip=self.grad_clip,
                        weight_decay=self.weight_decay)]
        if self.lora_steps > 0:
            stages.append(Stage("lora", steps=self.lora_steps, lr=self.lora_lr, accumulate=self.lora_accumulate,
                                grad_clip=self.grad_clip, weight_decay=self.weight_decay))
        return stages

    def _reconstruction_prompt(self, i: int) -> str:
        return f"{self.target_token} {self.residual_token(i)}"

    def begin_stage(self, stage, backbone):
        tokens_train = stage.name == "tokens" or self.cotrain_tokens
        self.target.requires_grad_(tokens_train)
        self.residuals.requires_grad_(tokens_train)
        self.lora.requires_grad_(stage.name == "lora")
        with torch.no_grad():
            self._null_context = backbone.encode_text([""])[0]
            self._reconstruction_context = None
            if not tokens_train:
                # Frozen tokens: every reconstruction prompt's encoding is fixed, so encode them once.
                prompts = [self._reconstruction_prompt(i) for i in range(self.num_images)]
                self._reconstruction_context = backbone.encode_text(prompts)[0]

    def training_loss(self, batch: TrainBatch, backbone, stage):
        if stage.name == "tokens":
            return self._token_stage_loss(batch, backbone)
        return self._lora_stage_loss(batch, backbone)

    def _token_stage_loss(self, batch: TrainBatch, backbone):
        data, generator = batch.data, batch.generator
        indices = [int(i) for i in batch.indices]
        anchors = [sample_others(i, data.count, self.anchors, generator) for i in indices]
        anchor_index = [j for group in anchors for j in group]
        owners = [i for i, group in zip(indices, anchors) for _ in group]  # residual i applied to anchor j
        latents = data.latents.sample(torch.tensor(indices + anchor_index), generator)
        noisy = backbone.make_noisy(latents, generator)  # own noise and timestep per row
        n, k = len(indices), len(anchor_index)
        rec_prompts = [self._reconstruction_prompt(i) for i in indices]
        residual_prompts = [self.residual_token(i) for i in owners]
        context, _ = backbone.encode_text(rec_prompts + residual_prompts)
        null = self._null_context.expand(k, -1, -1).to(context.device)
        if self.null_predictions == "batched":
            # One denoiser call: [reconstruction | residual_i on z_j | null on the same z_j].
            model_input = torch.cat([noisy.noisy, noisy.noisy[n:]])
            timesteps = torch.cat([noisy.timesteps, noisy.timesteps[n:]])
            prediction = backbone.denoise(model_input, timesteps, torch.cat([context, null]))
            rec_pred, residual_pred, null_pred = prediction.split([n, k, k])
        else:
            # The null rows are stop-gradient targets: computing them outside the graph keeps their
            # activations out of memory and their rows out of backward.
            with torch.no_grad():
                null_pred = backbone.denoise(noisy.noisy[n:], noisy.timesteps[n:], null)
            rec_pred, residual_pred = backbone.denoise(noisy.noisy, noisy.timesteps, context).split([n, k])
        rec = denoising_loss(rec_pred, noisy.target[:n])
        excl = exclusion_loss(residual_pred, null_pred)
        return {"loss": rec + self.beta * excl, "rec": rec, "excl": excl}

    def _lora_stage_loss(self, batch: TrainBatch, backbone):
        indices = batch.indices
        latents = batch.data.latents.sample(indices, batch.generator)
        noisy = backbone.make_noisy(latents, batch.generator)
        if self._reconstruction_context is not None:
            context = self._reconstruction_context[indices.to(self._reconstruction_context.device, non_blocking=True)]
        else:
            context = backbone.encode_text([self._reconstruction_prompt(int(i)) for i in indices])[0]
        prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context.to(noisy.noisy.device))
        rec = denoising_loss(prediction, noisy.target)
        return {"loss": rec, "rec": rec}

    # inference -------------------------------------------------------------------------------
    def interop_files(self, backbone):
        # The inference parts only: the target token (textual-inversion format) and the LoRA.
        files = {"learned_embeds.safetensors": {self.target_token: self.target.detach().cpu().contiguous()}}
        if self.lora_steps > 0:
            files["pytorch_lora_weights.safetensors"] = diffusers_lora_state_dict(backbone, owner_id(self.concept_name), self.lora_rank, self.lora_alpha)
        return files

    def prompt(self, text: str) -> str:
        """`{name}` -> the target token; `{name/r3}` -> residual group 3 alone (the paper's check)."""
        for i in range(self.num_images):
            text = text.replace("{%s/r%d}" % (self.concept_name, i), self.residual_token(i))
        return text.replace("{%s}" % self.concept_name, self.target_token)


METHOD = ConceptPrism
