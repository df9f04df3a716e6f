"""Compositional guidance at inference (paper section 3.4), for 2+ references by default.

1. Generate once from the seed's noise.
2. Segment each render (backbone.auxiliary("segmenter"): CLIPSeg prompted by each object's word for
   real weights, the oracle's components on ShapeWorld) and match segments to references by identity
   similarity (backbone.auxiliary("identity"): DINOv2; on ShapeWorld the toy's image encoder) with
   Hungarian matching (conceptkit.matching).
3. Regenerate from the same noise with each reference's visual-prompt tokens masked out of every
   query outside its matched segment (attention logit -inf, conditional rows only: RegionLogitBias),
   and, during the first `refine_until` of the sampling steps, refine only the value tokens (the
   appearance tokens in KV-mixed) by `refine_iterations` Adam steps on an identity loss: 1 - cosine
   between each matched segment of the decoded x0 prediction and its reference.
Everything is logged (GuidanceLog -> compose's guidance.json), with the time each phase took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from conceptkit.attention import RegionLogitBias
from conceptkit.errors import UserError
from conceptkit.matching import match_by_similarity

OWNER = "ck_compositional_guidance"
FILL = 0.5  # grey outside an object's segment in its crop, as conceptkit.corpus.REFERENCE_FILL / 255


@dataclass
class GuidanceSettings:
    enabled: str | bool = "auto"  # auto: on for 2+ references
    refine_until: float = 0.5  # fraction of the sampling steps with appearance refinement
    refine_iterations: int = 2  # Adam steps per refined sampling step
    refine_lr: float = 0.02
    min_similarity: float = -1.0  # matches below this are dropped (that reference then is not masked)
    region_threshold: float = 0.25  # share of a latent cell a segment must cover to count as inside
    segmenter: str | None = None  # None: the backbone's default (auxiliary_default)
    identity: str | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "GuidanceSettings":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"method.guidance has unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        settings = cls(**values)
        if settings.enabled not in ("auto", True, False):
            raise UserError(f"compositional guidance enabled={settings.enabled!r}: use auto, true or false")
        return settings

    def active(self, references: int) -> bool:
        return references >= 2 if self.enabled == "auto" else bool(self.enabled)


@dataclass
class GuidanceLog:
    rows: list[dict] = field(default_factory=list)  # per render: segments, similarity, matches, losses
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def to_uint8(media: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, 1, H, W) in [0, 1] -> N (H, W, 3) uint8 images."""
    return [(m[:, 0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for m in media]


def crop_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1


def masked_crop(image: torch.Tensor, mask: torch.Tensor, box) -> torch.Tensor:
    """(3, H, W) image, (H, W) float mask -> the object cut out as reference pictures are: grey outside
    its mask, cropped to its box, padded square. Differentiable in the image."""
    top, bottom, left, right = box
    cut = image * mask + FILL * (1 - mask)
    cut = cut[:, top:bottom, left:right]
    height, width = cut.shape[-2:]
    side = max(height, width)
    pad_y, pad_x = side - height, side - width
    return F.pad(cut, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2), value=FILL)


def picture_tensor(picture: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1).float() / 255


class CompositionalGuidance:
    def __init__(self, method, backbone, settings: GuidanceSettings):
        self.method, self.backbone, self.settings = method, backbone, settings
        self.log = GuidanceLog()

    # matching ---------------------------------------------------------------------------------
    def _features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        identity = self.backbone.auxiliary("identity", self.settings.identity)
        size = max(max(c.shape[-1] for c in crops), 8)
        batch = torch.stack([F.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                             for c in crops]).to(self.backbone.device)
        return identity.features(batch)

    def match(self, images: list[np.ndarray], pictures: dict[str, np.ndarray], words: list[str]):
        """Per render: {reference index: segment mask (H, W) bool} and its log row."""
        segmenter = self.backbone.auxiliary("segmenter", self.settings.segmenter)
        with torch.no_grad():
            references = self._features([picture_tensor(p) for p in pictures.values()])
        matched = []
        for index, image in enumerate(images):
            segments = segmenter.segments(image, words)
            row = {"render": index, "segments": len(segments), "matches": [], "similarity": []}
            assignment = {}
            if segments:
                pixels = picture_tensor(image)
                crops = [masked_crop(pixels, torch.from_numpy(m).float(), crop_box(m)) for m in segments]
                with torch.no_grad():
                    similarity = (self._features(crops) @ references.T).cpu()  # (segments, references)
                row["similarity"] = [[round(float(v), 4) for v in r] for r in similarity]
                for match in match_by_similarity(similarity, self.settings.min_similarity):
                    assignment[match.column] = segments[match.row]
                    row["matches"].append({"reference": list(pictures)[match.column], "segment": match.row,
                                           "similarity": round(float(match.score), 4)})
            matched.append(assignment)
            self.log.rows.append(row)
        return matched

    # regions ----------------------------------------------------------------------------------
    def region_bias(self, matched, count: int, latent_shape) -> RegionLogitBias | None:
        """Columns: each reference's slot positions in the conditional rows; regions: its segment on
        the latent grid (unmatched references stay unrestricted)."""
        rows = self.backbone.hooks.rows  # declared by generate for the guided batch [negatives | prompts]
        if rows is None:
            raise RuntimeError("compositional guidance needs the guided batch's rows")
        method = self.method
        first = self.backbone.tokens.reserved_ids(method.slot_token(0)).start
        offset = rows.input_ids - first
        slot = torch.where((offset >= 0) & (offset < method.max_objects * method.tokens), offset // method.tokens,
                           torch.full_like(offset, -1))  # (2N, L): which reference a column belongs to
        batch, keys = slot.shape
        height, width = latent_shape
        regions = torch.ones(batch, keys, 1, height, width, dtype=torch.bool)
        columns = torch.zeros(batch, keys, dtype=torch.bool)
        any_region = False
        for render, assignment in enumerate(matched):
            row = count + render  # the conditional row of this render
            for reference, mask in assignment.items():
                cells = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(height, width), mode="area")[0, 0]
                inside = cells >= self.settings.region_threshold
                if not inside.any():
                    continue
                hit = slot[row] == reference
                columns[row] |= hit
                regions[row, hit] = inside[None, None]
                any_region = True
        return RegionLogitBias(columns, regions) if any_region else None

    # refinement -------------------------------------------------------------------------------
    def refinement(self, matched, pictures, steps: int, keys_tokens, values_tokens):
        """A generate callback refining the value tokens per render (count, M, tokens, C)."""
        settings, method, backbone = self.settings, self.method, self.backbone
        with torch.no_grad():
            reference_features = self._features([picture_tensor(p) for p in pictures.values()])
        count = len(matched)
        values = values_tokens[None].repeat(count, 1, 1, 1).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([values], lr=settings.refine_lr)
        last_step = int(round(settings.refine_until * steps))
        pairs = [(render, reference, mask) for render, assignment in enumerate(matched)
                 for reference, mask in assignment.items()]
        losses = []

        def condition(current):
            both = torch.cat([current, current])  # guided batch: [negative rows | prompt rows]
            method.condition(keys_tokens, both)

        def callback(step):
            if step.index >= last_step or not pairs:
                condition(values.detach())
                return
            # Only the value tokens may take a gradient: the adapters and projections stay as trained.
            trainable = [p for p in method.parameters() if p.requires_grad]
            for p in trainable:
                p.requires_grad_(False)
            try:
                refine_step(step)
            finally:
                for p in trainable:
                    p.requires_grad_(True)
            condition(values.detach())

        def refine_step(step):
            for _ in range(settings.refine_iterations):
                with torch.enable_grad():
                    condition(values)
                    _, clean = step.predict()
                    images = backbone.decode_with_grad(clean)  # (N, 3, H, W) in [0, 1]
                    crops, targets = [], []
                    for render, reference, mask in pairs:
                        weight = torch.from_numpy(mask).float().to(images.device)
                        crops.append(masked_crop(images[render], weight, crop_box(mask)))
                        targets.append(reference)
                    features = self._features(crops)
                    loss = (1 - (features * reference_features[targets]).sum(-1)).mean()
                    optimiser.zero_grad()
                    loss.backward()
                optimiser.step()
                losses.append({"step": step.index, "identity_loss": round(float(loss), 5)})

        return callback, losses

    # the whole procedure ----------------------------------------------------------------------
    def generate(self, prompts: list[str], pictures: dict[str, np.ndarray], words: list[str], generate_kwargs: dict):
        backbone, method = self.backbone, self.method
        seed = generate_kwargs.get("seed", 0)
        noise = backbone.initial_noise(len(prompts), seed, generate_kwargs.get("height"), generate_kwargs.get("width"))
        started = time.perf_counter()
        first = backbone.generate(prompts, initial_latents=noise, **generate_kwargs)
        self.log.seconds["first_pass"] = time.perf_counter() - started
        started = time.perf_counter()
        matched = self.match(to_uint8(first), pictures, words)
        self.log.seconds["segment_and_match"] = time.perf_counter() - started
        layout, appearance = method.reference_tokens
        keys, values = method.key_value_tokens(layout, appearance)
        keys, values = method.padded(keys), method.padded(values)
        # The guided batch's rows are declared inside generate; the bias reads them at its first call.
        bias = LazyRegionBias(self, matched, len(prompts), noise.shape[-2:])
        backbone.hooks.add(OWNER, bias, selector=lambda site: site.kind == "cross")
        refine, losses = self.refinement(matched, pictures, generate_kwargs.get("steps", 25), keys, values)
        started = time.perf_counter()
        try:
            second = backbone.generate(prompts, initial_latents=noise, callbacks=[refine], **generate_kwargs)
        finally:
            backbone.hooks.remove(OWNER)
            method.condition(keys, values)  # back to the references' own tokens
        self.log.seconds["second_pass"] = time.perf_counter() - started
        self.log.seconds["extra_over_plain"] = self.log.seconds["segment_and_match"] + self.log.seconds["second_pass"]
        self.log.rows.append({"refinement": losses, "masked_columns": bias.masked_columns})
        return first, second


class LazyRegionBias:
    """Builds the RegionLogitBias at its first attention call, once generate has declared the guided
    batch's rows (the slot positions come from those ids)."""

    def __init__(self, guidance: CompositionalGuidance, matched, count: int, latent_shape):
        self.guidance, self.matched, self.count, self.latent_shape = guidance, matched, count, tuple(latent_shape)
        self.bias = None
        self.built = False
        self.masked_columns = 0

    def logit_bias(self, site, batch, queries, keys):
        if not self.built:
            self.bias = self.guidance.region_bias(self.matched, self.count, self.latent_shape)
            self.masked_columns = int(self.bias.columns.sum()) if self.bias is not None else 0
            self.built = True
        return None if self.bias is None else self.bias.logit_bias(site, batch, queries, keys)
