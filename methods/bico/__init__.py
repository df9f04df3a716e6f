"""BiCo (arXiv 2512.09824): bind a visual concept to prompt tokens with hierarchical binders.

The backbone stays frozen. The concept is a set of binders (binders.py) that edit the text context of
every cross-attention site, after the backbone's own text projection (Wan2.1: the output of
`condition_embedder.text_embedder`, which is what each block's attn2 receives; SD1.5: the text
encoder's output), through conceptkit's attention `context` hooks:
    one global binder, for every site, and one binder per cross-attention site (Wan: per DiT block).

Where binders act (a (B, L) mask over the context, read from the rows the backbone declares):
  - training: every real token of the diversified training prompt except BOS/EOS (official);
  - inference: only the positions of this concept's token `<name>` (what `{name}` renders to: the
    concept's description, through token rows equal to the description words' own embeddings, so the
    text encoder sees exactly the description); never the unconditional (negative) rows of a guided
    batch. Several BiCo concepts in one prompt therefore each bind only their own tokens.

Training: the absorbent token (one learned vector, N(0, 1)) replaces the EOS slot of the projected
context in every training row; two stages, `global` (global binder + absorbent; the per-block
binders are skipped, as in the official code) then `all`, each with its own timestep sampling
(schedule.py). Loss: the backbone's denoising MSE.

Video concepts (clips, `data.frames` > 1) train with temporal disentanglement: every binder is a
dual-branch binder (binders.py); stage 1 (`frames_global`, `frames_all`) trains their spatial
branches on the clip's frames as images (temporal.py) with per-frame prompts (diversify.py), stage 2
(`clip_global`, `clip_all`) starts each motion branch as a copy of its spatial branch and trains
the gated mix on whole clips. See README.md beside this file for every default's source, the
deviations, and what is not implemented yet.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from conceptkit.embeddings import owner_id
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData
from conceptkit.methods.bico.binders import GATES, Binder, DualBranchBinder, SiteBinderHook, bind, write_absorbent
from conceptkit.methods.bico.diversify import diversified_prompts, per_frame_prompts
from conceptkit.methods.bico.schedule import SIDES, opposite, side_timesteps
from conceptkit.methods.bico.temporal import frame_images, frames_as_images
from conceptkit.training.losses import denoising_loss


CLIP_VIEWS = 4  # frames of a video source shown to the VLM for its clip-level prompts [ours]


def stage_phase(stage_name: str) -> str:
    """"global" or "all": `global`, `all`, `frames_global`, `clip_all`, ... -> the binders it trains."""
    return stage_name.rsplit("_", 1)[-1]


def on_frames(stage_name: str) -> bool:
    """Stage 1 of a video concept: the clip's frames as images."""
    return stage_name.startswith("frames_")


