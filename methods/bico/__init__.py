"""BiCo (arXiv 2512.09824): bind a visual concept to prompt tokens with hierarchical binders.

The backbone stays frozen. The concept is a set of binders (binders.py) that edit the text context of
every cross-attention site, after the backbone's own text projection (Wan2.1: the output of
`condition_embedder.text_embedder`, which is what each block's attn2 receives; SD1.5: the text
encoder's output), through conceptkit's attention `context` hooks:
    one global binder, for every site, and one binder per cross-attention site (Wan: per DiT block).

Where binders act (a (B, L) mask over the context, read from the rows the backbone declares):
  - training: every real token of the diversified training prompt except BOS, and the EOS slot only
    when it holds the absorbent token (official; `binders_on_absorbent=false` leaves that slot out);
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
import weakref

import torch
from torch import nn

from conceptkit.captioning import Decoding
from conceptkit.embeddings import owner_id
from conceptkit.attention import ContextRows
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch, TrainingData
from conceptkit.methods.bico.binders import (GATES, Binder, DualBranchBinder, SiteBinderHook, bind_block, bind_global,
                                             write_absorbent)
from conceptkit.methods.bico.cache import GlobalBinding, SiteSharedCache
from conceptkit.methods.bico.encoded import EncodedPrompts
from conceptkit.methods.bico.diversify import concept_phrases, diversified_prompts, per_frame_prompts
from conceptkit.methods.bico.schedule import SIDES, opposite, side_timesteps
from conceptkit.methods.bico.temporal import frame_images, frames_as_images
from conceptkit.training.losses import denoising_loss


CLIP_VIEWS = 4  # frames of a video source shown to the VLM for its clip-level prompts [ours]
# method.binder_dtype: what the binders hold and compute in (float32: fp32 master weights, ours;
# bfloat16: the official code's, half the binder memory). The absorbent token stays float32 (see README).
BINDER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def stage_phase(stage_name: str) -> str:
    """"global" or "all": `global`, `all`, `frames_global`, `clip_all`, ... -> the binders it trains."""
    return stage_name.rsplit("_", 1)[-1]


def on_frames(stage_name: str) -> bool:
    """Stage 1 of a video concept: the clip's frames as images."""
    return stage_name.startswith("frames_")


