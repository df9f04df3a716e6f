"""A multimodal LLM's hidden states as conditioning (BindWeave's MLLM stream), owned by the backbone side.

BindWeave reads Qwen2.5-VL's final decoder states of one user turn holding the prompt and then the
reference pictures, rendered with the model's chat template and its generation prompt
("<|im_start|>assistant\\n"), the whole sequence (system turn included), no truncation. The network is
frozen and never part of a concept; `Backbone.mllm()` builds it on first use.

Sources (`backbone.mllm`):
  - a hub id or local folder of a Qwen2.5-VL checkpoint (Qwen/Qwen2.5-VL-7B-Instruct for BindWeave):
    the decoder is loaded without its LM head (`Qwen2_5_VLModel`), the processor with it
  - `shapes_qwen25vl`: the shipped ShapeWorld Qwen2.5-VL (`conceptkit pretrain vlm=shapes_qwen25vl`), the toy's
  - `random:qwen25vl-tiny`: the same classes at test size, seeded (conceptkit/backbones/tiny_qwen_vl.py)
"""

from __future__ import annotations

import numpy as np
import torch

from conceptkit.errors import UserError


class MultimodalStates:
    """`states(text, pictures) -> (L, D)`: the frozen MLLM's last hidden states of one chat turn."""

    def __init__(self, network, processor, source: str):
        self.network = network.eval().requires_grad_(False)
        self.processor = processor
        self.source = source
        config = network.config
        self.hidden_size = int(getattr(config, "text_config", config).hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device) -> "MultimodalStates":
        self.network.to(device)
        return self

    def chat_text(self, text: str, count: int) -> str:
        """The chat-templated turn: one user message [prompt, picture 1..count], then the generation prompt."""
        from conceptkit.captioning import chat_content

        return self.processor.apply_chat_template([{"role": "user", "content": chat_content(text, count, True)}],
                                                  add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def states(self, text: str, pictures: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        images = [Image.fromarray(np.asarray(p, dtype=np.uint8)) for p in pictures] or None
        inputs = self.processor(text=[self.chat_text(text, len(pictures))], images=images, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "mm_token_type_ids"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.network.parameters()).dtype)
        return self.network(**inputs).last_hidden_state[0].float()


def load_mllm(source: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> MultimodalStates:
    """The MLLM `source` names (module docstring). Missing weights: one line saying where to put them."""
    if source == "random:qwen25vl-tiny":
        from conceptkit.backbones.tiny_qwen_vl import tiny_qwen25_vl_network

        network, processor = tiny_qwen25_vl_network(seed + 202)
        return MultimodalStates(network.to(dtype), processor, source)
    from transformers import AutoProcessor, Qwen2_5_VLModel
    from transformers.utils import logging as transformers_logging

    from conceptkit.captioning import resolve_vlm

    name, source = source, resolve_vlm(source, "backbone.mllm")
    verbosity = transformers_logging.get_verbosity()
    try:
        processor = AutoProcessor.from_pretrained(source)
        # The checkpoint's LM head is left out on purpose (hidden states only): no load report about it.
        transformers_logging.set_verbosity_error()
        network = Qwen2_5_VLModel.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"MLLM {source!r} is not present and cannot be downloaded ({type(error).__name__}); download "
                        f"a Qwen2.5-VL folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct) where you have network and pass "
                        f"backbone.mllm=/path/to/it") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return MultimodalStates(network, processor, name)


# Qwen2.5-VL-7B-Instruct's sizes (its config.json), for layouts counted on the meta device (bench suite=layout).
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False,
)
