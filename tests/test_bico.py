"""BiCo: binder maths, token-position masking, the absorbent token, the guided batch's negative rows,
the gates, the per-stage timestep sampling, composition masks, diversified prompts, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import example_data, make_backbone, make_method, predict
from conceptkit.errors import UserError
from conceptkit.methods.bico.binders import Binder, DualBranchBinder, bind, gate_values

BACKBONES = ["sd15_tiny", "wan21_tiny"]


class ContextRecorder:
    """A context hook that keeps what it sees (added after BiCo's hooks, so it sees their result)."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def context(self, site, encoder_hidden_states):
        self.seen.append(encoder_hidden_states.detach().clone())
        return encoder_hidden_states


def attached(backbone_name, name="thing", *extra):
    backbone = make_backbone(backbone_name)
    method = make_method("bico", backbone_name, name, *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.initialize(backbone, example_data(backbone, backbone_name))
    method.attach(backbone)
    return backbone, method


def perturb(method, seed=1, scales=True):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if scales or not name.endswith("scale"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def record_first_cross_site(backbone, run):
    site = next(s for s in backbone.attention_sites() if s.kind == "cross")
    recorder = ContextRecorder()
    backbone.hooks.add("test_recorder", recorder, selector=lambda s: s.name == site.name)
    try:
        run()
    finally:
        backbone.hooks.remove("test_recorder")
    return recorder.seen


# binder maths ---------------------------------------------------------------------------------
def test_binder_starts_as_identity_and_touches_only_masked_positions():
    torch.manual_seed(0)
    g, b = Binder(8), Binder(8)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False, True, True, False, False], [False, False, False, False, False]])
    assert torch.equal(bind(x, mask, g, b), x)  # scale 0: exact identity
    with torch.no_grad():
        g.scale.fill_(0.7)
        b.scale.fill_(-0.3)
    out = bind(x, mask, g, b)
    assert torch.equal(out[~mask], x[~mask])
    assert not torch.allclose(out[mask], x[mask])
    # hierarchy: the block binder sees the globally bound context (not the raw one)
    bound_global = x + g(x)
    torch.testing.assert_close(out[mask], (bound_global + b(bound_global))[mask])


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_zero_scale_bound_backbone_equals_unbound_exactly(backbone_name):
    backbone, method = attached(backbone_name)
    perturb(method, scales=False)  # every binder weight moved, but every scale still 0
    prompt = method.prompt("a photo of {thing} on the beach")
    bound = predict(backbone, [prompt, "a red dog"])
    method.detach(backbone)
    plain = predict(backbone, ["a photo of %s on the beach" % method.resolved_description, "a red dog"])
    assert torch.equal(bound, plain)
    method.attach(backbone)
    with torch.no_grad():
        method.global_binder.scale.fill_(0.5)
    assert not torch.equal(predict(backbone, [prompt, "a red dog"]), plain)  # the check can fail


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_binders_act_only_at_the_concepts_tokens_and_never_on_negative_rows(backbone_name):
    backbone, method = attached(backbone_name)
    perturb(method)
    prompt = method.prompt("a photo of {thing} on the beach")
    tokens = backbone.tokenize([prompt])
    where = torch.isin(tokens.input_ids[0], torch.tensor(list(backbone.tokens.reserved_ids(method.token))))
    assert where.sum() == len(backbone.tokenizer(method.resolved_description, add_special_tokens=False).input_ids)

    def guided():
        backbone.generate([prompt], negative_prompt=prompt, steps=1)  # the token in BOTH halves

    bound = record_first_cross_site(backbone, guided)[0]
    saved = {n: p.detach().clone() for n, p in method.named_parameters()}
    with torch.no_grad():
        for n, p in method.named_parameters():
            if n.endswith("scale"):
                p.zero_()
    identity = record_first_cross_site(backbone, guided)[0]
    negative, positive = bound.chunk(2)
    assert torch.equal(negative, identity.chunk(2)[0])  # negative CFG branch: no binders
    changed = (positive != identity.chunk(2)[1]).any(-1)[0]
    assert torch.equal(changed, where)  # exactly the concept's positions
    with torch.no_grad():
        for n, p in method.named_parameters():
            p.copy_(saved[n])


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_absorbent_token_in_the_eos_slot_in_training_only(backbone_name):
    from conceptkit.method import TrainBatch

    backbone, method = attached(backbone_name)
    data = example_data(backbone, backbone_name)
    stage = method.stages()[0]
    method.begin_stage(stage, backbone)
    batch = TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(0))
    seen = record_first_cross_site(backbone, lambda: method.training_loss(batch, backbone, stage))[0]
    eos = backbone.hooks.rows.eos_index
    absorbent = method.absorbent_token.detach().to(seen.dtype)
    for row, position in enumerate(eos):
        assert torch.equal(seen[row, position], absorbent)
    prompt = method.prompt("a photo of {thing}")
    seen = record_first_cross_site(backbone, lambda: predict(backbone, [prompt]))[0]
    position = backbone.tokenize([prompt]).eos_index[0]
    assert not torch.equal(seen[0, position], absorbent)