def check_vlm_decoding(temperature: float, top_k: int, top_p: float) -> None:
    """The VLM's sampling settings, checked where the config is read: transformers would fail later,
    mid-run, or (a top_p above 1) silently not cut."""
    if not temperature > 0:
        raise UserError(f"method.vlm_temperature must be > 0, got {temperature} "
                        f"(for greedy decoding set method.vlm_sampling=false)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"method.vlm_top_k must be a whole number >= 0 (0: no top-k cut), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise UserError(f"method.vlm_top_p must be in (0, 1], got {top_p}")


class BiCo(ConceptMethod):
    name = "bico"
    version = "2"  # 2: temporal disentanglement (video concepts hold dual-branch binders)
    renders_class_word = True  # prompts render the description in the concept's place

    @classmethod
    def class_word_overrides(cls, word):
        return [f"method.description={word}"]

    def __init__(self, concept_name: str = "concept", description: str | None = None,
                 prompts: list[str] | None = None, prompt_count: int = 60, vlm: str | None = None,
                 vlm_sampling: bool = True, vlm_temperature: float = 0.7, vlm_top_k: int = 50,
                 vlm_top_p: float = 0.95, per_block_binders: bool = True, absorbent: bool = True,
                 binders_on_absorbent: bool = True, global_steps: int = 120, all_steps: int = 180,
                 lr: float = 1e-4, weight_decay: float = 1e-2, batch_size: int = 1,
                 accumulate: int = 8, grad_clip: float | None = None, timestep_boundary: float = 417.0,
                 global_stage_favours: str = "low", favoured_fraction: float = 0.8, two_stage: bool = True,
                 temporal_disentanglement: bool = True, gate: str = "sigmoid", frame_prompts: list[str] | None = None,
                 frame_global_steps: int = 162, frame_all_steps: int = 243,
                 gradient_checkpointing: bool = False, binder_dtype: str = "float32", init_seed: int = 0):
        super().__init__(concept_name)
        self.description, self.prompts, self.prompt_count, self.vlm = description, prompts, prompt_count, vlm
        self.vlm_sampling, self.vlm_temperature, self.vlm_top_k, self.vlm_top_p = (
            vlm_sampling, float(vlm_temperature), vlm_top_k, float(vlm_top_p))
        self.per_block_binders, self.use_absorbent = per_block_binders, absorbent
        self.binders_on_absorbent = binders_on_absorbent
        self.global_steps, self.all_steps, self.lr, self.weight_decay = global_steps, all_steps, lr, weight_decay
        self.batch_size, self.accumulate, self.grad_clip = batch_size, accumulate, grad_clip
        self.timestep_boundary, self.global_stage_favours = float(timestep_boundary), global_stage_favours
        self.favoured_fraction, self.two_stage = favoured_fraction, two_stage
        self.temporal_disentanglement, self.gate, self.frame_prompts = temporal_disentanglement, gate, frame_prompts
        self.frame_global_steps, self.frame_all_steps = frame_global_steps, frame_all_steps
        self.gradient_checkpointing = gradient_checkpointing
        self.binder_dtype = binder_dtype
        self.init_seed = init_seed
        if global_stage_favours not in SIDES:
            raise UserError(f"method.global_stage_favours must be one of {', '.join(SIDES)}, got {global_stage_favours!r}")
        if not 0.0 <= favoured_fraction <= 1.0:
            raise UserError(f"method.favoured_fraction must be in [0, 1], got {favoured_fraction}")
        if gate not in GATES:
            raise UserError(f"method.gate must be one of {', '.join(GATES)}, got {gate!r}")
        if binder_dtype not in BINDER_DTYPES:
            raise UserError(f"method.binder_dtype must be one of {', '.join(BINDER_DTYPES)}, got {binder_dtype!r}")
        if vlm_sampling:  # greedy decoding reads none of them
            check_vlm_decoding(vlm_temperature, vlm_top_k, vlm_top_p)
        # data-derived (export_info): the phrase `{name}` renders to, and the resolved training prompts
        self.resolved_description: str | None = description
        self.training_prompts: list[str] = list(prompts or [])
        self.clip_frames = 1  # frames per training clip (1: an image concept)
        self.frame_training_prompts: list[list[str]] = []  # per frame of the clips: its stage-1 candidates
        self.concept_phrases: list[dict[str, list[str]] | None] = []  # per clip the VLM read: spatial / temporal
        self._frame_data: TrainingData | None = None  # the clips' frames as images (stage 1; training only)
        self.global_binder: Binder | DualBranchBinder | None = None
        self.block_binders = nn.ModuleList()
        self.absorbent_token: nn.Parameter | None = None
        self._backbone = None
        self._site_index: dict[str, int] = {}
        # The rows of the current training step's prompts (held weakly): wherever they are declared the
        # binders act in training mode (whole-prompt mask + absorbent), also in backward, when
        # gradient checkpointing recomputes blocks after training_loss has returned.
        self._training_rows: weakref.ref | None = None
        self._global_bindings = SiteSharedCache()  # ctx_g, once per forward for every site (cache.py)
        self._global_only = False  # a `global` stage: training rows skip the per-block binders (official)
        self._spatial_only = False  # stage 1 of a video concept: dual binders act through their spatial branch
        self._checkpointing_was: bool | None = None
        self._encoded: EncodedPrompts | None = None  # the training prompts' context (begin_stage; training only)

    # identity --------------------------------------------------------------------------------
    def hparams(self):
        return dict(description=self.description, prompts=None if self.prompts is None else list(self.prompts),
                    prompt_count=self.prompt_count, vlm=self.vlm, vlm_sampling=self.vlm_sampling,
                    vlm_temperature=self.vlm_temperature, vlm_top_k=self.vlm_top_k, vlm_top_p=self.vlm_top_p,
                    per_block_binders=self.per_block_binders,
                    absorbent=self.use_absorbent, binders_on_absorbent=self.binders_on_absorbent,
                    global_steps=self.global_steps, all_steps=self.all_steps,
                    lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                    accumulate=self.accumulate, grad_clip=self.grad_clip, timestep_boundary=self.timestep_boundary,
                    global_stage_favours=self.global_stage_favours, favoured_fraction=self.favoured_fraction,
                    two_stage=self.two_stage, temporal_disentanglement=self.temporal_disentanglement, gate=self.gate,
                    frame_prompts=None if self.frame_prompts is None else list(self.frame_prompts),
                    frame_global_steps=self.frame_global_steps, frame_all_steps=self.frame_all_steps,
                    gradient_checkpointing=self.gradient_checkpointing, binder_dtype=self.binder_dtype,
                    init_seed=self.init_seed)

    def export_info(self):
        info = {"description": self.resolved_description, "training_prompts": list(self.training_prompts),
                "clip_frames": self.clip_frames}
        if self.frame_training_prompts:
            info["frame_prompts"] = [list(p) for p in self.frame_training_prompts]
        if self.concept_phrases:
            info["concept_phrases"] = [None if p is None else {k: list(v) for k, v in p.items()}
                                       for p in self.concept_phrases]
        return info

    def import_info(self, info):
        self.resolved_description = info.get("description")
        self.training_prompts = [str(p) for p in info.get("training_prompts", [])]
        # Artifacts before method version 2 hold no clip_frames: image concepts, or clips trained whole.
        self.clip_frames = int(info.get("clip_frames", 1))
        self.frame_training_prompts = [[str(p) for p in ps] for ps in info.get("frame_prompts", [])]
        self.concept_phrases = [None if p is None else {k: [str(x) for x in v] for k, v in p.items()}
                                for p in info.get("concept_phrases", [])]

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
        if self.absorbent_token is not None:  # the paper's "w/o absorbent" ablation has none
            generator = torch.Generator().manual_seed(self.init_seed)
            with torch.no_grad():
                self.absorbent_token.copy_(torch.randn(self.absorbent_token.shape, generator=generator))

    @property
    def vlm_decoding(self) -> Decoding:
        """How the VLM writes prompts: sampled as the official code (or greedy), seeded from init_seed so
        the same config writes the same prompts."""
        return Decoding(sample=bool(self.vlm_sampling), temperature=self.vlm_temperature, top_k=self.vlm_top_k,
                        top_p=self.vlm_top_p, seed=self.init_seed)

    def _write_prompts(self, backbone, data: TrainingData, caption: str | None) -> None:
        """The clip-level training prompts and, for a video concept, the per-frame ones. The VLM, when
        it writes any of them, is loaded once here, asked for the clips' concept phrases (video sources),
        the clip's prompts and the frames', and released before training."""
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
            self.concept_phrases = self._read_phrases(backbone, data, vlm, frames_by_vlm, clip)
            self.training_prompts = diversified_prompts(
                self.resolved_description, caption, self.prompt_count, vlm, image=image, own=self.prompts,
                clip=clip, phrases=self.concept_phrases[0] if clip and self.concept_phrases else None,
                decoding=self.vlm_decoding)
            if self.disentangles:
                images = frame_images(data) if frames_by_vlm else None
                self.frame_training_prompts = per_frame_prompts(self.resolved_description, data.captions,
                                                                data.frames, vlm, images=images,
                                                                own=self.frame_prompts, clip_prompts=self.prompts,
                                                                phrases=self.concept_phrases,
                                                                decoding=self.vlm_decoding)
        finally:
            if vlm is not None:
                vlm.release()

    def _read_phrases(self, backbone, data: TrainingData, vlm, frames_by_vlm: bool,
                      first_clip: list | None) -> list:
        """A video source's spatial / temporal concept phrases, one entry per clip the VLM writes prompts
        for (the first clip for its prompts; every clip when it writes the frames'), before any prompt
        (official order). None for a clip whose answer is unusable; no entries for an image source, or
        for a model without a chat template (it takes no instruction)."""
        if vlm is None or data.frames == 1 or not vlm.chat:
            return []
        clips = range(data.count) if frames_by_vlm else range(1)
        views = [first_clip if n == 0 and first_clip else self._clip_views(backbone, data, clip=n) for n in clips]
        return concept_phrases(views, vlm)

    @staticmethod
    def _clip_views(backbone, data: TrainingData, count: int = CLIP_VIEWS, clip: int = 0) -> list:
        """`count` evenly spaced frames (first and last included) of clip `clip`, as PIL images: from the
        clip's pixels when the data holds them (no VAE round trip), else decoded from its latents."""
        from PIL import Image

        if data.pixels is not None:
            pixels = (data.pixels[clip] + 1) / 2  # (3, F, H, W), [-1, 1] -> [0, 1]
        else:
            pixels = backbone.decode(data.latents.mean[clip:clip + 1].to(backbone.device))[0]
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
            # Initialised in float32 and then cast, so a bf16 binder starts at the float32 one, rounded.
            made = DualBranchBinder(Binder(dim), gate=self.gate) if self.disentangles else Binder(dim)
            return made.to(BINDER_DTYPES[self.binder_dtype])

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            self.global_binder = binder()
            self.block_binders = nn.ModuleList([binder() for _ in sites] if self.per_block_binders else [])
        # float32 whatever binder_dtype: d numbers, and at its N(0, 1) scale an AdamW step of lr 1e-4 is
        # below bf16's spacing (2^-7 near 1), so in bf16 it would not move.
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
        self._global_bindings.clear()
        self._encoded = None
        self._backbone = None

    def _description_rows(self, backbone) -> torch.Tensor:
        """The description words' own input-embedding rows: `<name>` encodes exactly as the description
        would, but its positions are known (reserved ids) so the binders can find them."""
        ids = backbone.tokenizer(self.resolved_description, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"method.description {self.resolved_description!r} has no tokens; give a few words")
        return backbone.text_embedding_matrix()[torch.tensor(ids)].detach().clone()

    # the context hook's work -------------------------------------------------------------------
    def _on_training_rows(self, rows) -> bool:
        """Whether these are the rows of the current training step's prompts (see __init__)."""
        return self._training_rows is not None and self._training_rows() is rows

    def positions(self, rows, backbone) -> torch.Tensor:
        """(B, L) bool: where this concept's binders act for these context rows."""
        if self._on_training_rows(rows):
            mask = rows.attention_mask.bool().clone()
            # The EOS slot holds the absorbent token in training. The official code adds that slot to
            # the binder mask, so the binders transform the absorbent token too (binders_on_absorbent);
            # without an absorbent token the EOS feature is left alone, as there.
            if self.absorbent_token is None or not self.binders_on_absorbent:
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
        training = self._on_training_rows(rows)
        shared = self._global_binding(context, rows, training, binder_index)
        if shared.bound is None:  # nothing of this concept here (e.g. a prompt without {name}): untouched
            return context if shared.written is None else shared.written
        bound = shared.bound
        if self.per_block_binders and not (training and self._global_only):
            bound = bind_block(bound, shared.mask, self._acting(self.block_binders[binder_index]))
        return bound.to(context.dtype)

    def _global_binding(self, context: torch.Tensor, rows, training: bool, site: int) -> GlobalBinding:
        """The absorbent write, the mask and ctx_g: computed once per forward and shared by every
        site (cache.py says when it is recomputed, and why that is safe under checkpointing)."""
        global_binder = self._acting(self.global_binder)
        # What ctx_g depends on besides the context and the rows. Parameter versions move with every
        # in-place update (optimiser step, load_state_dict), so changed binders never meet an old ctx_g.
        state = (training, self._global_only, self._spatial_only,
                 tuple(p._version for p in global_binder.parameters()),
                 None if self.absorbent_token is None else self.absorbent_token._version)
        shared = self._global_bindings.get(context, rows, state, site)
        if shared is None:
            written = None
            if training and self.absorbent_token is not None:
                written = write_absorbent(context, rows.eos_index, self.absorbent_token)
            source = context if written is None else written
            mask = self.positions(rows, self._backbone)
            shared = GlobalBinding(written, mask, bind_global(source, mask, global_binder) if mask.any() else None)
            self._global_bindings.put(context, rows, state, site, shared)  # keyed on the hook's own input
        return shared

    def _acting(self, binder: nn.Module) -> nn.Module:
        # Stage 1 of a video concept trains (and previews) the spatial branch alone: the official
        # stage-1 binder is a plain binder, which the spatial branch of stage 2 inherits.
        return binder.spatial if self._spatial_only else binder

    # training --------------------------------------------------------------------------------
    def stages(self, backbone):
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
        self._global_bindings.clear()
        self.requires_grad_(False)
        self._acting(self.global_binder).requires_grad_(True)
        if phase == "all":
            for binder in self.block_binders:
                self._acting(binder).requires_grad_(True)
        if self.absorbent_token is not None:
            self.absorbent_token.requires_grad_(True)
        prompts = [p for candidates in self.frame_training_prompts for p in candidates] + list(self.training_prompts)
        if prompts and (self._encoded is None or not self._encoded.matches(prompts)):
            self._encoded = EncodedPrompts(backbone, prompts)  # fixed text, frozen encoder: once, not per step
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
        if self._encoded is not None and self._encoded.matches(prompts):
            context, tokenized = self._encoded.take(prompts)
            context = context.to(noisy.noisy.device)
        else:  # prompts begin_stage did not see (a caller that changed them): encode now
            context, tokenized = backbone.encode_text(prompts)
        backbone.hooks.declare_rows(ContextRows.conditional(tokenized))  # the rows the binders read (a new object)
        # Training mode follows these rows, not a flag around the call: checkpointed blocks recompute in
        # backward, after this returns, and must bind as their forward did. Declaring other rows
        # (encode_text, generate: previews, inference) ends it.
        self._training_rows = weakref.ref(backbone.hooks.rows)
        prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
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
