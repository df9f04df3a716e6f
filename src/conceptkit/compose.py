"""`conceptkit compose`: one backbone, N concepts from any methods, one prompt, rendered together."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from omegaconf import DictConfig

from conceptkit.embeddings import owner_id
from conceptkit.errors import UserError


def check_shared_backbone(metas: list[dict], folders: list[Path]) -> None:
    families = {m["backbone"]["family"] for m in metas}
    if len(families) > 1:
        listing = ", ".join(f"{f} ({m['backbone']['family']})" for f, m in zip(folders, metas))
        raise UserError(f"these concepts cannot share a backbone: {listing}; compose concepts of one backbone family")
    architectures = {m["backbone"].get("config", {}).get("architecture", "full") for m in metas}
    if len(architectures) > 1:
        raise UserError(f"these concepts were trained on different {families.pop()} sizes ({', '.join(sorted(architectures))}); "
                        f"compose concepts of one backbone")
    ids = {m["backbone"]["id"] for m in metas}
    if len(ids) > 1:
        # Same architecture, other weights (a fine-tune, or one model by hub id and by path): allowed.
        warnings.warn(f"concepts trained on different weights of one architecture ({', '.join(sorted(ids))}); "
                      f"rendering with the first concept's backbone", stacklevel=2)
    owners = [owner_id(m["name"]) for m in metas]
    duplicates = {m["name"] for m, o in zip(metas, owners) if owners.count(o) > 1}
    if duplicates:
        raise UserError(f"several concepts are named {', '.join(sorted(duplicates))} (or differ only in - and _); "
                        f"retrain one with another name=")


def compose_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_prompt(names: list[str]) -> str:
    return "a photo of " + " and ".join("{%s}" % n for n in names)


def check_distinct_phrases(methods: list) -> None:
    """Two concepts that expand to the same words (two DreamBooth concepts both `sks object`, say)
    cannot be told apart in a prompt."""
    phrases = {}
    for method in methods:
        phrase = method.prompt("{%s}" % method.concept_name)
        if phrase in phrases:
            raise UserError(f"concepts {phrases[phrase]} and {method.concept_name} both render as {phrase!r}; "
                            f"retrain one with another identifier (e.g. method.identifier=...)")
        phrases[phrase] = method.concept_name


def render_prompt(prompt: str, methods: list) -> str:
    names = {m.concept_name: m for m in methods}
    for placeholder in dict.fromkeys(re.findall(r"\{[^{}]*\}", prompt)):
        if placeholder[1:-1] in names:
            continue  # a concept's own name wins over other concepts' short word names (MCPL's {word})
        providers = [m.concept_name for m in methods if m.prompt(placeholder) != placeholder]
        if len(providers) > 1:
            raise UserError(f"prompt names {placeholder}, which concepts {' and '.join(providers)} all provide; "
                            f"write {{concept/word}} (e.g. {{{providers[0]}/{placeholder[1:-1]}}}) to pick one")
    for name, method in names.items():
        prompt = prompt.replace("{%s}" % name, method.prompt("{%s}" % name))
    for method in methods:
        prompt = method.prompt(prompt)
    leftover = re.findall(r"\{[^{}]*\}", prompt)
    if leftover:
        known = ", ".join("{%s}" % m.concept_name for m in methods)
        raise UserError(f"prompt names {', '.join(leftover)}, which no loaded concept provides (known: {known})")
    return prompt


def reference_paths(references) -> dict:
    """compose's references: {name: picture path}, or a list of paths (BindWeave's subjects), named
    ref1, ref2, ... in order (prompts may say {ref1})."""
    from omegaconf import DictConfig, ListConfig

    if references is None:
        return {}
    if isinstance(references, (list, tuple, ListConfig)):
        return {f"ref{k + 1}": str(path) for k, path in enumerate(references)}
    if isinstance(references, (dict, DictConfig)):
        return {str(name): str(path) for name, path in dict(references).items()}
    raise UserError(f"references={references!r}: pass {{name:picture.png,...}} or [a.png,b.png]")


def load_references(references) -> dict:
    """compose's references (see reference_paths): each picture as (H, W, 3) uint8, in the order given."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    pictures = {}
    for name, path in reference_paths(references).items():
        path = Path(path)
        if not path.is_file():
            raise UserError(f"references.{name}: {path} is not a file; pass references={{{name}:path/to/picture.png}} "
                            f"or references=[path/to/picture.png]")
        try:
            pictures[name] = np.asarray(Image.open(path).convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"references.{name}: {path} is not a readable image ({error})") from None
    return pictures


def attach_references(methods: list, backbone, pictures: dict) -> None:
    """Give the references to the one encoder concept among `methods` (one line if there is none, or
    several: which one would take them is then not said)."""
    encoders = [m for m in methods if m.kind == "encoder"]
    if pictures and not encoders:
        raise UserError("references= was given, but no concept here is an encoder concept (e.g. kv_mixed); "
                        "drop references= or add an encoder concept to concepts=")
    if len(encoders) > 1:
        raise UserError(f"several encoder concepts ({', '.join(m.concept_name for m in encoders)}) would take the "
                        f"references; compose with one of them")
    taken = {m.concept_name for m in methods} & set(pictures)
    if taken:
        raise UserError(f"references name {', '.join(sorted(taken))}, which is also a concept's name; rename the reference")
    for method in encoders:
        method.set_references(backbone, pictures)