def test_stages_train_global_first_then_all_with_their_own_timesteps():
    from conceptkit.methods.bico.schedule import side_timesteps

    backbone, method = attached("wan21_tiny")
    stages = method.stages()
    assert [s.name for s in stages] == ["global", "all"]
    method.begin_stage(stages[0], backbone)
    assert all(p.requires_grad for p in method.global_binder.parameters())
    assert not any(p.requires_grad for p in method.block_binders.parameters())
    method.begin_stage(stages[1], backbone)
    assert all(p.requires_grad for p in method.parameters())
    assert method.stage_favours("global") == "low" and method.stage_favours("all") == "high"  # official code
    generator = torch.Generator().manual_seed(0)
    low = side_timesteps(backbone, 2000, 417.0, "low", 0.8, generator)
    assert 0.77 < (low < 417.0).float().mean() < 0.83
    high = side_timesteps(backbone, 2000, 417.0, "high", 0.8, generator)
    assert 0.77 < (high >= 417.0).float().mean() < 0.83
    paper = make_method("bico", "wan21_tiny", "x", "method.global_stage_favours=high")
    assert paper.stage_favours("global") == "high" and paper.stage_favours("all") == "low"


# gates ------------------------------------------------------------------------------------------
def test_sigmoid_gate_and_code_gate_give_the_documented_values():
    logits = torch.tensor([[-3.0], [0.0], [2.0], [9.0]])
    torch.testing.assert_close(gate_values(logits, "sigmoid"), torch.sigmoid(logits))
    assert torch.equal(gate_values(logits, "code"), torch.ones_like(logits))  # softmax over one entry
    torch.manual_seed(0)
    spatial = Binder(6)
    with torch.no_grad():
        spatial.scale.fill_(0.5)
    x = torch.randn(3, 4, 6)
    for kind, g in (("sigmoid", 0.8807970779778823), ("code", 1.0)):
        dual = DualBranchBinder(spatial, gate=kind)
        gate = gate_values(dual.gate(dual.gate_norm(x)), kind)
        torch.testing.assert_close(gate, torch.full_like(gate, g))
        torch.testing.assert_close(dual(x), spatial(x))  # both branches start as the stage-1 binder
    code = DualBranchBinder(spatial, gate="code")
    code(x).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in code.motion.parameters())  # never trains
    sigmoid = DualBranchBinder(Binder(6), gate="sigmoid")
    with torch.no_grad():
        sigmoid.spatial.scale.fill_(0.5)
        sigmoid.motion.scale.fill_(0.5)
    sigmoid(x).sum().backward()
    assert sigmoid.motion.scale.grad.abs() > 0


