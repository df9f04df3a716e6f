"""BiCo's training prompts, encoded once.

The diversified prompts are fixed text and the text encoder is frozen, so their context is the same at
every micro-step: BiCo encodes each distinct prompt once (at the start of a stage) and every step only
gathers its rows. The binders act after the backbone's text encoder (on the projected context inside the
denoiser, or on the encoder's output), so gradients never needed the encoder's graph.

Memory: Wan2.1 pads every prompt to 512 positions and its context is zero past each prompt's length, so
only the positions up to the longest prompt are kept (a few dozen of 512, e.g. 60 prompts x 40 x 4096
floats, not x 512) and the zeros are put back when a batch is gathered; SD1.5's CLIP context has no zero
tail and is kept whole (77 positions).
"""

from __future__ import annotations

import torch

from conceptkit.tokens import TokenizedPrompts


class EncodedPrompts:
    """The context and token rows of a fixed set of prompts, computed once with the frozen encoder."""

    def __init__(self, backbone, prompts: list[str], batch_size: int = 16):
        self.prompts = tuple(dict.fromkeys(prompts))  # distinct, first-seen order
        self._row = {prompt: i for i, prompt in enumerate(self.prompts)}
        self.tokenized = backbone.tokenize(list(self.prompts))
        chunks = []
        with torch.no_grad():
            for start in range(0, len(self.prompts), batch_size):
                part = slice(start, start + batch_size)
                chunks.append(backbone.encode_tokens(select(self.tokenized, part)))
        context = torch.cat(chunks)
        self.length = context.shape[1]
        nonzero = context.detach().abs().amax(dim=(0, 2)).ne(0).nonzero()  # once, at the start of a stage
        kept = int(nonzero.max()) + 1 if len(nonzero) else 1
        self.context = context[:, :kept].contiguous()  # the all-zero tail (Wan's padding) is not stored

    def matches(self, prompts: list[str]) -> bool:
        return set(prompts) <= set(self._row)

    def take(self, prompts: list[str]) -> tuple[torch.Tensor, TokenizedPrompts]:
        """The context (B, L, D) and token rows of these prompts, as `backbone.encode_text` gives them."""
        rows = torch.tensor([self._row[prompt] for prompt in prompts])
        context = self.context[rows.to(self.context.device)]
        context = torch.nn.functional.pad(context, (0, 0, 0, self.length - context.shape[1]))
        return context, select(self.tokenized, rows)


def select(tokenized: TokenizedPrompts, rows) -> TokenizedPrompts:
    return TokenizedPrompts(tokenized.input_ids[rows], tokenized.attention_mask[rows], tokenized.eos_index[rows],
                            tokenized.placeholder_mask[rows])
