"""Tiny, offline stand-ins for the real backbones: the same classes at small sizes.

Weights are random from a fixed seed; the tokenizers are built in code (a CLIP byte-level BPE and a
T5 unigram model over a small prompt vocabulary), so nothing is downloaded. They exist so that every
method runs and is tested end to end on a 2-core CPU.
"""

from __future__ import annotations

import torch

# Words that get a whole-word token; anything else falls back to characters (CLIP) or
# single-character pieces (T5), exactly like rare words do in the real tokenizers.
PROMPT_WORDS = """
a an the of in on at with and or to from by for near under over behind beside left right top
bottom front back photo picture image painting drawing render video clip frame style shot close
up view scene background foreground object objects thing toy dog cat bird car house tree flower
cup mug bottle chair table book ball cube sphere cone cylinder star heart square circle triangle
ring shape shapes red green blue yellow orange purple pink white black gray grey brown gold silver
striped dotted checkered plain wooden metal glass plastic stone small large big tiny little
beach snow forest city street room kitchen garden field sky water river mountain grass sand
desert night day sunset indoor outdoor studio light dark bright sunny rainy moving moves rolling
rotating spinning bouncing flying walking running jumping sitting sleeping slowly quickly fast
slow is are it its this that one two three his her their my your wearing holding next
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on `words` until every word is one symbol: the most frequent adjacent
    pair first, ties broken alphabetically (deterministic, unlike a hash-map trainer). Learned merges
    are consistent with how BPE applies them, so each listed word encodes to exactly one token."""
    segmented = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words) if w}
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented.values():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            i, merged = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged


def build_tiny_clip_tokenizer(words: list[str] | None = None):
    """A CLIP tokenizer (real CLIPTokenizer class, byte-level BPE) in which every word of `words`
    (default PROMPT_WORDS) is one token; other words fall back to sub-words and bytes, like rare words
    in the real tokenizer."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    merges = learn_merges(list(words or PROMPT_WORDS))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_t5_tokenizer(model_max_length: int = 64, words: list[str] | None = None):
    """A T5 tokenizer (real T5Tokenizer class, unigram model) over `words` (default PROMPT_WORDS) and
    single characters."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in words or PROMPT_WORDS:
        pieces.append(("▁" + word, -5.0))
    for code in list(range(ord("a"), ord("z") + 1)) + list(range(ord("0"), ord("9") + 1)) + [ord(c) for c in "<>_-.,!?'"]:
        pieces.append((chr(code), -10.0))
        pieces.append(("▁" + chr(code), -10.5))
    for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        pieces.append((c, -11.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_sd15_modules(seed: int = 0, sample_size: int = 8):
    """UNet2DConditionModel + AutoencoderKL + CLIPTextModel at tiny sizes (random, seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=sample_size * 4,
    )
    return tokenizer, text_encoder, unet, vae


def tiny_wan21_modules(seed: int = 0):
    """WanTransformer3DModel + AutoencoderKLWan + UMT5EncoderModel at tiny sizes (random, seeded)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    return tokenizer, text_encoder, transformer, vae
