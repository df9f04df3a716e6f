"""Object-level visual prompts with KV-mixed cross-attention (arXiv 2501.01424), an encoder method.

An adapter is trained once on a corpus of captioned multi-object images; afterwards any reference
picture conditions generation, with no per-concept optimisation. Per object in a prompt:
  - coarse path: the frozen image encoder's global embedding -> linear layout adapter (diffusers
    ImageProjection: Linear + LayerNorm, a narrow bottleneck) -> `tokens` layout tokens -> the KEYS
  - fine path: the encoder's patch grid -> Perceiver appearance adapter (diffusers
    IPAdapterPlusImageProjection, a wide bottleneck) -> `tokens` appearance tokens -> the VALUES
Both token sets go through the method's own per-site projections (hook.py) at the positions of the
object's placeholder, which follows the object's word in the prompt ("a cat <vp0...> on the beach").
The UNet, the text encoder and the image encoder stay frozen; only the adapters and the projections
train, on the backbone's denoising loss. `mode=coarse` / `mode=fine` are the paper's ablation (K and V
both from one path). Compositional guidance at inference: guidance.py. Card: README.md beside this file.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from conceptkit.embeddings import owner_id, word_init
from conceptkit.errors import UserError
from conceptkit.method import ConceptMethod, Stage, TrainBatch
from conceptkit.training.losses import denoising_loss

from .hook import VisualPromptKV, VisualPromptProjections

MODES = ("kv_mixed", "coarse", "fine")
REFERENCE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class KVMixed(ConceptMethod):
    name = "kv_mixed"
    version = "1"
    kind = "encoder"
    # SD1.5 first (the paper's backbone). Wan2.1's cross-attention applies norm_k to the projected keys
    # before hooks see them and has no image encoder configured yet: see the card.
    families = ("sd15",)

    @classmethod
    def compose_example(cls, concept: str, name: str, prompt: str) -> str:
        """References by name ({star: picture}), which the prompt names."""
        return (f"concepts=[{concept}] references={{star:star.png,circle:circle.png}} "
                f"prompt=\"a {{star}} left of a {{circle}} on a plain sand background\"")

    def __init__(self, concept_name: str = "kv", mode: str = "kv_mixed", tokens: int = 4, max_objects: int = 4,
                 appearance_width: int | None = None, appearance_depth: int = 4, appearance_head_dim: int = 64,
                 slot_word: str = "object", reference_flip: float = 0.5,
                 steps: int = 3000, lr: float = 1e-4, batch_size: int = 8, accumulate: int = 1,
                 grad_clip: float | None = 1.0, weight_decay: float = 1e-2, seed: int = 0,
                 guidance: dict | None = None):
        super().__init__(concept_name)
        if mode not in MODES:
            raise UserError(f"method.mode={mode!r}: choose one of {', '.join(MODES)}")
        if tokens < 1 or max_objects < 1:
            raise UserError("method.tokens and method.max_objects must be at least 1")
        if appearance_width is not None and appearance_width % appearance_head_dim:
            raise UserError(f"method.appearance_width={appearance_width} must be a multiple of "
                            f"method.appearance_head_dim={appearance_head_dim}")
        self.mode, self.tokens, self.max_objects = mode, tokens, max_objects
        self.appearance_width, self.appearance_depth = appearance_width, appearance_depth
        self.appearance_head_dim = appearance_head_dim
        self.slot_word, self.reference_flip = slot_word, reference_flip
        self.steps, self.lr, self.batch_size, self.accumulate = steps, lr, batch_size, accumulate
        self.grad_clip, self.weight_decay, self.seed = grad_clip, weight_decay, seed
        self.guidance_settings = dict(guidance or {})
        from .guidance import GuidanceSettings

        GuidanceSettings.from_dict(self.guidance_settings)  # a bad method.guidance key fails at train time
        self.encoder_dims: dict[str, int] = {}  # global_dim, grid_dim, context_dim: set by initialize / import_info
        self.layout: nn.Module | None = None
        self.appearance: nn.Module | None = None
        self.projections: VisualPromptProjections | None = None
        self.register_buffer("slot_vectors", torch.zeros(0), persistent=False)
        self._hook: VisualPromptKV | None = None
        self._references: dict[str, tuple[int, str]] = {}  # reference name -> (slot, word), for prompt()
        self.reference_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # (layout, appearance) of the references
        self._pictures: dict[str, np.ndarray] = {}

    # identity ---------------------------------------------------------------------------------
    def hparams(self):
        return dict(mode=self.mode, tokens=self.tokens, max_objects=self.max_objects,
                    appearance_width=self.appearance_width, appearance_depth=self.appearance_depth,
                    appearance_head_dim=self.appearance_head_dim, slot_word=self.slot_word,
                    reference_flip=self.reference_flip, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                    accumulate=self.accumulate, grad_clip=self.grad_clip, weight_decay=self.weight_decay,
                    seed=self.seed, guidance=dict(self.guidance_settings))

    def export_info(self):
        return dict(self.encoder_dims)

    def import_info(self, info):
        self.encoder_dims = {k: int(v) for k, v in info.items()}

    def slot_token(self, slot: int) -> str:
        return f"<{self.concept_name}:vp{slot}>"

    def token_names(self):
        return [self.slot_token(j) for j in range(self.max_objects)]

    # parameters -------------------------------------------------------------------------------
    def _dims(self, backbone) -> dict[str, int]:
        encoder = backbone.image_encoder()
        context = next(s.context_dim for s in backbone.attention_sites() if s.kind == "cross")
        width = self.appearance_width
        if width is None:
            # IP-Adapter-Plus's Perceiver width (768) for SD1.5-sized contexts; twice the context width
            # on the toys (a 768-wide resampler would dwarf a 64-wide UNet), in whole heads.
            head = self.appearance_head_dim
            width = 768 if context >= 768 else head * max(1, -(-2 * context // head))
        return {"global_dim": encoder.global_dim, "grid_dim": encoder.grid_dim, "context_dim": context,
                "appearance_width": width}

    def _build(self, backbone) -> None:
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        dims = self.encoder_dims
        with torch.random.fork_rng(devices=[]):  # the adapters' init is a function of the seed alone
            torch.manual_seed(self.seed)
            self.layout = ImageProjection(image_embed_dim=dims["global_dim"], cross_attention_dim=dims["context_dim"],
                                          num_image_text_embeds=self.tokens)
            self.appearance = IPAdapterPlusImageProjection(
                embed_dims=dims["grid_dim"], output_dims=dims["context_dim"], hidden_dims=dims["appearance_width"],
                depth=self.appearance_depth, dim_head=self.appearance_head_dim,
                heads=dims["appearance_width"] // self.appearance_head_dim, num_queries=self.tokens)
        sites = [s for s in backbone.attention_sites() if s.kind == "cross"]
        self.projections = VisualPromptProjections(sites, backbone.denoiser).to(torch.float32)

    def initialize(self, backbone, data) -> None:
        self.encoder_dims = self._dims(backbone)
        self._build(backbone)

    def attach(self, backbone) -> None:
        if not self.encoder_dims:
            self.encoder_dims = self._dims(backbone)
        if self.layout is None:
            self._build(backbone)
        owner = owner_id(self.concept_name)
        # What the text encoder reads at the slots (the keys and values there are replaced): the slot
        # word's embedding, a fixed buffer, so the text around an object reads "... object object ...".
        self.slot_vectors = word_init(backbone, self.slot_word, self.tokens).to(backbone.device)
        for slot in range(self.max_objects):
            backbone.tokens.register(owner, self.slot_token(slot), self.slot_vectors)
        self._hook = VisualPromptKV(self.projections, backbone.hooks,
                                    lambda: backbone.tokens.reserved_ids(self.slot_token(0)).start,
                                    self.max_objects * self.tokens)
        backbone.hooks.add(owner, self._hook, selector=lambda site: site.kind == "cross")

    def detach(self, backbone) -> None:
        owner = owner_id(self.concept_name)
        backbone.tokens.unregister(owner)
        backbone.hooks.remove(owner)
        self._hook = None

    # conditioning -----------------------------------------------------------------------------
    def object_tokens(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageFeatures of R pictures -> (layout tokens, appearance tokens), each (R, tokens, C)."""
        layout = self.layout(features.global_embeds.to(self.layout.image_embeds.weight.device))
        appearance = self.appearance(features.grid.to(self.appearance.proj_in.weight.device))
        return layout, appearance

    def key_value_tokens(self, layout: torch.Tensor, appearance: torch.Tensor):
        """Which tokens the keys and values come from: the paper's KV-mixed, or one path for both."""
        if self.mode == "coarse":
            return layout, layout
        if self.mode == "fine":
            return appearance, appearance
        return layout, appearance

    def condition(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """Set the slots' key and value tokens: (M, tokens, C) for every row, (B, M, tokens, C) per row."""
        if keys is None:
            self._hook.condition(None, None)
            return
        flat = (lambda x: x.flatten(-3, -2))
        self._hook.condition(flat(keys), flat(values))

    def slot_phrase(self, word: str, slot: int) -> str:
        return f"{word} {self.slot_token(slot)}"

    # training ---------------------------------------------------------------------------------
    def stages(self, backbone):
        return [Stage("adapter", steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                      accumulate=self.accumulate, grad_clip=self.grad_clip, weight_decay=self.weight_decay)]

    def begin_stage(self, stage, backbone):
        self.requires_grad_(True)

    def training_references(self, batch: TrainBatch, generator: torch.Generator) -> list[np.ndarray]:
        pictures = []
        for item in batch.items:
            for obj in item.objects[: self.max_objects]:
                picture = obj.reference
                if self.reference_flip and float(torch.rand((), generator=generator)) < self.reference_flip:
                    picture = picture[:, ::-1]
                pictures.append(picture)
        return pictures

    def training_prompts(self, items) -> list[str]:
        """Each caption with every object's slot placeholder right after its word."""
        prompts = []
        for item in items:
            caption = item.caption
            for slot, obj in reversed(list(enumerate(item.objects[: self.max_objects]))):
                start, end = obj.span
                caption = caption[:end] + " " + self.slot_token(slot) + caption[end:]
            prompts.append(caption)
        return prompts

    def training_loss(self, batch: TrainBatch, backbone, stage):
        from conceptkit.corpus import scene_pixels

        if batch.items is None:
            raise RuntimeError("kv_mixed trains on a corpus (TrainBatch.items)")
        items = batch.items
        pixels = scene_pixels(items, backbone.resolution)  # (B, 3, 1, H, W) in [-1, 1]
        with torch.no_grad():
            latents = backbone.encode_media(pixels).sample(torch.arange(len(items)), batch.generator)
            features = backbone.image_encoder().encode(self.training_references(batch, batch.generator))
        layout, appearance = self.object_tokens(features)
        keys, values = self.key_value_tokens(layout, appearance)
        # Per row: its objects' tokens in slots 0..n-1 (unused slots are zeros the prompt never names).
        per_row_keys = keys.new_zeros(len(items), self.max_objects, self.tokens, keys.shape[-1])
        per_row_values = torch.zeros_like(per_row_keys)
        start = 0
        for row, item in enumerate(items):
            count = len(item.objects[: self.max_objects])
            per_row_keys[row, :count] = keys[start:start + count]
            per_row_values[row, :count] = values[start:start + count]
            start += count
        noisy = backbone.make_noisy(latents, batch.generator)
        context, _ = backbone.encode_text(self.training_prompts(items))
        self.condition(per_row_keys, per_row_values)
        try:
            prediction = backbone.denoise(noisy.noisy, noisy.timesteps, context)
        finally:
            self.condition(None, None)
        return {"loss": denoising_loss(prediction, noisy.target), "objects": torch.tensor(float(start))}

    # inference --------------------------------------------------------------------------------
    def set_references(self, backbone, pictures: dict[str, np.ndarray], words: dict[str, str] | None = None) -> None:
        """Condition on reference pictures, {name: (H, W, 3) uint8}: prompts then name each as {name},
        rendered as its word (`words`; default the name, _ as spaces) followed by its slot placeholder.
        Order = slot order."""
        if len(pictures) > self.max_objects:
            raise UserError(f"{len(pictures)} references, but concept {self.concept_name} takes at most "
                            f"{self.max_objects} per prompt (method.max_objects)")
        for name in pictures:
            if not REFERENCE_NAME.match(name):
                raise UserError(f"references: {name!r} is not a name; use letters, digits and _ (prompts say {{{name}}})")
        words = words or {}
        self._references = {name: (slot, words.get(name, name.replace("_", " "))) for slot, name in enumerate(pictures)}
        self._pictures = dict(pictures)
        if not pictures:
            self.condition(None, None)
            return
        with torch.no_grad():
            features = backbone.image_encoder().encode(list(pictures.values()))
            layout, appearance = self.object_tokens(features)
        self.reference_tokens = (layout, appearance)
        keys, values = self.key_value_tokens(layout, appearance)
        self.condition(self.padded(keys), self.padded(values))

    def padded(self, tokens: torch.Tensor) -> torch.Tensor:
        padded = tokens.new_zeros(self.max_objects, self.tokens, tokens.shape[-1])
        padded[: tokens.shape[0]] = tokens
        return padded

    def max_references(self) -> int:
        return self.max_objects

    def steered_generate(self, backbone, prompts: list[str], generate_kwargs: dict, compositional="auto"):
        """Compositional guidance (guidance.py) when it is on for these references (`compositional`:
        auto = on for 2+ references, or true / false; it overrides method.guidance.enabled), else None.
        Returns (media, {"first_pass": media, "log": {...}})."""
        from .guidance import CompositionalGuidance, GuidanceSettings

        settings = GuidanceSettings.from_dict({**self.guidance_settings,
                                               **({} if compositional is None else {"enabled": compositional})})
        if not self._references or not settings.active(len(self._references)):
            return None
        pictures = self._pictures
        words = [word for _, word in self._references.values()]
        guidance = CompositionalGuidance(self, backbone, settings)
        first, second = guidance.generate(prompts, pictures, words, generate_kwargs)
        return second, {"first_pass": first, "log": guidance.log.as_dict()}

    def prompt(self, text: str) -> str:
        for name, (slot, word) in self._references.items():
            text = text.replace("{%s}" % name, self.slot_phrase(word, slot))
        return text

    def sample_prompts(self):
        return []  # nothing to render without references (compose gives them)


METHOD = KVMixed
