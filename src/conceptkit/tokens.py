"""Learned token rows without touching the tokenizer or the embedding matrix.

Each placeholder (e.g. ``<dog>``) is registered with an owner and a tensor of shape (n, d): the
placeholder expands to n reserved ids (>= the vocabulary size). A forward pre-hook on the text
encoder's input embedding swaps reserved ids for a valid id and remembers where they were; the
forward hook then writes the owner's vectors into those rows. Both handles are stored, so `remove`
undoes everything exactly. The vectors stay the method's own parameters: gradients reach them
directly, and nothing has to be restored after an optimiser step.

This also sidesteps diffusers' textual-inversion prompt helper, which mangles multi-vector names
(REFERENCE.md, ConceptPrism pitfall): conceptkit tokenizes prompts itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long: 1 for real tokens (incl. BOS/EOS), 0 for padding
    eos_index: torch.Tensor  # (B,) position of the EOS token
    placeholder_mask: torch.Tensor  # (B, L) bool: positions filled by registered vectors

    def rows(self, index: slice) -> "TokenizedPrompts":
        """The prompts `index` selects (e.g. one half of a batch tokenized in one call)."""
        return TokenizedPrompts(self.input_ids[index], self.attention_mask[index], self.eos_index[index],
                                self.placeholder_mask[index])


class TokenTable:
    def __init__(self, tokenizer, embedding: nn.Embedding, max_length: int, has_bos: bool):
        self.tokenizer = tokenizer
        self.embedding = embedding
        self.max_length = max_length
        self.has_bos = has_bos
        self.vocab_size = embedding.num_embeddings
        self._entries: dict[str, tuple[str, torch.Tensor]] = {}  # placeholder -> (owner, (n, d) tensor)
        self._handles: list = []
        self._pending: list[torch.Tensor] = []

    # registration --------------------------------------------------------------------------
    def register(self, owner: str, placeholder: str, vectors: torch.Tensor) -> None:
        if placeholder in self._entries:
            other = self._entries[placeholder][0]
            raise ValueError(f"token {placeholder!r} is already used by concept {other!r}; give the concepts different names")
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding.embedding_dim:
            raise ValueError(
                f"token {placeholder!r}: vectors must have shape (n, {self.embedding.embedding_dim}), got {tuple(vectors.shape)}"
            )
        self._entries[placeholder] = (owner, vectors)
        if not self._handles:
            self._handles = [
                self.embedding.register_forward_pre_hook(self._pre_hook),
                self.embedding.register_forward_hook(self._post_hook),
            ]

    def unregister(self, owner: str) -> None:
        self._entries = {k: v for k, v in self._entries.items() if v[0] != owner}
        if not self._entries:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def placeholders(self) -> list[str]:
        return list(self._entries)

    def reserved_ids(self, placeholder: str) -> range:
        """The ids `placeholder` expands to right now (they shift when an earlier entry is removed),
        so callers can find its positions in `tokenize(...).input_ids`."""
        ranges = self._reserved_ranges()
        if placeholder not in ranges:
            raise KeyError(f"token {placeholder!r} is not registered")
        return ranges[placeholder]

    # tokenization ----------------------------------------------------------------------------
    def _reserved_ranges(self) -> dict[str, range]:
        ranges, start = {}, self.vocab_size
        for placeholder, (_, vectors) in self._entries.items():
            ranges[placeholder] = range(start, start + vectors.shape[0])
            start += vectors.shape[0]
        return ranges

    def _stacked_vectors(self) -> torch.Tensor:
        return torch.cat([vectors for _, vectors in self._entries.values()], dim=0)

    def _ids_for(self, text: str, ranges: dict[str, range]) -> list[int]:
        if not ranges:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        pattern = "(" + "|".join(re.escape(p) for p in sorted(ranges, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for piece in re.split(pattern, text):
            if piece in ranges:
                ids.extend(ranges[piece])
            elif piece.strip():
                ids.extend(self.tokenizer(piece.strip(), add_special_tokens=False).input_ids)
        return ids

    def tokenize(self, texts: list[str]) -> TokenizedPrompts:
        ranges = self._reserved_ranges()
        bos = [self.tokenizer.bos_token_id] if self.has_bos else []
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id
        rows, masks, eos_positions = [], [], []
        for text in texts:
            body = self._ids_for(text, ranges)[: self.max_length - len(bos) - 1]
            ids = bos + body + [eos_id]
            eos_positions.append(len(ids) - 1)
            masks.append([1] * len(ids) + [0] * (self.max_length - len(ids)))
            rows.append(ids + [pad_id] * (self.max_length - len(ids)))
        input_ids = torch.tensor(rows, dtype=torch.long)
        return TokenizedPrompts(
            input_ids=input_ids,
            attention_mask=torch.tensor(masks, dtype=torch.long),
            eos_index=torch.tensor(eos_positions, dtype=torch.long),
            placeholder_mask=input_ids >= self.vocab_size,
        )

    # embedding hooks -------------------------------------------------------------------------
    def _pre_hook(self, module, args):
        (input_ids,) = args
        reserved = input_ids >= self.vocab_size
        self._pending.append((input_ids, reserved))
        return (input_ids.masked_fill(reserved, 0),)

    def _post_hook(self, module, args, output):
        input_ids, reserved = self._pending.pop()
        if not reserved.any():
            return output
        vectors = self._stacked_vectors().to(device=output.device, dtype=output.dtype)
        rows = vectors[input_ids[reserved] - self.vocab_size]
        output = output.clone()
        output[reserved] = rows
        return output
