"""BindWeave (arXiv 2510.00438): subject-to-video on Wan2.1-I2V from 1-4 reference pictures, an encoder method.

Three streams condition the image-to-video DiT (a `VideoCondition` set on a wan21_i2v backbone):
  - MLLM: Qwen2.5-VL's last hidden states of one chat turn [prompt, reference 1..K] (all of them, no
    truncation) -> connector Linear(3584, 4096) -> GELU(tanh) -> Linear(4096, 4096) (diffusers'
    PixArtAlphaTextProjection) -> rows put before the prompt's 512 T5 rows; the negative branch runs
    the MLLM on its own text with the same references
  - CLIP: each reference canvas through the backbone's CLIP image encoder (hidden_states[-2], 257 rows
    at ViT-H/14), the K blocks concatenated and zero-padded to 4 x 257 rows; Wan's image embedder runs
    on all of them, and only the first 257 go through the image K/V projections (the backbone's split)
  - VAE: each canvas VAE-encoded as a one-frame video with its mask in channel 0 of a 4-channel block,
    in 4 slot frames before the video's latent frames (zero input there, output dropped)
Training fine-tunes the DiT (`tune=full`, the paper's; or PEFT LoRA, `tune=lora`) and the connector on
the backbone's flow-matching loss over the video frames; the VAE, T5, CLIP and MLLM stay frozen. The
reference canvases: references.py. Card: README.md beside this file.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from conceptkit.backbones.video_condition import canvas_picture
from conceptkit.embeddings import attach_lora, owner_id
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch
from conceptkit.training.losses import denoising_loss

from .references import inference_canvas, training_canvas

SLOTS = 4  # reference slots (official: 1 to 4 references, unused slots zero)
TUNES = ("full", "lora")
REFERENCE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# The official code's MLLM negative text: Wan's default negative prompt, then this.
MLLM_NEGATIVE_SUFFIX = ", motionless, frozen, still image, no movement, stationary, unmoving"
MIN_REFERENCE_SIDE = 8  # pixels: smaller pictures hold too little to encode (ours)


class TunedWeights(nn.Module):
    """The denoiser's own parameters, held by reference under flat names, for `tune=full`: the fine-tuned
    DiT is the concept, so its weights are the method's state_dict (keys `tuned.<path with __>`)."""

    def hold(self, denoiser: nn.Module) -> None:
        for name, parameter in denoiser.named_parameters():
            self.register_parameter(name.replace(".", "__"), parameter)


