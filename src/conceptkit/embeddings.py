"""Functions methods share for token vectors and LoRA adapters (shared by calling, not inheriting)."""

from __future__ import annotations

import re

import torch
from torch import nn

from conceptkit.errors import UserError


def owner_id(concept_name: str) -> str:
    """A PEFT-adapter / hook owner name that is safe as a module key."""
    return "ck_" + re.sub(r"[^0-9A-Za-z_]", "_", concept_name)


@torch.no_grad()
def vocabulary_statistics_init(backbone, n: int, generator: torch.Generator) -> torch.Tensor:
    """N(mean, std) per dimension of the input-embedding matrix: ConceptPrism's 'information vacuum'.
    Accumulated in chunks (float64), so a 256k-row UMT5 matrix is never copied whole to float32."""
    matrix = backbone.text_embedding_matrix().detach()
    total = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    squares = torch.zeros_like(total)
    for chunk in matrix.split(16384):
        chunk = chunk.double()
        total += chunk.sum(dim=0)
        squares += (chunk * chunk).sum(dim=0)
    rows = matrix.shape[0]
    mean = total / rows
    std = ((squares - rows * mean * mean) / (rows - 1)).clamp_min(0).sqrt()  # unbiased, as torch.std
    return (torch.randn((n, matrix.shape[1]), generator=generator, dtype=torch.float64) * std.cpu() + mean.cpu()).float()


def word_init(backbone, word: str, n: int) -> torch.Tensor:
    """Each of the n vectors starts as the input embedding of `word` (mean over its sub-tokens)."""
    ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"init word {word!r} gives no tokens; pick another method init word")
    matrix = backbone.text_embedding_matrix().detach()
    rows = matrix[torch.tensor(ids, device=matrix.device)].float().cpu()
    return rows.mean(dim=0, keepdim=True).repeat(n, 1)


@torch.no_grad()
def mean_text_output(backbone, caption: str) -> torch.Tensor:
    """Mean of the text encoder's output states over the caption's own tokens (BOS, EOS and padding
    excluded): ConceptPrism's residual-token initialisation."""
    context, tokenized = backbone.encode_text([caption])
    start = 1 if backbone.tokens.has_bos else 0
    end = int(tokenized.eos_index[0])
    if end <= start:
        raise UserError(f"caption {caption!r} has no tokens to initialise from")
    return context[0, start:end].float().mean(dim=0).cpu()


def attach_lora(store: nn.ModuleDict, backbone, owner: str, rank: int, alpha: float, targets: list[str],
                init: str | bool) -> None:
    """Create the PEFT adapter `owner` in the backbone and keep its modules in `store`, so they are the
    method's parameters. If `store` already holds weights (re-attach, load), they are carried over."""
    previous = {key: module.state_dict() for key, module in store.items()}
    created = backbone.add_lora(owner, rank=rank, alpha=alpha, target_modules=targets, init=init)
    for path, pair in created.items():
        key = path.replace(".", "__")
        if key in previous:
            pair.load_state_dict(previous[key])
        store[key] = pair


def diffusers_lora_state_dict(backbone, owner: str, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter `owner` in diffusers' LoRA file layout (`unet.<module>.lora_A.weight`, or
    `transformer.` for Wan), as `load_lora_weights` / `load_lora_adapter` read it. Those loaders
    assume alpha = rank without metadata, so the alpha / rank scale is folded into lora_B."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(backbone.denoiser, adapter_name=owner)
    scale = alpha / rank
    out = {}
    for key, value in state.items():
        value = value.detach().float().cpu()
        out[f"{backbone.lora_prefix}.{key}"] = (value * scale if ".lora_B." in key else value).contiguous()
    return out
