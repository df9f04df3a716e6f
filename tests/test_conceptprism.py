"""ConceptPrism's maths on hand-checkable cases, and its training contract."""

from __future__ import annotations

import pytest
import torch

from conftest import example_data, make_backbone, make_method


def test_exclusion_anchors_are_other_images_without_replacement():
    from conceptkit.methods.conceptprism.losses import sample_others

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        for count in (2, 3, 5):
            for i in range(count):
                others = sample_others(i, count, 3, generator)
                assert i not in others
                assert len(others) == min(3, count - 1) == len(set(others))
    with pytest.raises(ValueError):
        sample_others(0, 1, 3, generator)


def test_exclusion_loss_value_and_stop_gradient_on_2x2():
    from conceptkit.methods.conceptprism.losses import exclusion_loss

    residual = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    null = torch.tensor([[0.0, 2.0], [1.0, 0.0]], requires_grad=True)
    loss = exclusion_loss(residual, null)
    # ((1-0)^2 + 0 + (3-1)^2 + (4-0)^2) / 4 = 21 / 4
    assert loss.item() == pytest.approx(21 / 4)
    loss.backward()
    torch.testing.assert_close(residual.grad, torch.tensor([[0.5, 0.0], [1.0, 2.0]]))  # 2 (r - n) / 4
    assert null.grad is None  # the null prediction is a fixed target