class BindWeave(ConceptMethod):
    name = "bindweave"
    version = "1"
    kind = "encoder"
    families = ("wan21_i2v",)

    @classmethod
    def compose_example(cls, concept: str, name: str, prompt: str) -> str:
        """1 to 4 reference pictures in order (ref1, ref2, ...); the prompt says what they do."""
        return (f"concepts=[{concept}] references=[star.png,circle.png] "
                f"prompt=\"a star moving left slowly; a circle moving up slowly, on a plain sand background\"")

    def __init__(self, concept_name: str = "bw", tune: str = "full", lora_rank: int = 64, lora_alpha: float | None = None,
                 lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
                 mllm_stream: bool = True, clip_stream: bool = True, vae_stream: bool = True,
                 rotation: int = 45, log_scale: float = 1.5, mllm_scale: float = 0.5,
                 mllm_negative: str = "official", steps: int = 5000, lr: float = 1e-5, batch_size: int = 1,
                 accumulate: int = 1, grad_clip: float | None = 1.0, weight_decay: float = 5e-3, seed: int = 0):
        super().__init__(concept_name)
        if tune not in TUNES:
            raise UserError(f"method.tune={tune!r}: choose one of {', '.join(TUNES)}")
        if mllm_negative not in ("official", "same"):
            raise UserError(f"method.mllm_negative={mllm_negative!r}: choose official or same")
        self.tune, self.lora_rank = tune, lora_rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        self.lora_targets = list(lora_targets)
        self.mllm_stream, self.clip_stream, self.vae_stream = mllm_stream, clip_stream, vae_stream
        self.rotation, self.log_scale, self.mllm_scale = rotation, log_scale, mllm_scale
        self.mllm_negative = mllm_negative
        self.steps, self.lr, self.batch_size, self.accumulate = steps, lr, batch_size, accumulate
        self.grad_clip, self.weight_decay, self.seed = grad_clip, weight_decay, seed
        self.dims: dict[str, int] = {}  # mllm_dim, text_dim: set by initialize / import_info
        self.connector: nn.Module | None = None
        self.tuned = TunedWeights()
        self.lora = nn.ModuleDict()
        self._original: dict[str, torch.Tensor] | None = None  # tune=full: the denoiser before attach
        self._backbone = None
        self._references: dict[str, str] = {}  # reference name -> its word in prompts
        self._reference_condition = None

    # identity ---------------------------------------------------------------------------------
    def hparams(self):
        return dict(tune=self.tune, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                    lora_targets=list(self.lora_targets), mllm_stream=self.mllm_stream, clip_stream=self.clip_stream,
                    vae_stream=self.vae_stream, rotation=self.rotation, log_scale=self.log_scale,
                    mllm_scale=self.mllm_scale, mllm_negative=self.mllm_negative, steps=self.steps, lr=self.lr,
                    batch_size=self.batch_size, accumulate=self.accumulate, grad_clip=self.grad_clip,
                    weight_decay=self.weight_decay, seed=self.seed)

    def export_info(self):
        return dict(self.dims)

    def import_info(self, info):
        self.dims = {k: int(v) for k, v in info.items()}

    def max_references(self) -> int:
        return SLOTS

    # parameters -------------------------------------------------------------------------------
    def _dims(self, backbone) -> dict[str, int]:
        return {"mllm_dim": backbone.mllm().hidden_size, "text_dim": backbone.denoiser.config.text_dim}

    def _build(self) -> None:
        from diffusers.models.embeddings import PixArtAlphaTextProjection

        with torch.random.fork_rng(devices=[]):  # the connector's init is a function of the seed alone
            torch.manual_seed(self.seed)
            # Linear(mllm, text) -> GELU(tanh) -> Linear(text, text), as the official TextProjection
            self.connector = PixArtAlphaTextProjection(self.dims["mllm_dim"], self.dims["text_dim"],
                                                       out_features=self.dims["text_dim"], act_fn="gelu_tanh")

    def initialize(self, backbone, data) -> None:
        self.dims = self._dims(backbone)
        self._build()

    def attach(self, backbone) -> None:
        if backbone.family not in self.families:
            raise UserError(f"bindweave runs on a wan21_i2v backbone, not {backbone.family}")
        if not self.dims:
            self.dims = self._dims(backbone)
        if self.connector is None:
            self._build()
        self.connector.to(backbone.device)
        if self.tune == "full":
            # Kept to restore on detach: the concept's DiT replaces the backbone's own weights in place.
            # On the CPU: a second copy of a 14B DiT would not fit beside it on the accelerator.
            self._original = {k: v.detach().to("cpu", copy=True) for k, v in backbone.denoiser.state_dict().items()}
            self.tuned.hold(backbone.denoiser)
        else:
            attach_lora(self.lora, backbone, owner_id(self.concept_name), self.lora_rank, self.lora_alpha,
                        self.lora_targets, init=True)
        self._backbone = backbone

    def detach(self, backbone) -> None:
        backbone.set_condition(owner_id(self.concept_name), None)
        if self.tune == "full":
            if self._original is not None:
                with torch.no_grad():
                    backbone.denoiser.load_state_dict(self._original)
                backbone.denoiser.requires_grad_(False)
            self._original = None
            self.tuned = TunedWeights()
        else:
            backbone.remove_lora(owner_id(self.concept_name))
        self._backbone = None

    # the three streams ------------------------------------------------------------------------
    def condition_for(self, backbone, canvases: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        """A VideoCondition for rows of references, each row a list of (canvas, mask) (1 row: shared by
        every prompt)."""
        from conceptkit.backbones.video_condition import VideoCondition

        encoder = backbone.image_encoder()
        rows = backbone.image_rows
        slot_rows, image_rows = [], []
        for references in canvases:
            slots = torch.zeros(SLOTS, *backbone.slot_shape(), device=backbone.device)
            image = torch.zeros(SLOTS * rows, encoder.grid_dim, device=backbone.device)
            if references:
                stacked = torch.stack([canvas for canvas, _ in references])
                with torch.no_grad():
                    if self.vae_stream:
                        slots[: len(references)] = backbone.reference_slots(
                            stacked, torch.stack([mask for _, mask in references]))
                    if self.clip_stream:
                        grid = encoder.encode((stacked + 1) / 2).grid  # (K, rows, D)
                        image[: grid.shape[0] * rows] = grid.flatten(0, 1).to(image.device)
            slot_rows.append(slots)
            image_rows.append(image)
        pictures = [[canvas_picture(c, self.mllm_scale) for c, _ in references] for references in canvases]
        prefix = self._text_prefix(backbone, pictures) if self.mllm_stream else None
        return VideoCondition(torch.stack(slot_rows), torch.stack(image_rows), prefix)

    def _text_prefix(self, backbone, pictures: list[list[np.ndarray]]):
        """texts, unconditional flags -> the connector's rows of the MLLM states of each text with its
        row's references (one row of references: shared). MLLM passes are cached per (row, text)."""
        cache: dict[tuple[int, str], torch.Tensor] = {}

        def prefix(texts: list[str], unconditional: list[bool]) -> list[torch.Tensor]:
            mllm = backbone.mllm()
            out = []
            for i, (text, negative) in enumerate(zip(texts, unconditional)):
                if negative and self.mllm_negative == "official":
                    text = text + MLLM_NEGATIVE_SUFFIX
                row = i % len(pictures)
                if (row, text) not in cache:
                    cache[(row, text)] = mllm.states(text, pictures[row])
                states = cache[(row, text)].to(self.connector.linear_1.weight.device)
                out.append(self.connector(states))
            return out

        return prefix

    # training ---------------------------------------------------------------------------------
    def stages(self, backbone):
        return [Stage("dit", steps=self.steps, lr=self.lr, batch_size=self.batch_size, accumulate=self.accumulate,
                      grad_clip=self.grad_clip, weight_decay=self.weight_decay)]

    def begin_stage(self, stage, backbone):
        self.requires_grad_(True)

    def training_canvases(self, batch: TrainBatch, backbone) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        size = backbone.resolution
        rows = []
        for item in batch.items:
            objects = list(item.objects)
            if len(objects) > SLOTS:  # the official extractor keeps a random 4
                keep = torch.randperm(len(objects), generator=batch.generator)[:SLOTS].sort().values
                objects = [objects[int(k)] for k in keep]
            rows.append([training_canvas(item.image, obj.mask, size, size, batch.generator, self.rotation,
                                         self.log_scale) for obj in objects])
        return rows

    def training_loss(self, batch: TrainBatch, backbone, stage):
        from conceptkit.corpus import scene_pixels

        if batch.items is None:
            raise RuntimeError("bindweave trains on a corpus (TrainBatch.items)")
        items = batch.items
        pixels = scene_pixels(items, backbone.resolution)  # (B, 3, F, H, W) in [-1, 1]
        with torch.no_grad():
            latents = backbone.encode_media(pixels).sample(torch.arange(len(items)), batch.generator)
        owner = owner_id(self.concept_name)
        backbone.set_condition(owner, self.condition_for(backbone, self.training_canvases(batch, backbone)))
        try:
            noisy = backbone.make_noisy(latents, batch.generator)
            context, _ = backbone.encode_text([item.caption for item in items])
            prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
        finally:
            backbone.set_condition(owner, None)
        return {"loss": denoising_loss(prediction, noisy.target),
                "references": torch.tensor(float(sum(len(i.objects) for i in items)))}

    # inference --------------------------------------------------------------------------------
    def set_references(self, backbone, pictures: dict, words: dict | None = None) -> None:
        """Condition on {name: (H, W, 3) uint8 picture}, 1 to 4, in slot order. A prompt may name a
        reference as {name} (rendered as its word, default the name); it need not."""
        if len(pictures) > SLOTS:
            raise UserError(f"{len(pictures)} references, but bindweave takes at most {SLOTS} (its reference slots)")
        for name, picture in pictures.items():
            if not REFERENCE_NAME.match(name):
                raise UserError(f"references: {name!r} is not a name; use letters, digits and _")
            picture = np.asarray(picture)
            if picture.ndim != 3 or picture.shape[2] != 3 or min(picture.shape[:2]) < MIN_REFERENCE_SIDE:
                raise UserError(f"references.{name}: a picture of shape {picture.shape} cannot be a reference; pass an "
                                f"RGB image at least {MIN_REFERENCE_SIDE} pixels on each side")
        words = words or {}
        self._references = {name: words.get(name, name.replace("_", " ")) for name in pictures}
        owner = owner_id(self.concept_name)
        if not pictures:
            backbone.set_condition(owner, None)
            return
        size = backbone.resolution
        canvases = [inference_canvas(np.asarray(p), size, size) for p in pictures.values()]
        backbone.set_condition(owner, self.condition_for(backbone, [canvases]))

    def prompt(self, text: str) -> str:
        for name, word in self._references.items():
            text = text.replace("{%s}" % name, word)
        return text

    def sample_prompts(self):
        return []  # nothing to render without references (compose gives them)


METHOD = BindWeave
