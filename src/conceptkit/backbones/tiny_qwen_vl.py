"""A tiny Qwen2.5-VL built offline, of the real architecture, saved like a hub model.

Real classes throughout: `Qwen2_5_VLForConditionalGeneration` (a few layers, small widths, random
weights from a fixed seed) and a `Qwen2_5_VLProcessor` made of Qwen's image and video processors and a
Qwen2 tokenizer. The tokenizer is a byte-level BPE trained here on a few sentences with Qwen's own
pre-tokenizer (its split regex + byte level, which `Qwen2TokenizerFast` -- in transformers 5 another
name of `Qwen2Tokenizer` -- sets up itself from a vocab and merges),
plus Qwen's special tokens; the chat template is written here in Qwen's style (system turn,
`<|im_start|>role ... <|im_end|>`, one `<|vision_start|><|image_pad|><|vision_end|>` per image). Random
weights write gibberish: tests built on it check the plumbing, not the words.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2.5-VL's special tokens (the real model has them at ids 151643...; here they follow the tiny vocab).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

# Ours, in Qwen's style: a default system turn, each message between <|im_start|>role and <|im_end|>,
# each image / video as a vision span that the processor expands to one pad token per merged patch.
CHAT_TEMPLATE = (  # no whitespace control needed: the pieces hold no whitespace but Qwen's own newlines
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = ("system user assistant You are a helpful assistant.", "a red square slides to the right on a grey background",
          "a blue square moves down slowly, seen from the front",
          "Write one prompt for a text-to-image model: the subject, its appearance and its motion.",
          "a photo of a dog running on green grass in natural light")

PATCH, MERGE = 14, 2  # Qwen2.5-VL's: 14-pixel patches, 2x2 merged into one token
SIDE = PATCH * MERGE * 2  # a square image is resized to 56 x 56 pixels: 4 x 4 patches -> 4 image tokens


def _bpe_vocab_and_merges(vocab_size: int = 400, corpus=CORPUS):
    """A byte-level BPE learned on `corpus` with Qwen's pre-tokenizer: (vocab dict, merges list)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def tiny_tokenizer(vocab_size: int = 400, corpus=CORPUS):
    """A Qwen2 tokenizer whose byte-level BPE is learned on `corpus` (the ShapeWorld captioner: the
    world's captions and the instructions it answers), with Qwen's special tokens."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = _bpe_vocab_and_merges(vocab_size, corpus)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def tiny_processor(tokenizer=None, side: int = SIDE):
    """Qwen's processors around `tokenizer` (default: the test one); every image resized to side x side."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = {"shortest_edge": side * side, "longest_edge": side * side}  # min / max pixel counts: always side x side
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=PATCH, merge_size=MERGE),
        video_processor=Qwen2VLVideoProcessor(size=pixels, patch_size=PATCH, merge_size=MERGE),
        tokenizer=tokenizer or tiny_tokenizer(), chat_template=CHAT_TEMPLATE)


# The test model's sizes; the ShapeWorld captioner passes its own (conf/pretrain_vlm.yaml).
TEST_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3])  # head dim 16: rope's 8 frequencies over (t, h, w)
TEST_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])


def tiny_config(tokenizer, text: dict | None = None, vision: dict | None = None, side: int = SIDE):
    """A Qwen2_5_VLConfig of the given text / vision sizes (default: the test sizes) for `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_sizes = dict(text or TEST_TEXT)
    mrope_section = list(text_sizes.pop("mrope_section"))
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=4096, **text_sizes,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(**(vision or TEST_VISION), patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  window_size=side, out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def tiny_qwen25_vl_network(seed: int = 0):
    """(Qwen2_5_VLModel: the decoder without its LM head, processor): what a conditioning stream reads
    hidden states from (BindWeave's `random:qwen25vl-tiny`), built in memory, seeded."""
    import torch
    from transformers import Qwen2_5_VLModel

    processor = tiny_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = Qwen2_5_VLModel(tiny_config(processor.tokenizer))
    return network, processor


def build_tiny_qwen25_vl(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random Qwen2.5-VL (network, processor, generation config) into `folder`; return it."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor = tiny_processor()
    config = tiny_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = Qwen2_5_VLForConditionalGeneration(config)
    ids = processor.tokenizer.convert_tokens_to_ids
    # As the real model's generation_config.json: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    network.generation_config = GenerationConfig(eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
                                                 pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"))
    network.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