class BiCo(ConceptMethod):
    name = "bico"
    version = "2"  # 2: temporal disentanglement (video concepts hold dual-branch binders)

    def __init__(self, concept_name: str = "concept", description: str | None = None,
                 prompts: list[str] | None = None, prompt_count: int = 60, vlm: str | None = None,
                 per_block_binders: bool = True, absorbent: bool = True, global_steps: int = 120,
                 all_steps: int = 180, lr: float = 1e-4, weight_decay: float = 1e-2, batch_size: int = 1,
                 accumulate: int = 8, grad_clip: float | None = None, timestep_boundary: float = 417.0,
                 global_stage_favours: str = "low", favoured_fraction: float = 0.8, two_stage: bool = True,
                 temporal_disentanglement: bool = True, gate: str = "sigmoid", frame_prompts: list[str] | None = None,
                 frame_global_steps: int = 162, frame_all_steps: int = 243,
                 gradient_checkpointing: bool = False, init_seed: int = 0):
        super().__init__(concept_name)
        self.description, self.prompts, self.prompt_count, self.vlm = description, prompts, prompt_count, vlm
        self.per_block_binders, self.use_absorbent = per_block_binders, absorbent
        self.global_steps, self.all_steps, self.lr, self.weight_decay = global_steps, all_steps, lr, weight_decay
        self.batch_size, self.accumulate, self.grad_clip = batch_size, accumulate, grad_clip
        self.timestep_boundary, self.global_stage_favours = float(timestep_boundary), global_stage_favours
        self.favoured_fraction, self.two_stage = favoured_fraction, two_stage
        self.temporal_disentanglement, self.gate, self.frame_prompts = temporal_disentanglement, gate, frame_prompts
        self.frame_global_steps, self.frame_all_steps = frame_global_steps, frame_all_steps
        self.gradient_checkpointing = gradient_checkpointing
        self.init_seed = init_seed
        if global_stage_favours not in SIDES:
            raise UserError(f"method.global_stage_favours must be one of {', '.join(SIDES)}, got {global_stage_favours!r}")
        if not 0.0 <= favoured_fraction <= 1.0:
            raise UserError(f"method.favoured_fraction must be in [0, 1], got {favoured_fraction}")
        if gate not in GATES:
            raise UserError(f"method.gate must be one of {', '.join(GATES)}, got {gate!r}")
        # data-derived (export_info): the phrase `{name}` renders to, and the resolved training prompts
        self.resolved_description: str | None = description
        self.training_prompts: list[str] = list(prompts or [])
        self.clip_frames = 1  # frames per training clip (1: an image concept)
        self.frame_training_prompts: list[list[str]] = []  # per frame of the clips: its stage-1 candidates
        self._frame_data: TrainingData | None = None  # the clips' frames as images (stage 1; training only)
        self.global_binder: Binder | DualBranchBinder | None = None
        self.block_binders = nn.ModuleList()
        self.absorbent_token: nn.Parameter | None = None
        self._backbone = None
        self._site_index: dict[str, int] = {}
        self._training_rows = False  # set around training denoiser calls: whole-prompt mask + absorbent
        self._global_only = False  # a `global` stage: training rows skip the per-block binders (official)
        self._spatial_only = False  # stage 1 of a video concept: dual binders act through their spatial branch
        self._checkpointing_was: bool | None = None

    # identity --------------------------------------------------------------------------------
    def hparams(self):
        return dict(description=self.description, prompts=None if self.prompts is None else list(self.prompts),
                    prompt_count=self.prompt_count, vlm=self.vlm, per_block_binders=self.per_block_binders,
                    absorbent=self.use_absorbent, global_steps=self.global_steps, all_steps=self.all_steps,
                    lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                    accumulate=self.accumulate, grad_clip=self.grad_clip, timestep_boundary=self.timestep_boundary,
                    global_stage_favours=self.global_stage_favours, favoured_fraction=self.favoured_fraction,
                    two_stage=self.two_stage, temporal_disentanglement=self.temporal_disentanglement, gate=self.gate,
                    frame_prompts=None if self.frame_prompts is None else list(self.frame_prompts),
                    frame_global_steps=self.frame_global_steps, frame_all_steps=self.frame_all_steps,
                    gradient_checkpointing=self.gradient_checkpointing, init_seed=self.init_seed)

    def export_info(self):
        info = {"description": self.resolved_description, "training_prompts": list(self.training_prompts),
                "clip_frames": self.clip_frames}
        if self.frame_training_prompts:
            info["frame_prompts"] = [list(p) for p in self.frame_training_prompts]
        return info

    def import_info(self, info):
        self.resolved_description = info.get("description")
        self.training_prompts = [str(p) for p in info.get("training_prompts", [])]
        # Artifacts before method version 2 hold no clip_frames: image concepts, or clips trained whole.
        self.clip_frames = int(info.get("clip_frames", 1))
        self.frame_training_prompts = [[str(p) for p in ps] for ps in info.get("frame_prompts", [])]

    @property
    def disentangles(self) -> bool:
        """A video concept trained with temporal disentanglement: dual-branch binders, four stages."""
        return self.temporal_disentanglement and self.clip_frames > 1

    @property
    def token(self) -> str:
        return f"<{self.concept_name}>"

    def token_names(self):
        return [self.token]

    # wiring ----------------------------------------------------------------------------------
    def initialize(self, backbone, data: TrainingData) -> None:
        if data.frames > 1 and not backbone.is_video:
            raise UserError(f"data.images holds video clips, but backbone {backbone.family} is image-only; "
                            f"use backbone=wan21 for video concepts")
        self.clip_frames = data.frames
        caption = next((c for c in data.captions if c), None)
        self.resolved_description = self.description or caption or re.sub(r"[_\-]+", " ", self.concept_name)
        if self.frame_prompts and not self.disentangles:
            warnings.warn("method.frame_prompts is set, but only video concepts trained with temporal "
                          "disentanglement train on frames; it is not used", stacklevel=2)
        self._write_prompts(backbone, data, caption)
        if self.disentangles:
            self._frame_data = frames_as_images(backbone, data)
        self._build(backbone)
        generator = torch.Generator().manual_seed(self.init_seed)
        with torch.no_grad():
            self.absorbent_token.copy_(torch.randn(self.absorbent_token.shape, generator=generator))

    def _write_prompts(self, backbone, data: TrainingData, caption: str | None) -> None:
        """The clip-level training prompts and, for a video concept, the per-frame ones. The VLM, when
        it writes any of them, is loaded once here, asked for both, and released before training."""
        clip_by_vlm = bool(self.vlm) and not self.prompts
        frames_by_vlm = bool(self.vlm) and self.disentangles and not self.frame_prompts
        vlm = None
        if clip_by_vlm or frames_by_vlm:
            from conceptkit.captioning import load_vlm

            vlm = load_vlm(self.vlm, setting="method.vlm")
        try:
            image = clip = None
            if clip_by_vlm and data.frames > 1:
                clip = self._clip_views(backbone, data)  # a video source: the VLM sees the clip, motion included
            elif clip_by_vlm:
                image = self._first_frame(backbone, data)
            self.training_prompts = diversified_prompts(self.resolved_description, caption, self.prompt_count, vlm,
                                                        image=image, own=self.prompts, clip=clip)
            if self.disentangles:
                images = frame_images(data) if frames_by_vlm else None
                self.frame_training_prompts = per_frame_prompts(self.resolved_description, data.captions,
                                                                data.frames, vlm, images=images,
                                                                own=self.frame_prompts, clip_prompts=self.prompts)
        finally:
            if vlm is not None:
                vlm.release()

    @staticmethod
    def _clip_views(backbone, data: TrainingData, count: int = CLIP_VIEWS) -> list:
        """`count` evenly spaced frames (first and last included) of the first clip, as PIL images: from
        the clip's pixels when the data holds them (no VAE round trip), else decoded from its latents."""
        from PIL import Image

        if data.pixels is not None:
            pixels = (data.pixels[0] + 1) / 2  # (3, F, H, W), [-1, 1] -> [0, 1]
        else:
            pixels = backbone.decode(data.latents.mean[:1].to(backbone.device))[0]
        picks = torch.linspace(0, pixels.shape[1] - 1, min(count, pixels.shape[1])).round().long()
        return [Image.fromarray((pixels[:, k].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
                for k in picks.tolist()]

    @staticmethod
    def _first_frame(backbone, data: TrainingData):
        """The source's first frame as a PIL image, decoded from the cached latents (the VLM's input)."""
        from PIL import Image

        latent = data.latents.mean[:1]
        if latent.ndim == 5:
            latent = latent[:, :, :1]
        pixels = backbone.decode(latent.to(backbone.device))[0, :, 0]
        return Image.fromarray((pixels.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())

    def _cross_sites(self, backbone):
        sites = [s for s in backbone.attention_sites() if s.kind == "cross"]
        if not sites:
            raise UserError(f"backbone {backbone.family} has no cross-attention sites for BiCo's binders")
        widths = {s.context_dim for s in sites}
        if len(widths) != 1:
            raise UserError(f"BiCo needs one context width over all cross-attention sites, got {sorted(widths)}")
        return sites

    def _build(self, backbone) -> None:
        """Binders at their initial values (scale 0: identity), seeded so runs reproduce. A video concept's
        binders are dual-branch from the start, so its parameters (and artifact keys) never change shape
        between stages: a resumed run restores any stage's snapshot as it is."""
        sites = self._cross_sites(backbone)
        dim = sites[0].context_dim

        def binder():
            return DualBranchBinder(Binder(dim), gate=self.gate) if self.disentangles else Binder(dim)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            self.global_binder = binder()
            self.block_binders = nn.ModuleList([binder() for _ in sites] if self.per_block_binders else [])
        self.absorbent_token = nn.Parameter(torch.zeros(dim)) if self.use_absorbent else None

    def attach(self, backbone) -> None:
        if not self.resolved_description:
            raise UserError(f"bico concept {self.concept_name!r} has no description recorded; the artifact is incomplete")
        if self.global_binder is None:
            self._build(backbone)
        self.to(backbone.device)
        owner = owner_id(self.concept_name)
        backbone.tokens.register(owner, self.token, self._description_rows(backbone))
        sites = self._cross_sites(backbone)
        self._site_index = {s.name: i for i, s in enumerate(sites)}
        for i, site in enumerate(sites):
            backbone.hooks.add(owner, SiteBinderHook(self, i), selector=lambda s, name=site.name: s.name == name)
        self._backbone = backbone

    def detach(self, backbone) -> None:
        owner = owner_id(self.concept_name)
        backbone.hooks.remove(owner)
        backbone.tokens.unregister(owner)
        if self._checkpointing_was is not None:
            self._set_checkpointing(backbone, self._checkpointing_was)
            self._checkpointing_was = None
        self._backbone = None

    def _description_rows(self, backbone) -> torch.Tensor:
        """The description words' own input-embedding rows: `<name>` encodes exactly as the description
        would, but its positions are known (reserved ids) so the binders can find them."""
        ids = backbone.tokenizer(self.resolved_description, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"method.description {self.resolved_description!r} has no tokens; give a few words")
        return backbone.text_embedding_matrix()[torch.tensor(ids)].detach().clone()

    # the context hook's work -------------------------------------------------------------------
    def positions(self, rows, backbone) -> torch.Tensor:
        """(B, L) bool: where this concept's binders act for these context rows."""
        if self._training_rows:
            mask = rows.attention_mask.bool().clone()
            mask[torch.arange(mask.shape[0]), rows.eos_index] = False
            if backbone.tokens.has_bos:
                mask[:, 0] = False
        else:
            reserved = torch.tensor(list(backbone.tokens.reserved_ids(self.token)))
            mask = torch.isin(rows.input_ids, reserved)
        return mask & ~rows.unconditional.unsqueeze(1)

    def bind_context(self, context: torch.Tensor, binder_index: int) -> torch.Tensor:
        backbone = self._backbone
        rows = backbone.hooks.rows
        if rows is None or tuple(rows.input_ids.shape) != tuple(context.shape[:2]):
            got = None if rows is None else tuple(rows.input_ids.shape)
            raise RuntimeError(f"BiCo needs the token rows of the context {tuple(context.shape[:2])} (declared: {got}); "
                               f"encode it with backbone.encode_text or declare them with backbone.hooks.declare_rows")
        if self._training_rows and self.absorbent_token is not None:
            context = write_absorbent(context, rows.eos_index, self.absorbent_token)
        mask = self.positions(rows, backbone)
        if not mask.any():
            return context  # nothing of this concept here (e.g. a prompt without {name}): untouched
        block = None
        if self.per_block_binders and not (self._training_rows and self._global_only):
            block = self._acting(self.block_binders[binder_index])
        return bind(context, mask, self._acting(self.global_binder), block)

    def _acting(self, binder: nn.Module) -> nn.Module:
        # Stage 1 of a video concept trains (and previews) the spatial branch alone: the official
        # stage-1 binder is a plain binder, which the spatial branch of stage 2 inherits.
        return binder.spatial if self._spatial_only else binder

    # training --------------------------------------------------------------------------------
    def stages(self):
        common = dict(lr=self.lr, batch_size=self.batch_size, accumulate=self.accumulate, grad_clip=self.grad_clip,
                      weight_decay=self.weight_decay)
        # (prefix, global steps, all steps): images (and clips trained whole) one pair; video concepts
        # first the frames (stage 1), then the clip (stage 2), each its own global -> all schedule,
        # as the official code runs its training script twice.
        plan = [("", self.global_steps, self.all_steps)]
        if self.disentangles:
            plan = [("frames_", self.frame_global_steps, self.frame_all_steps),
                    ("clip_", self.global_steps, self.all_steps)]
        if not self.two_stage:
            # The paper's "w/o two-stage" ablation: every binder from the first step, for the same
            # total budget, timesteps from the backbone's own distribution (no favoured side).
            return [Stage(prefix + "all", steps=global_steps + all_steps, **common) for prefix, global_steps, all_steps in plan]
        stages = []
        for prefix, global_steps, all_steps in plan:
            stages.append(Stage(prefix + "global", steps=global_steps, **common))
            if self.per_block_binders and all_steps > 0:
                stages.append(Stage(prefix + "all", steps=all_steps, **common))
        return stages

    def stage_data(self, stage, data):
        if not (self.disentangles and on_frames(stage.name)):
            return data
        if self._frame_data is None:
            raise RuntimeError("BiCo's frame stages train on the frames made in initialize(); call it first")
        return self._frame_data

    def begin_stage(self, stage, backbone):
        phase = stage_phase(stage.name)
        if self.disentangles and stage.name == ("clip_global" if self.two_stage else "clip_all"):
            # Stage 2 starts from stage 1: each motion branch becomes a copy of its trained spatial branch.
            for binder in [self.global_binder, *self.block_binders]:
                binder.restart_motion()
        self._spatial_only = self.disentangles and on_frames(stage.name)
        self._global_only = phase == "global"
        self.requires_grad_(False)
        self._acting(self.global_binder).requires_grad_(True)
        if phase == "all":
            for binder in self.block_binders:
                self._acting(binder).requires_grad_(True)
        if self.absorbent_token is not None:
            self.absorbent_token.requires_grad_(True)
        if self.gradient_checkpointing and self._checkpointing_was is None:
            self._checkpointing_was = bool(getattr(backbone.denoiser, "is_gradient_checkpointing", False))
            self._set_checkpointing(backbone, True)

    @staticmethod
    def _set_checkpointing(backbone, on: bool) -> None:
        # The frozen denoiser recomputes its activations in backward: gradients still reach the
        # binders (through the context), memory drops to about one block's activations.
        if on:
            backbone.denoiser.enable_gradient_checkpointing()
        else:
            backbone.denoiser.disable_gradient_checkpointing()

    def stage_favours(self, stage_name: str) -> str:
        phase = stage_phase(stage_name)
        return self.global_stage_favours if phase == "global" else opposite(self.global_stage_favours)

    def training_loss(self, batch: TrainBatch, backbone, stage):
        generator = batch.generator
        n = len(batch.indices)
        if self.disentangles and on_frames(stage.name):
            prompts = self._frame_batch_prompts(batch)
        else:
            if not self.training_prompts:
                raise UserError(f"bico concept {self.concept_name!r} has no training prompts")
            picks = torch.randint(0, len(self.training_prompts), (n,), generator=generator)
            prompts = [self.training_prompts[int(p)] for p in picks]
        latents = batch.data.latents.sample(batch.indices, generator)
        timesteps = None  # the backbone's own draw (one-stage training)
        if self.two_stage:
            timesteps = side_timesteps(backbone, n, self.timestep_boundary, self.stage_favours(stage.name),
                                       self.favoured_fraction, generator)
        noisy = backbone.make_noisy(latents, generator, timesteps=timesteps)
        context, _ = backbone.encode_text(prompts)  # declares the rows the binders read
        self._training_rows = True
        try:
            prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
        finally:
            self._training_rows = False
        loss = denoising_loss(prediction, noisy.target)
        return {"loss": loss, "t_mean": noisy.timesteps.float().mean()}

    def _frame_batch_prompts(self, batch: TrainBatch) -> list[str]:
        """Each frame's prompt, drawn from that frame's own candidates (one, when the VLM wrote them)."""
        if batch.data.count != len(self.frame_training_prompts):
            raise RuntimeError(f"a frame stage got {batch.data.count} items for {len(self.frame_training_prompts)} "
                               f"frames; train it on method.stage_data(stage, data)")
        prompts = []
        for index in batch.indices.tolist():
            candidates = self.frame_training_prompts[index]
            prompts.append(candidates[int(torch.randint(0, len(candidates), (1,), generator=batch.generator))])
        return prompts

    # inference -------------------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """`{name}` -> the concept's token, which encodes as its description and marks where the binders act."""
        return text.replace("{%s}" % self.concept_name, self.token)

    def sample_prompts(self):
        return ["{%s}" % self.concept_name, "{%s} on the beach" % self.concept_name]


METHOD = BiCo
