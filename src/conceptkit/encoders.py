"""Frozen auxiliary image encoders, owned by the backbone side.

Encoder methods (KV-mixed visual prompts, BindWeave) condition on reference pictures through a
frozen image encoder. It is never a submodule of a method (so never in a concept's state_dict): a
backbone builds it lazily on first use (`Backbone.image_encoder()`), from the `image_encoder` entry
of its config, and keeps it frozen in eval mode on the backbone's device.

Every encoder returns the two views KV-mixed needs (`ImageFeatures`):
  - `global_embeds` (B, Dg): one vector per picture (the coarse, narrow-bottleneck view)
  - `grid` (B, N, Dc): the patch tokens (the fine, wide-bottleneck view)

Sources (`image_encoder=`):
  - a hub id or local folder of a transformers CLIPVisionModelWithProjection, optionally
    `<id>:<subfolder>` (default for sd15: h94/IP-Adapter:models/image_encoder, the ViT-H/14 that
    IP-Adapter-Plus for SD1.5 uses): global = image_embeds (the projection), grid = hidden_states[-2]
    (IP-Adapter-Plus's choice: the last layer is shaped for the contrastive head, the one before keeps
    more of the picture's detail)
  - a folder holding an open_clip model (`open_clip_config.json` + `open_clip_model.safetensors`,
    what `conceptkit pretrain encoder=...` writes; the ShapeWorld encoder ships that way): global =
    the projected pooled embedding, grid = the final patch tokens
  - `random:tiny` a CLIPVisionModelWithProjection at test size, `random:vit-h-14` at ViT-H/14 size,
    seeded (no weights anywhere: tests, and full-size speed runs with backbone.weights=random)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conceptkit.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, projection_dim=24)
# OpenCLIP ViT-H/14 as IP-Adapter ships it (h94/IP-Adapter models/image_encoder), for weights=random
# speed and memory runs at full size.
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
RANDOM_CLIP_VISION = {"random:tiny": TINY_CLIP_VISION, "random:vit-h-14": VIT_H_14}


@dataclass
class ImageFeatures:
    global_embeds: torch.Tensor  # (B, Dg)
    grid: torch.Tensor  # (B, N, Dc)


def pictures_to_tensor(pictures) -> torch.Tensor:
    """A list of (H, W, 3) uint8 arrays (any sizes) or a (B, 3, H, W) float tensor in [0, 1] -> a list of
    (3, H, W) float tensors in [0, 1]."""
    if isinstance(pictures, torch.Tensor):
        return list(pictures.float())
    return [torch.from_numpy(np.array(p, dtype=np.uint8)).permute(2, 0, 1).float() / 255 for p in pictures]


class ImageEncoder:
    """One frozen image encoder: `encode(pictures) -> ImageFeatures`, no gradients, any picture sizes."""

    def __init__(self, model: nn.Module, kind: str, image_size: int, mean, std, global_dim: int, grid_dim: int,
                 grid_tokens: int, source: str):
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.global_dim = global_dim
        self.grid_dim = grid_dim
        self.grid_tokens = grid_tokens
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "ImageEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    def preprocess(self, pictures) -> torch.Tensor:
        """Resize each picture (square; bicubic, antialiased) to the encoder's size and normalise."""
        size = self.image_size
        batch = torch.stack([F.interpolate(p[None], size=(size, size), mode="bicubic", antialias=True,
                                           align_corners=False)[0] for p in pictures_to_tensor(pictures)])
        return ((batch.clamp(0, 1) - self.mean) / self.std).to(self.device, self.dtype)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global embeddings of a (B, 3, H, W) batch in [0, 1] on the encoder's device, differentiable
        with respect to the pixels (compositional guidance's identity loss backpropagates through it)."""
        size = self.image_size
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        normalised = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        return self._forward(normalised.to(self.dtype))[0].float()

    @torch.no_grad()
    def encode(self, pictures, batch_size: int = 32) -> ImageFeatures:
        pixels = self.preprocess(pictures)
        globals_, grids = [], []
        for chunk in pixels.split(batch_size):
            g, grid = self._forward(chunk)
            globals_.append(g.float())
            grids.append(grid.float())
        return ImageFeatures(torch.cat(globals_), torch.cat(grids))

    def _forward(self, pixels):
        if self.kind == "clip":
            out = self.model(pixel_values=pixels, output_hidden_states=True)
            return out.image_embeds, out.hidden_states[-2]
        if self.kind == "clip_vision":
            out = self.model(pixel_values=pixels, output_hidden_states=True)
            return out.pooler_output, out.hidden_states[-2]
        pooled, tokens = self.model.visual(pixels)  # open_clip with output_tokens=True
        return pooled, tokens


def random_clip_vision(config: dict, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed + 101)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def _clip_encoder(model, source: str) -> ImageEncoder:
    config = model.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    return ImageEncoder(model, "clip", config.image_size, CLIP_MEAN, CLIP_STD, config.projection_dim,
                        config.hidden_size, tokens, source)


def build_open_clip(config: dict):
    """An open_clip CLIP of a custom config (dict of CLIP's constructor: embed_dim, vision_cfg,
    text_cfg), with the vision tower returning its patch tokens too."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(**{**config["vision_cfg"], "output_tokens": True})
    text = CLIPTextCfg(**config["text_cfg"])
    return open_clip.CLIP(embed_dim=config["embed_dim"], vision_cfg=vision, text_cfg=text,
                          quick_gelu=config.get("quick_gelu", False))


def open_clip_encoder(folder: Path) -> ImageEncoder:
    from safetensors.torch import load_file

    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    model = build_open_clip(config["model"])
    try:
        model.load_state_dict(load_file(str(folder / OPEN_CLIP_WEIGHTS)), strict=True)
    except (RuntimeError, OSError) as error:
        raise UserError(f"{folder / OPEN_CLIP_WEIGHTS} does not fit {folder / OPEN_CLIP_CONFIG} ({str(error)[:200]}); "
                        f"the encoder folder is damaged") from None
    vision = config["model"]["vision_cfg"]
    size = int(vision["image_size"])
    tokens = (size // int(vision["patch_size"])) ** 2
    return ImageEncoder(model, "open_clip", size, config.get("mean", CLIP_MEAN), config.get("std", CLIP_STD),
                        int(config["model"]["embed_dim"]), int(vision["width"]), tokens, str(folder))


def _transformers_source(source: str) -> tuple[str, str]:
    """(name or folder, subfolder) of a transformers image encoder source `<id or folder>[:<subfolder>]`."""
    if Path(source).exists():
        return source, ""
    name, _, subfolder = source.partition(":")
    return name, subfolder


def image_encoder_shape(source: str, revision: str | None = None) -> tuple[int, int]:
    """(grid tokens, grid width) of the encoder `source` names, read from its config (nothing is built):
    what a denoiser's image context is sized by before the encoder is loaded."""
    if source in RANDOM_CLIP_VISION:
        config = RANDOM_CLIP_VISION[source]
        return (config["image_size"] // config["patch_size"]) ** 2 + 1, config["hidden_size"]
    folder = Path(source)
    if (folder / OPEN_CLIP_CONFIG).is_file():
        vision = json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model"]["vision_cfg"]
        return (int(vision["image_size"]) // int(vision["patch_size"])) ** 2, int(vision["width"])
    from transformers import CLIPVisionConfig

    name, subfolder = _transformers_source(source)
    try:
        config = CLIPVisionConfig.from_pretrained(name, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as error:
        raise _missing_encoder(source, error) from None
    return (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size


def _missing_encoder(source: str, error: Exception) -> UserError:
    return UserError(f"image encoder {source!r} is not present and cannot be downloaded ({type(error).__name__}); "
                     f"download a transformers CLIP vision folder where you have network and pass "
                     f"backbone.image_encoder=/path/to/it")


def load_image_encoder(source: str, seed: int = 0, revision: str | None = None) -> ImageEncoder:
    """Build the encoder `source` names (see the module docstring). Missing weights: one line saying
    where to put them. A folder of a plain CLIPVisionModel (Wan2.1-I2V's image_encoder) loads as one:
    its global view is the pooled output (it has no projection)."""
    if source in RANDOM_CLIP_VISION:
        return _clip_encoder(random_clip_vision(RANDOM_CLIP_VISION[source], seed), source)
    folder = Path(source)
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return open_clip_encoder(folder)
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    name, subfolder = _transformers_source(source)
    try:
        config = CLIPVisionConfig.from_pretrained(name, subfolder=subfolder, revision=revision)
        if "CLIPVisionModel" in (config.architectures or []):
            model = CLIPVisionModel.from_pretrained(name, subfolder=subfolder, revision=revision)
            return ImageEncoder(model, "clip_vision", config.image_size, CLIP_MEAN, CLIP_STD, config.hidden_size,
                                config.hidden_size, (config.image_size // config.patch_size) ** 2 + 1, source)
        model = CLIPVisionModelWithProjection.from_pretrained(name, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as error:
        raise _missing_encoder(source, error) from None
    return _clip_encoder(model, source)


# ---------------------------------------------------------------------- compositional guidance's models


class IdentityEncoder:
    """Differentiable identity features of object crops: (B, 3, H, W) in [0, 1] -> (B, D), unit norm.
    DINOv2's CLS embedding for real weights (the paper's matching and identity loss), a test-size
    DINOv2 at random for tiny backbones, or an ImageEncoder's global embedding (the ShapeWorld toy,
    which has no DINOv2 of its own)."""

    def __init__(self, model, kind: str, image_size: int, mean, std, source: str):
        self.model, self.kind, self.image_size, self.source = model, kind, image_size, source
        if kind != "image_encoder":
            model.eval().requires_grad_(False)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def to(self, device) -> "IdentityEncoder":
        self.model.to(device)
        return self

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "image_encoder":
            return F.normalize(self.model.embed(pixels), dim=-1)
        size = self.image_size
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False)
        normalised = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=normalised.to(dtype))
        return F.normalize(out.pooler_output.float(), dim=-1)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def load_identity_encoder(source: str, image_encoder: ImageEncoder | None = None, seed: int = 0) -> IdentityEncoder:
    """`image_encoder` (the backbone's), `random:dinov2-tiny`, or a DINOv2 hub id / folder."""
    from transformers import Dinov2Config, Dinov2Model

    if source == "image_encoder":
        if image_encoder is None:
            raise ValueError("identity encoder 'image_encoder' needs the backbone's image encoder")
        return IdentityEncoder(image_encoder, "image_encoder", image_encoder.image_size, CLIP_MEAN, CLIP_STD, source)
    if source == "random:dinov2-tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 202)
            model = Dinov2Model(Dinov2Config(**TINY_DINOV2))
        return IdentityEncoder(model, "dinov2", TINY_DINOV2["image_size"], IMAGENET_MEAN, IMAGENET_STD, source)
    try:
        model = Dinov2Model.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"identity encoder {source!r} is not present and cannot be downloaded ({type(error).__name__}); "
                        f"download a DINOv2 folder (e.g. facebook/dinov2-base) where you have network and pass "
                        f"its path as the guidance identity encoder") from None
    return IdentityEncoder(model, "dinov2", 224, IMAGENET_MEAN, IMAGENET_STD, source)


class Segmenter:
    """Candidate object masks of a generated image: `segments(image (H, W, 3) uint8, words) -> list of
    (H, W) bool`. `oracle`: ShapeWorld's foreground components (word-agnostic); otherwise CLIPSeg prompted
    with each object's word (one mask per word: sigmoid(logits) > threshold, at the image's size)."""

    def __init__(self, kind: str, model=None, tokenizer=None, image_size: int = 352, threshold: float = 0.4,
                 source: str = ""):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.image_size, self.threshold, self.source = image_size, threshold, source
        if model is not None:
            model.eval().requires_grad_(False)

    def to(self, device) -> "Segmenter":
        if self.model is not None:
            self.model.to(device)
        return self

    @torch.no_grad()
    def segments(self, image: np.ndarray, words: list[str]) -> list[np.ndarray]:
        if self.kind == "oracle":
            from conceptkit.world.oracle import foreground_segments

            return foreground_segments(image)
        device = next(self.model.parameters()).device
        height, width = image.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
        pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pixels = ((pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        text = self.tokenizer(list(words), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        logits = self.model(input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device),
                            pixel_values=pixels.expand(len(words), -1, -1, -1).to(device)).logits
        logits = logits.reshape(len(words), 1, *logits.shape[-2:]).float()
        probabilities = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).sigmoid()
        masks = [m[0].cpu().numpy() > self.threshold for m in probabilities]
        return [m for m in masks if m.any()]


def tiny_clipseg(seed: int = 0):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from conceptkit.backbones.tiny import build_tiny_clip_tokenizer

    tokenizer = build_tiny_clip_tokenizer()
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16, extract_layers=(0, 1, 2), reduce_dim=16, decoder_intermediate_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 303)
        return CLIPSegForImageSegmentation(config), tokenizer


def load_segmenter(source: str, seed: int = 0, threshold: float = 0.4) -> Segmenter:
    """`oracle` (ShapeWorld), `random:clipseg-tiny`, or a CLIPSeg hub id / folder."""
    if source == "oracle":
        return Segmenter("oracle", source=source)
    if source == "random:clipseg-tiny":
        model, tokenizer = tiny_clipseg(seed)
        return Segmenter("clipseg", model, tokenizer, image_size=32, threshold=threshold, source=source)
    from transformers import AutoTokenizer, CLIPSegForImageSegmentation

    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"segmenter {source!r} is not present and cannot be downloaded ({type(error).__name__}); "
                        f"download a CLIPSeg folder (e.g. CIDAS/clipseg-rd64-refined) where you have network and "
                        f"pass its path as the guidance segmenter") from None
    return Segmenter("clipseg", model, tokenizer, image_size=352, threshold=threshold, source=source)
