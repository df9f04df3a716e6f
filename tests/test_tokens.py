"""Token rows: placeholders expand to reserved ids, vectors are injected, and removal is exact."""

from __future__ import annotations

import pytest
import torch

from conftest import make_backbone


@pytest.mark.parametrize("name", ["sd15_tiny", "wan21_tiny"])
def test_placeholder_vectors_injected_and_removed(name):
    backbone = make_backbone(name)
    dim = backbone.text_embedding_matrix().shape[1]
    before, tokenized_before = backbone.encode_text(["a photo of <thing> on grass"])
    vectors = torch.nn.Parameter(torch.randn(3, dim))
    backbone.tokens.register("owner", "<thing>", vectors)
    context, tokenized = backbone.encode_text(["a photo of <thing> on grass"])
    # 3 vectors -> 3 reserved positions, at the place of the placeholder
    assert int(tokenized.placeholder_mask.sum()) == 3
    # the input embedding rows at those positions are exactly the vectors
    embedded = backbone.input_embedding()(tokenized.input_ids)
    torch.testing.assert_close(embedded[tokenized.placeholder_mask], vectors.detach())
    # gradients reach the vectors through the frozen encoder
    context.sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert backbone.text_embedding_matrix().grad is None
    backbone.tokens.unregister("owner")
    after, tokenized_after = backbone.encode_text(["a photo of <thing> on grass"])
    assert torch.equal(tokenized_after.input_ids, tokenized_before.input_ids)
    assert torch.equal(after, before)


def test_two_owners_and_duplicate_names():
    backbone = make_backbone("sd15_tiny")
    dim = backbone.text_embedding_matrix().shape[1]
    backbone.tokens.register("a", "<a>", torch.zeros(1, dim))
    backbone.tokens.register("b", "<b>", torch.ones(2, dim))
    with pytest.raises(ValueError, match="already used"):
        backbone.tokens.register("c", "<a>", torch.zeros(1, dim))
    tokenized = backbone.tokenize(["<a> and <b>"])
    ids = tokenized.input_ids[0]
    vocab = backbone.tokens.vocab_size
    assert ids[1] == vocab  # right after BOS
    assert ids[int(tokenized.eos_index[0])] == backbone.tokenizer.eos_token_id
    assert (ids >= vocab).sum() == 3
    backbone.tokens.unregister("a")
    assert backbone.tokens.placeholders() == ["<b>"]