def compose(cfg: DictConfig) -> Path:
    from conceptkit.artifact import backbone_from_meta, load_concept, read_meta
    from conceptkit.media import grid, save_media, save_png

    if not cfg.concepts:
        raise UserError("concepts is empty: pass concepts=[path/to/a.concept,...]")
    folders = [Path(c) for c in cfg.concepts]
    metas = [read_meta(f) for f in folders]
    check_shared_backbone(metas, folders)
    output = Path(cfg.output) if cfg.output else Path("outputs") / "compose"
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output {output} already exists; choose another output or pass overwrite=true")

    meta = dict(metas[0])
    if cfg.backbone_path:
        meta["backbone"] = {**meta["backbone"], "config": {**meta["backbone"]["config"], "path": cfg.backbone_path}}
    backbone = backbone_from_meta(meta).load().to(compose_device(cfg.device))
    pictures = load_references(cfg.get("references"))
    methods = [load_concept(folder, backbone)[0] for folder in folders]
    check_distinct_phrases(methods)
    for method in methods:
        method.eval()
    attach_references(methods, backbone, pictures)
    named = [m.concept_name for m in methods if m.kind != "encoder"] + list(pictures)
    text = cfg.prompt or default_prompt(named)
    prompt = render_prompt(text, methods)
    heatmaps = TokenHeatmaps(backbone, prompt, cfg.count) if cfg.attention_maps else None
    generate_kwargs = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                           scheduler=cfg.scheduler, height=cfg.height, width=cfg.width, frames=cfg.frames)
    steered = None
    try:
        for method in methods:  # a method may steer sampling itself (KV-mixed's compositional guidance)
            steered = method.steered_generate(backbone, [prompt] * cfg.count, generate_kwargs,
                                              cfg.get("compositional_guidance", "auto"))
            if steered is not None:
                break
        if steered is not None:
            media, extras = steered
        else:
            media, extras = backbone.generate([prompt] * cfg.count, **generate_kwargs), None
    finally:
        if heatmaps is not None:
            heatmaps.remove()
    staging = output.with_name(output.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    save_media(media, staging, "render", fps=getattr(backbone, "fps", 16))
    if extras is not None:  # what the steering did: its first pass and its log
        save_media(extras["first_pass"], staging / "first_pass", "render", fps=getattr(backbone, "fps", 16))
        (staging / "guidance.json").write_text(json.dumps(extras["log"], indent=2) + "\n")
    save_png(grid(media), staging / "grid.png")
    if heatmaps is not None:
        heatmaps.save(media, staging / "attention", fps=getattr(backbone, "fps", 16))
    (staging / "compose.json").write_text(json.dumps({
        "prompt": text, "expanded_prompt": prompt, "concepts": [str(f) for f in folders],
        "references": reference_paths(cfg.get("references")),
        "methods": [m["method"] for m in metas], "backbone": backbone.identity(), "count": cfg.count,
        "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
        "attention_maps": heatmaps.tokens if heatmaps is not None else [],
        "compositional_guidance": extras is not None,
    }, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


class TokenHeatmaps:
    """`attention_maps=true`: each concept token's cross-attention over the render, averaged over
    heads, every cross-attention site and every sampling step (the maps MCPL's paper visualises).

    Attached for the duration of `generate` as an attention hook; the guided batch is
    [negative rows | prompt rows], and only the prompt rows are read."""

    OWNER = "ck_compose_heatmaps"

    def __init__(self, backbone, prompt: str, count: int):
        import torch

        from conceptkit.attention import CrossAttentionMaps

        self.backbone = backbone
        self.count = count
        input_ids = backbone.tokenize([prompt]).input_ids[0]
        self.tokens, columns = [], []
        for placeholder in backbone.tokens.placeholders():
            hit = torch.isin(input_ids, torch.tensor(list(backbone.tokens.reserved_ids(placeholder))))
            if hit.any():  # a multi-vector token: its columns summed
                self.tokens.append(placeholder)
                columns.append(hit.float())
        if not self.tokens:
            raise UserError("attention_maps=true, but the prompt uses no concept token to map; name a concept in it")
        columns = torch.stack(columns, dim=-1)  # (L, n)
        rows = torch.cat([torch.zeros(count, *columns.shape), columns.expand(count, -1, -1)])
        self.recorder = CrossAttentionMaps(rows)
        backbone.hooks.add(self.OWNER, self.recorder, selector=lambda site: site.kind == "cross")

    def remove(self) -> None:
        self.backbone.hooks.remove(self.OWNER)

    def save(self, media, folder: Path, fps: int) -> None:
        """One overlay per token and render: attention/<token>_<i>.png (or .mp4 for clips)."""
        import torch
        import torch.nn.functional as F

        from conceptkit.attention import maps_on_latent_grid
        from conceptkit.media import save_media

        n, _, frames, height, width = media.shape
        latent = self.backbone.initial_latents(1, height, width, frames, torch.Generator().manual_seed(0))
        latent_frames = latent.shape[2] if latent.ndim == 5 else 1
        maps = maps_on_latent_grid(self.recorder.maps, latent_frames, latent.shape[-2], latent.shape[-1])[n:]
        maps = maps / maps.flatten(2).amax(dim=2).clamp_min(1e-12)[..., None, None, None]
        for k, token in enumerate(self.tokens):
            heat = maps[:, k]  # (n, latent frames, h, w) -> the render's frames and pixels
            heat = F.interpolate(heat.unsqueeze(1), size=(frames, height, width), mode="trilinear").squeeze(1)
            colour = torch.stack([heat, torch.zeros_like(heat), 1 - heat], dim=1)  # red = attended, blue = not
            overlay = 0.5 * media.float() + 0.5 * colour.cpu()
            save_media(overlay, folder, re.sub(r"[^0-9A-Za-z_]+", "_", token).strip("_"), fps=fps)