class DenoiserCalls:
    """Records every denoiser forward (rows, timesteps, context) through a forward pre-hook."""

    def __init__(self, backbone):
        self.calls = []
        self.handle = backbone.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        values = list(args) + [kwargs.get(k) for k in ("sample", "hidden_states", "timestep", "encoder_hidden_states")
                               if kwargs.get(k) is not None]
        self.calls.append(tuple(v.detach().clone() for v in values[:3]))

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("backbone_name", ["sd15_tiny", "wan21_tiny"])
@pytest.mark.parametrize("null_predictions", ["no_grad", "batched"])
def test_token_stage_calls_and_the_paper_loss(backbone_name, null_predictions):
    from conceptkit.method import TrainBatch
    from conceptkit.training.losses import denoising_loss

    backbone = make_backbone(backbone_name)
    method = make_method("conceptprism", backbone_name, "toy", f"method.null_predictions={null_predictions}")
    data = example_data(backbone, backbone_name)
    method.initialize(backbone, data)
    method.attach(backbone)
    stage = method.stages(backbone)[0]
    method.begin_stage(stage, backbone)
    counter = DenoiserCalls(backbone)
    out = method.training_loss(TrainBatch(torch.tensor([1]), data, torch.Generator().manual_seed(3)), backbone, stage)
    counter.remove()
    k = min(method.anchors, data.count - 1)
    if null_predictions == "batched":
        assert len(counter.calls) == 1  # reconstruction + K residual + K null in ONE call
        noisy, timesteps, context = counter.calls[0]
    else:
        # the K null rows first, without autograd, then reconstruction + K residual rows
        assert [c[0].shape[0] for c in counter.calls] == [k, 1 + k]
        (null_noisy, null_t, null_context), (noisy, timesteps, context) = counter.calls
        noisy, timesteps = torch.cat([noisy, null_noisy]), torch.cat([timesteps, null_t])
        context = torch.cat([context, null_context])
    assert noisy.shape[0] == 1 + 2 * k
    # residual and null rows of each anchor share latent and timestep; anchors differ from each other
    assert torch.equal(noisy[1:1 + k], noisy[1 + k:])
    assert torch.equal(timesteps[1:1 + k], timesteps[1 + k:])
    assert len({float(t) for t in timesteps[1:1 + k]}) == k
    # contexts: row 0 = "<toy> <toy/r1>", residual rows = "<toy/r1>", null rows = ""
    with torch.no_grad():
        expected, _ = backbone.encode_text(["<toy> <toy/r1>"] + ["<toy/r1>"] * k + [""] * k)
    torch.testing.assert_close(context, expected)
    # recompute the loss from the recorded call: L = L_rec + beta * L_excl
    with torch.no_grad():
        prediction = backbone.denoise(noisy, timesteps, context)
    rec = out["rec"].item()
    excl = denoising_loss(prediction[1:1 + k], prediction[1 + k:]).item()
    assert out["excl"].item() == pytest.approx(excl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(rec + method.beta * excl, rel=1e-5)


@pytest.mark.parametrize("backbone_name", ["sd15_tiny", "wan21_tiny"])
def test_null_predictions_without_grad_give_the_batched_loss_and_gradients(backbone_name):
    """The null rows are stop-gradient targets, so leaving them out of the graph changes nothing the
    optimiser sees; the old code (batched) kept them in it, and backward ran over 2K + 1 rows."""
    from conceptkit.method import TrainBatch

    backbone = make_backbone(backbone_name)
    data = example_data(backbone, backbone_name)
    results = {}
    for mode in ("batched", "no_grad"):
        method = make_method("conceptprism", backbone_name, "toy", f"method.null_predictions={mode}")
        method.initialize(backbone, data)
        method.attach(backbone)
        stage = method.stages(backbone)[0]
        method.begin_stage(stage, backbone)
        grad_modes = []
        handle = backbone.denoiser.register_forward_pre_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
        out = method.training_loss(TrainBatch(torch.tensor([2]), data, torch.Generator().manual_seed(5)),
                                   backbone, stage)
        handle.remove()
        assert grad_modes == ([True] if mode == "batched" else [False, True])
        out["loss"].backward()
        results[mode] = ({k: v.item() for k, v in out.items()},
                         [p.grad.clone() for p in [method.target, *method.residuals]])
        method.detach(backbone)
    (loss_b, grads_b), (loss_n, grads_n) = results["batched"], results["no_grad"]
    assert loss_b == pytest.approx(loss_n, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in grads_n)
    for gb, gn in zip(grads_b, grads_n):
        torch.testing.assert_close(gn, gb, rtol=1e-4, atol=1e-7)
    with pytest.raises(Exception, match="null_predictions"):
        make_method("conceptprism", backbone_name, "toy", "method.null_predictions=sometimes")


def test_initialisation_follows_the_official_code():
    from conceptkit.embeddings import mean_text_output

    backbone = make_backbone("sd15_tiny")
    method = make_method("conceptprism", "sd15_tiny", "toy")
    data = example_data(backbone)
    method.initialize(backbone, data)
    assert data.count == 4 and all(data.captions)
    for i, caption in enumerate(data.captions):
        group = method.residuals[i]
        assert group.shape == (8, 32)
        torch.testing.assert_close(group, mean_text_output(backbone, caption).expand(8, -1))
    # mean_text_output averages the caption's own tokens only (no BOS/EOS/padding)
    context, tokenized = backbone.encode_text([data.captions[0]])
    end = int(tokenized.eos_index[0])
    torch.testing.assert_close(mean_text_output(backbone, data.captions[0]), context[0, 1:end].mean(0))
    # target: one vector drawn from N(mean, std) of the vocabulary per dimension ("information vacuum")
    assert method.target.shape == (1, 32)
    from conceptkit.embeddings import vocabulary_statistics_init

    draws = vocabulary_statistics_init(backbone, 20000, torch.Generator().manual_seed(1))
    matrix = backbone.text_embedding_matrix()
    torch.testing.assert_close(draws.mean(0), matrix.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(draws.std(0), matrix.std(0), atol=0.01, rtol=0.02)


def test_lora_stage_freezes_tokens_and_caches_prompts():
    from conceptkit.method import TrainBatch

    backbone = make_backbone("sd15_tiny")
    method = make_method("conceptprism", "sd15_tiny", "toy")
    data = example_data(backbone)
    method.initialize(backbone, data)
    method.attach(backbone)
    lora_stage = method.stages(backbone)[1]
    assert (lora_stage.name, lora_stage.steps, lora_stage.lr, lora_stage.accumulate) == ("lora", 200, 4e-4, 4)
    method.begin_stage(lora_stage, backbone)
    assert not method.target.requires_grad and not any(p.requires_grad for p in method.residuals)
    assert all(p.requires_grad for p in method.lora.parameters())
    calls = []
    handle = backbone.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    method.training_loss(TrainBatch(torch.tensor([2]), data, torch.Generator().manual_seed(0)), backbone, lora_stage)
    handle.remove()
    assert calls == []  # frozen tokens: reconstruction prompts were encoded once in begin_stage
    cotrain = make_method("conceptprism", "sd15_tiny", "toy2", "method.cotrain_tokens=true")
    cotrain.initialize(backbone, data)
    cotrain.attach(backbone)
    cotrain.begin_stage(cotrain.stages(backbone)[1], backbone)
    assert cotrain.target.requires_grad


def test_inference_prompts_use_target_only_and_residuals_on_request():
    method = make_method("conceptprism", "sd15_tiny", "toy")
    method.import_info({"num_images": 3})
    assert method.prompt("a photo of {toy} on the beach") == "a photo of <toy> on the beach"
    assert method.prompt("{toy/r2}") == "<toy/r2>"
    assert method.token_names() == ["<toy>", "<toy/r0>", "<toy/r1>", "<toy/r2>"]


def test_one_image_is_a_clear_error(tmp_path):
    from PIL import Image

    from conceptkit.errors import UserError

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "only.png")
    backbone = make_backbone("sd15_tiny")
    method = make_method("conceptprism", "sd15_tiny", "toy")
    with pytest.raises(UserError, match="at least 2 reference images"):
        method.initialize(backbone, example_data(backbone, "sd15_tiny", f"data.images={tmp_path}"))
