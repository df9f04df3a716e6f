"""`conceptkit bench suite=layout methods=[bindweave] backbones=[wan21_i2v] "overrides=['backbone.weights=random']"`:
a full-size model's memory on paper, for models that do not fit this machine.

A full-size wan21_i2v at random weights without a GPU is built on the meta device (shapes, no storage).
This suite counts its parameters per part (DiT, UMT5, VAE, the CLIP image encoder and the MLLM, the last
two built on the meta device from their configs) and the activations one training sample keeps for
backward: the DiT's forward at the backbone's frames and resolution runs on meta tensors under a
saved-tensors hook that adds up the bytes autograd saves (an upper bound: a tensor saved by two ops
counts twice). Attention on meta tensors takes SDPA's math path, which saves the (heads, queries,
keys) probabilities and fp32 copies of q, k, v; a GPU's flash attention saves only q, k, v, its output
and one fp32 statistic per query and head. So every heads-first tensor the math path saves is left out
of the count (reported beside it), and flash's saved set is added per attention call instead. From those, the memory of a full fine-tune with AdamW in bf16 mixed precision (bf16
weights and grads, fp32 master weights and two fp32 moments: 16 bytes a trainable parameter) and of
inference (frozen bf16 weights) follows. Nothing is allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conceptkit.errors import UserError

GIB = 1024 ** 3


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_image_encoder(source: str) -> int:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from conceptkit.encoders import RANDOM_CLIP_VISION

    config = RANDOM_CLIP_VISION.get(source)
    if config is None:
        return 0
    with torch.device("meta"):
        return _parameters(CLIPVisionModel(CLIPVisionConfig(**config)))


def _meta_mllm() -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    from conceptkit.mllm import QWEN25_VL_7B

    with torch.device("meta"):
        return _parameters(Qwen2_5_VLModel(Qwen2_5_VLConfig(**QWEN25_VL_7B)))


def saved_activation_bytes(backbone, frames: int, height: int, width: int, slots: int, prefix_rows: int
                           ) -> tuple[int, int]:
    """(bytes autograd keeps for backward over one training sample's DiT forward, of which attention
    probability matrices), on meta tensors."""
    denoiser = backbone.denoiser
    config = denoiser.config
    latent_frames = (frames - 1) // backbone.temporal_factor + 1 + slots
    h, w = height // backbone.spatial_factor, width // backbone.spatial_factor
    dtype = next(denoiser.parameters()).dtype
    with torch.device("meta"):
        hidden = torch.empty(1, config.in_channels, latent_frames, h, w, dtype=dtype)
        context = torch.empty(1, prefix_rows + backbone.max_text_tokens, config.text_dim, dtype=dtype)
        image = torch.empty(1, slots * backbone.image_rows, config.image_dim, dtype=dtype) if config.image_dim else None
        timestep = torch.empty(1)
    tokens = latent_frames * (h // config.patch_size[1]) * (w // config.patch_size[2])
    heads = config.num_attention_heads
    sizes = {"kept": 0, "attention": 0}

    def pack(tensor):
        # The Wan processor's only heads-first tensors are SDPA's operands and what its math path saves.
        inside_attention = tensor.ndim >= 3 and heads in (tensor.shape[-3], tensor.shape[0])
        sizes["attention" if inside_attention else "kept"] += tensor.numel() * tensor.element_size()
        return tensor

    was = [p.requires_grad for p in denoiser.parameters()]
    denoiser.requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            denoiser(hidden_states=hidden, timestep=timestep, encoder_hidden_states=context,
                     encoder_hidden_states_image=image)
    finally:
        for p, flag in zip(denoiser.parameters(), was):
            p.requires_grad_(flag)
    # flash attention's saved set per call: q and its output (tokens rows), k and v (key rows), the
    # per-query log-sum-exp (fp32); per block a self-attention, a text and an image cross-attention.
    inner, width = heads * config.attention_head_dim, torch.finfo(dtype).bits // 8
    text_keys = context.shape[1] + (0 if image is None else image.shape[1] - backbone.image_rows)
    key_rows = [tokens, text_keys] + ([backbone.image_rows] if image is not None else [])
    flash = sum(2 * tokens * inner * width + 2 * keys * inner * width + heads * tokens * 4 for keys in key_rows)
    return sizes["kept"] + len(denoiser.blocks) * flash, sizes["attention"]


def run_layout_suite(cfg) -> Path:
    from hydra.utils import instantiate

    from conceptkit.config import compose

    rows = []
    for method_name in cfg.methods:
        for backbone_name in cfg.backbones:
            train_cfg = compose("train", [f"method={method_name}", f"backbone={backbone_name}", *cfg.overrides])
            backbone = instantiate(train_cfg.backbone).load()
            if not getattr(backbone, "layout_only", False):
                raise UserError(f"suite=layout counts models built on the meta device: {backbone_name} was built for real "
                                f"here (measure it with suite=speed); pass a full-size wan21_i2v with "
                                f"\"overrides=['backbone.weights=random']\"")
            parts = {"DiT (trains)": _parameters(backbone.denoiser), "UMT5 text encoder": _parameters(backbone.text_encoder),
                     "VAE": _parameters(backbone.vae),
                     "CLIP image encoder": _meta_image_encoder(backbone.image_encoder_source()),
                     "MLLM (Qwen2.5-VL-7B)": _meta_mllm()}
            mllm_dim, text_dim = 3584, backbone.denoiser.config.text_dim
            parts["connector (trains)"] = mllm_dim * text_dim + text_dim + text_dim * text_dim + text_dim
            trainable = parts["DiT (trains)"] + parts["connector (trains)"]
            # ~1300 MLLM rows: 4 canvases at half of 720 px (13 x 23 merged patches each) and the chat turn
            prefix = 1300
            activations, attention = saved_activation_bytes(backbone, backbone.default_frames, backbone.resolution,
                                                 backbone.resolution, slots=4, prefix_rows=prefix)
            frozen = sum(parts.values()) - trainable
            rows.append(dict(method=method_name, backbone=backbone_name, parts=parts, trainable=trainable,
                             frozen=frozen, activations=activations, attention_matrices=attention, prefix=prefix,
                             blocks=len(backbone.denoiser.blocks),
                             frames=backbone.default_frames, resolution=backbone.resolution,
                             training=16 * trainable + 2 * frozen + activations, inference=2 * (trainable + frozen)))
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# conceptkit bench: layout (memory on paper, nothing allocated)", ""]
    for row in rows:
        lines += [f"## {row['method']} on {row['backbone']} ({row['frames']} frames at {row['resolution']} px, "
                  f"4 reference slots, {row['prefix']} MLLM rows)", "", "| part | parameters | bf16 GiB |", "|---|---|---|"]
        lines += [f"| {name} | {count / 1e9:.2f} B | {2 * count / GIB:.1f} |" for name, count in row["parts"].items()]
        lines += ["", f"- one training sample's saved activations (DiT forward, no checkpointing, flash attention): "
                      f"{row['activations'] / GIB:.1f} GiB (SDPA's math path would keep "
                      f"{row['attention_matrices'] / GIB:.0f} GiB of attention internals instead of flash's); checkpointing each of the {row['blocks']} blocks "
                      f"keeps ~{row['activations'] / row['blocks'] / GIB:.1f} GiB (one block's) plus the block inputs",
                  f"- full fine-tune, AdamW, bf16 mixed precision (16 bytes a trainable parameter, frozen parts in bf16): "
                  f"{row['training'] / GIB:.0f} GiB for one sample on one device, before sharding (FSDP/ZeRO divides "
                  f"the 16 bytes by the device count; activation checkpointing keeps ~1/num_layers of them)",
                  f"- inference, every part in bf16: {row['inference'] / GIB:.0f} GiB of weights", ""]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    import json

    (output / "results.json").write_text(json.dumps({"suite": "layout", "rows": rows}, indent=2) + "\n")
    return output
