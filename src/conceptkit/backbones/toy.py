"""ShapeWorld toy sizes of the real architectures (`architecture=shapes`).

Small enough to pretrain on a CPU, large enough to learn the ShapeWorld (64 px images and 9-frame
clips; 16x16 latents per image or frame).
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
    """SD1.5 classes at ShapeWorld size: 64 px images, VAE factor 4 -> 16x16x4 latents.

    Factor 4, not SD's 8: on an 8x8 grid a small object covers under two latent cells, and a denoiser
    trained there drew blobs of the right colour whose shape the oracle read at chance (0.15, with
    6 shapes) even though the VAE reconstructed shapes at 0.88. At 16x16 a shape is spatial
    structure the convolutions can draw. 4 latent channels as in SD1.5 (16x16x4 holds as many
    numbers as the 8x8x16 it replaces).
    The UNet has SD1.5's block kinds in another order: no attention at the 16x16 level (SD1.5 has
    none at its lowest resolution instead). Self-attention over 256 positions made a training step
    2.4x slower on a CPU (0.79 s against 0.34 s at batch 48), while cross-attention at 8x8 and 4x4
    still places every word."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer(shapes_words())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64)
    return tokenizer, text_encoder, unet, vae


def shapes_wan21_modules(seed: int = 0):
    """Wan2.1 classes at ShapeWorld size: 64 px, 9-frame clips -> 3x16x16x16 latents, 192 tokens.

    Spatial factor 4, not Wan's 8, for the reason given in `shapes_sd15_modules` (with Wan's 8 and
    the 2x2 patch a frame would be 4x4 tokens). Two down-sampling levels, both also halving time,
    keep Wan's temporal factor 4 (1 + 4k frames)."""
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
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], scale_factor_spatial=4)
    return tokenizer, text_encoder, transformer, vae