# composition ------------------------------------------------------------------------------------
def test_composition_masks_on_a_hand_built_prompt_with_two_concepts():
    from conceptkit.compose import render_prompt

    backbone = make_backbone("sd15_tiny")
    data = example_data(backbone, "sd15_tiny")
    subject = make_method("bico", "sd15_tiny", "subject", "method.description=red dog")
    motion = make_method("bico", "sd15_tiny", "motion", "method.description=jumping high")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (subject, motion):
            m.initialize(backbone, data)
            m.attach(backbone)
    prompt = render_prompt("a {subject} is {motion} in a park", [subject, motion])
    assert prompt == "a <subject> is <motion> in a park"
    rows = backbone.encode_text([prompt])[1]
    from conceptkit.attention import ContextRows

    rows = ContextRows.conditional(rows)
    # hand-built: BOS, "a", subject's 2 rows, "is", motion's 2 rows, "in", "a", "park", EOS
    n_subject = len(backbone.tokenizer("red dog", add_special_tokens=False).input_ids)
    n_motion = len(backbone.tokenizer("jumping high", add_special_tokens=False).input_ids)
    n_a = len(backbone.tokenizer("a", add_special_tokens=False).input_ids)
    n_is = len(backbone.tokenizer("is", add_special_tokens=False).input_ids)
    expected_subject = torch.zeros(rows.input_ids.shape[1], dtype=torch.bool)
    expected_subject[1 + n_a: 1 + n_a + n_subject] = True
    start = 1 + n_a + n_subject + n_is
    expected_motion = torch.zeros_like(expected_subject)
    expected_motion[start: start + n_motion] = True
    assert torch.equal(subject.positions(rows, backbone)[0], expected_subject)
    assert torch.equal(motion.positions(rows, backbone)[0], expected_motion)
    # each concept's binders move only its own positions
    perturb(subject)
    seen = record_first_cross_site(backbone, lambda: predict(backbone, [prompt]))[0]
    subject.detach(backbone)
    motion.detach(backbone)
    plain = record_first_cross_site(backbone, lambda: predict(backbone, ["a red dog is jumping high in a park"]))[0]
    assert torch.equal((seen != plain).any(-1)[0], expected_subject)
    with pytest.raises(UserError, match=r"\{ghost\}"):
        render_prompt("a {ghost} and {subject}", [subject])


def test_binder_concept_composes_with_another_methods_concept():
    from conceptkit.compose import render_prompt

    backbone, bico = attached("sd15_tiny", "thing")
    token_concept = make_method("textual_inversion", "sd15_tiny", "other")
    token_concept.initialize(backbone, example_data(backbone, "sd15_tiny"))
    token_concept.attach(backbone)
    perturb(bico)
    prompt = render_prompt("{thing} with {other}", [bico, token_concept])
    together = predict(backbone, [prompt])
    for method in (bico, token_concept):
        method.detach(backbone)
        assert not torch.equal(predict(backbone, [prompt]), together), method.name
        method.attach(backbone)
        assert torch.equal(predict(backbone, [prompt]), together)


# prompts ---------------------------------------------------------------------------------------
def test_diversified_prompts_offline_fallback_own_list_and_vlm_errors(tmp_path):
    from conceptkit.methods.bico.diversify import diversified_prompts, parse_prompt_lines

    with pytest.warns(UserWarning, match="method.vlm is not set"):
        prompts = diversified_prompts("a red dog", "a red dog on grass", 60, None)
    assert len(prompts) == 60 and len(set(prompts)) > 15 and all("red dog" in p for p in prompts)
    assert diversified_prompts("x", None, 60, None, own=["one two", " three "]) == ["one two", "three"]
    assert parse_prompt_lines('1. a dog runs fast\n- "a red dog sits"\n\nok\n', 5) == ["a dog runs fast", "a red dog sits"]
    with pytest.raises(UserError, match="data.captioner|cannot load"):
        diversified_prompts("x", None, 3, str(tmp_path / "no_model_here"), image=None)


# bad input --------------------------------------------------------------------------------------
def _one_line(error):
    return "\n" not in str(error.value)


def test_bad_video_input_is_one_clear_line(tmp_path):
    import numpy as np
    from PIL import Image

    from conceptkit.data import load_media

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip.mp4").write_bytes(b"not a video")
    with pytest.raises(UserError, match="cannot read clip") as error:
        load_media(str(broken), 32, 5, True)
    assert _one_line(error)
    short = tmp_path / "short"
    short.mkdir()
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(short / "clip.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(UserError, match="has 2 frames") as error:
        load_media(str(short), 32, 5, True)
    assert _one_line(error)
    with pytest.raises(UserError, match="backbone=wan21") as error:
        load_media(str(short), 32, 1, False)
    assert _one_line(error)


def test_video_data_on_an_image_only_backbone_is_one_clear_line():
    from dataclasses import replace

    backbone = make_backbone("sd15_tiny")
    data = replace(example_data(backbone, "sd15_tiny"), frames=5)
    method = make_method("bico", "sd15_tiny", "thing")
    with pytest.raises(UserError, match="image-only") as error:
        method.initialize(backbone, data)
    assert _one_line(error)
