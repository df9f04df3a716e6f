"""Textual Inversion and DreamBooth-LoRA specifics beyond the conformance table."""

from __future__ import annotations

import pytest
import torch

from conftest import example_data, make_backbone, make_method


def test_lora_prior_preservation_batches_instance_and_class():
    from conceptkit.method import TrainBatch

    backbone = make_backbone("sd15_tiny")
    method = make_method("lora", "sd15_tiny", "mug", "method.prior_preservation=true", "method.num_class_images=3",
                         "method.class_steps=2", "method.class_noun=mug")
    data = example_data(backbone)
    method.initialize(backbone, data)
    assert method._class_latents.mean.shape == (3, 4, 8, 8)  # generated and encoded once, before attach
    method.attach(backbone)
    stage = method.stages(backbone)[0]
    method.begin_stage(stage, backbone)
    from test_conceptprism import DenoiserCalls

    counter = DenoiserCalls(backbone)
    out = method.training_loss(TrainBatch(torch.tensor([0]), data, torch.Generator().manual_seed(0)), backbone, stage)
    counter.remove()
    calls = counter.calls
    assert len(calls) == 1 and calls[0][0].shape[0] == 2  # instance + class row in one call
    with torch.no_grad():
        expected_context = torch.cat([backbone.encode_text(["a photo of sks mug"])[0],
                                      backbone.encode_text(["a photo of mug"])[0]])
    torch.testing.assert_close(calls[0][2], expected_context)
    assert out["loss"].item() == pytest.approx(out["instance"].item() + 1.0 * out["prior"].item(), rel=1e-6)
    assert method.prompt("{mug} on a table") == "sks mug on a table"


def test_prior_preservation_refuses_a_modified_base_model():
    from conceptkit.errors import UserError

    backbone = make_backbone("sd15_tiny")
    other = make_method("textual_inversion", "sd15_tiny", "other")
    other.attach(backbone)
    method = make_method("lora", "sd15_tiny", "mug", "method.prior_preservation=true", "method.num_class_images=1")
    with pytest.raises(UserError, match="bare base model"):
        method.initialize(backbone, example_data(backbone))


def test_textual_inversion_trains_only_its_vectors_on_templates():
    from conceptkit.method import TrainBatch
    from conceptkit.methods.textual_inversion import TEMPLATES

    backbone = make_backbone("sd15_tiny")
    method = make_method("textual_inversion", "sd15_tiny", "cat", "method.num_vectors=3")
    data = example_data(backbone)
    method.initialize(backbone, data)
    # init word "object": every vector starts as that word's embedding (mean over its sub-tokens)
    ids = backbone.tokenizer("object", add_special_tokens=False).input_ids
    word = backbone.text_embedding_matrix()[ids].mean(0)
    torch.testing.assert_close(method.vectors.detach(), word.expand(3, -1))
    method.attach(backbone)
    stage = method.stages(backbone)[0]
    assert stage.lr == pytest.approx(5e-4 * 4)  # diffusers' scale_lr: x batch x accumulation
    method.begin_stage(stage, backbone)
    seen = []
    handle = backbone.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    method.training_loss(TrainBatch(torch.tensor([0, 1]), data, torch.Generator().manual_seed(0)), backbone, stage)
    handle.remove()
    tokenized = backbone.tokenize([t.format("<cat>") for t in TEMPLATES])
    used = seen[0]  # the input ids of the one text-encoder call
    assert all(any(torch.equal(row, t) for t in tokenized.input_ids) for row in used)
    assert int((used >= backbone.tokens.vocab_size).sum()) == 2 * 3  # 3 vectors in each of 2 prompts
