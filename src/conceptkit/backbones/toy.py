"""ShapeWorld toy sizes of the real architectures (`architecture=shapes`).

Small enough to pretrain on a CPU, large enough to learn the ShapeWorld (64 px images, 8x8 latents).
`conceptkit pretrain` trains these from the seeded random init built here; the trained weights ship
in diffusers format under conceptkit/assets/backbones/<family>_shapes/.
"""

from __future__ import annotations

import torch

from conceptkit.backbones.tiny import PROMPT_WORDS, build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

def shapes_words() -> list[str]:
    """Every word the world's captions use (factor values and grammar), so each gets a whole-word
    token. Collected from captions sampled with a fixed seed: deterministic, and it follows the
    grammar when the grammar changes (before pretraining; the tokenizer then ships with the weights)."""
    import re

    import numpy as np

    from conceptkit.world import factors
    from conceptkit.world.captions import caption_scene

    rng = np.random.default_rng(0)
    words = [*factors.SHAPES, *factors.COLOURS, *factors.PATTERNS, *factors.SIZES, *factors.REGIONS,
             *factors.BACKGROUND_COLOURS, *factors.BACKGROUND_PATTERNS, *factors.DIRECTIONS, *factors.SPEEDS,
             *factors.ROTATIONS]
    for i in range(3000):
        scene = factors.sample_scene(rng, split="all", clip_frames=9 if i % 3 == 0 else None)
        words += re.findall(r"[a-z]+", caption_scene(scene, rng).lower())
    words += PROMPT_WORDS
    return list(dict.fromkeys(words))


def shapes_sd15_modules(seed: int = 0):
    """SD1.5 classes at ShapeWorld size: 64 px images, VAE factor 8 -> 8x8x16 latents.

    16 latent channels, not SD's 4: with 4, a VAE of this size reconstructed world renders that the
    oracle read at 40 % shape accuracy after 1500 steps (blobs); the 8x8 grid keeps the UNet cheap."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer(shapes_words())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=16, out_channels=16, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    return tokenizer, text_encoder, unet, vae


def shapes_wan21_modules(seed: int = 0):
    """Wan2.1 classes at ShapeWorld size: 64 px, 9-frame clips -> 3x8x8x16 latents, 48 tokens."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_t5_tokenizer(64, shapes_words())
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return tokenizer, text_encoder, transformer, vae
