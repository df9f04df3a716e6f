"""Textual Inversion (Gal et al., 2022): learned input-embedding vectors for one placeholder token.

The text encoder and denoiser stay frozen; only the placeholder's n vectors train, on template
prompts ("a photo of a <concept>", ...). Defaults follow diffusers' textual_inversion example;
see README.md beside this file for each value's source.
"""

from __future__ import annotations

import torch
from torch import nn

from conceptkit.embeddings import owner_id, vocabulary_statistics_init, word_init
from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData
from conceptkit.training.losses import denoising_loss

# Our own wording of the usual "a photo of a {}" template family.
TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of my {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a good photo of a {}", "a photo of one {}", "a rendition of the {}", "a photo of the small {}",
]


class TextualInversion(ConceptMethod):
    name = "textual_inversion"
    version = "1"

    def __init__(self, concept_name: str = "concept", num_vectors: int = 1, init_word: str | None = "object",
                 steps: int = 3000, lr: float = 5e-4, scale_lr: bool = True, batch_size: int = 1,
                 accumulate: int = 4, grad_clip: float | None = None, weight_decay: float = 1e-2):
        super().__init__(concept_name)
        self.num_vectors = num_vectors
        self.init_word = init_word
        self.steps, self.lr, self.scale_lr = steps, lr, scale_lr
        self.batch_size, self.accumulate = batch_size, accumulate
        self.grad_clip, self.weight_decay = grad_clip, weight_decay
        self.vectors: nn.Parameter | None = None

    def hparams(self):
        return dict(num_vectors=self.num_vectors, init_word=self.init_word, steps=self.steps, lr=self.lr,
                    scale_lr=self.scale_lr, batch_size=self.batch_size, accumulate=self.accumulate,
                    grad_clip=self.grad_clip, weight_decay=self.weight_decay)

    @property
    def token(self) -> str:
        return f"<{self.concept_name}>"

    def token_names(self):
        return [self.token]

    def initialize(self, backbone, data: TrainingData) -> None:
        if self.init_word:
            init = word_init(backbone, self.init_word, self.num_vectors)
        else:
            init = vocabulary_statistics_init(backbone, self.num_vectors, torch.Generator().manual_seed(0))
        self.vectors = nn.Parameter(init)

    def attach(self, backbone) -> None:
        if self.vectors is None:
            dim = backbone.text_embedding_matrix().shape[1]
            self.vectors = nn.Parameter(torch.zeros(self.num_vectors, dim))
        backbone.tokens.register(owner_id(self.concept_name), self.token, self.vectors)

    def detach(self, backbone) -> None:
        backbone.tokens.unregister(owner_id(self.concept_name))

    def stages(self, backbone):
        # diffusers scales the base lr by batch size x accumulation (x GPUs) when --scale_lr is set.
        lr = self.lr * self.batch_size * self.accumulate if self.scale_lr else self.lr
        return [Stage("embedding", steps=self.steps, lr=lr, batch_size=self.batch_size, accumulate=self.accumulate,
                      grad_clip=self.grad_clip, weight_decay=self.weight_decay)]

    def begin_stage(self, stage, backbone):
        self.vectors.requires_grad_(True)

    def training_loss(self, batch: TrainBatch, backbone, stage):
        picks = torch.randint(0, len(TEMPLATES), (len(batch.indices),), generator=batch.generator)
        prompts = [TEMPLATES[int(p)].format(self.token) for p in picks]
        latents = batch.data.latents.sample(batch.indices, batch.generator)
        noisy = backbone.make_noisy(latents, batch.generator)
        context, _ = backbone.encode_text(prompts)
        prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
        loss = denoising_loss(prediction, noisy.target)
        return {"loss": loss}

    def interop_files(self, backbone):
        # diffusers' load_textual_inversion format: {token: (num_vectors, dim)}
        return {"learned_embeds.safetensors": {self.token: self.vectors.detach().cpu().contiguous()}}

    def prompt(self, text: str) -> str:
        return text.replace("{%s}" % self.concept_name, self.token)


METHOD = TextualInversion
