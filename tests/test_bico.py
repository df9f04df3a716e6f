"""BiCo: binder maths, token-position masking, the absorbent token, the guided batch's negative rows,
the gates, the per-stage timestep sampling, composition masks, diversified prompts, bad input."""

from __future__ import annotations

import warnings
import weakref

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
    stage = method.stages(backbone)[0]
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


@pytest.mark.parametrize("backbone_name", BACKBONES)
@pytest.mark.parametrize("on_absorbent", [True, False])
def test_binders_transform_the_absorbent_token_as_the_official_code_does(backbone_name, on_absorbent):
    """The official code puts the absorbent slot into the binder mask: in the global stage the EOS slot
    of a training row holds a + f_g(a) (a: the absorbent token; binders act per token, so this is the
    whole expected value). `binders_on_absorbent=false` keeps a itself there."""
    from conceptkit.method import TrainBatch

    backbone, method = attached(backbone_name, "thing", f"method.binders_on_absorbent={str(on_absorbent).lower()}")
    perturb(method)  # scales nonzero: the binders change what they touch
    data = example_data(backbone, backbone_name)
    stage = method.stages(backbone)[0]
    assert stage.name == "global"
    method.begin_stage(stage, backbone)
    batch = TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(0))
    seen = record_first_cross_site(backbone, lambda: method.training_loss(batch, backbone, stage))[0]
    absorbent = method.absorbent_token.detach().float()
    with torch.no_grad():
        bound = absorbent + method.global_binder(absorbent[None, None])[0, 0].float()
    expected = bound if on_absorbent else absorbent
    assert not torch.allclose(bound, absorbent, atol=1e-3)  # the two cases differ: the check can fail
    for row, position in enumerate(backbone.hooks.rows.eos_index):
        torch.testing.assert_close(seen[row, position].float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_without_the_absorbent_token_training_keeps_the_eos_context(backbone_name):
    """The paper's "w/o absorbent" ablation (method.absorbent=false): no token is made, and a training
    row's EOS slot holds exactly what the unbound backbone's context holds there (scales at zero)."""
    from conceptkit.method import TrainBatch

    backbone, method = attached(backbone_name, "thing", "method.absorbent=false")
    assert method.absorbent_token is None and "absorbent_token" not in dict(method.named_parameters())
    data = example_data(backbone, backbone_name)
    stage = method.stages(backbone)[0]
    method.begin_stage(stage, backbone)

    def batch():  # the same prompts drawn in both runs
        return TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(0))

    seen = record_first_cross_site(backbone, lambda: method.training_loss(batch(), backbone, stage))[0]
    method.detach(backbone)
    plain = record_first_cross_site(backbone, lambda: method.training_loss(batch(), backbone, stage))[0]
    eos = backbone.hooks.rows.eos_index
    for row, position in enumerate(eos):
        # Equal up to float rounding: BiCo encodes its prompts once as one batch, the unbound backbone
        # per call (UMT5 on other batch shapes differs in the last bit); an absorbent token would put a
        # learned vector of unit scale there.
        torch.testing.assert_close(seen[row, position], plain[row, position], rtol=0, atol=1e-6)


def test_stages_train_global_first_then_all_with_their_own_timesteps():
    from conceptkit.methods.bico.schedule import side_timesteps

    backbone, method = attached("wan21_tiny")
    stages = method.stages(backbone)
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
    torch.testing.assert_close(gate_values(torch.tensor([2.0]), "sigmoid"), torch.tensor([0.8807970779778823]))
    for kind in ("sigmoid", "code"):
        dual = DualBranchBinder(spatial, gate=kind)
        assert torch.equal(dual.gate.bias, torch.tensor([2.0]))  # official code
        logits = dual.gate(dual.gate_norm(x))
        gate = gate_values(logits, kind)
        expected = torch.sigmoid(logits) if kind == "sigmoid" else torch.ones_like(logits)
        torch.testing.assert_close(gate, expected)
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


def test_dual_branch_gradients_differ_token_by_token_so_the_branches_can_part():
    """Both branches start as copies; only a gate that differs per token makes their gradients other
    than proportional (with one g everywhere, Adam's normalised steps would keep them copies)."""
    torch.manual_seed(0)
    spatial = Binder(6)
    with torch.no_grad():
        spatial.scale.fill_(0.5)
    dual = DualBranchBinder(spatial, gate="sigmoid")
    x = torch.randn(3, 4, 6)
    g = torch.sigmoid(dual.gate(dual.gate_norm(x)))
    assert g.std() > 0.01  # the default (random) gate weight: g differs per token
    (dual(x) * torch.randn(3, 4, 6)).sum().backward()
    ratio = dual.motion.net[1].weight.grad / dual.spatial.net[1].weight.grad
    assert ratio.std() > 1e-3  # not one factor (1 - g) / g for every weight
    with torch.no_grad():
        dual.spatial.scale.fill_(0.9)
        dual.spatial.net[1].weight.add_(1.0)
    dual.restart_motion()  # the start of stage 2: motion <- spatial, values copied, parameters kept
    assert all(torch.equal(a, b) and a is not b for a, b in zip(dual.motion.parameters(), dual.spatial.parameters()))


# temporal disentanglement (video concepts) -----------------------------------------------------
def write_clips(folder, captions=("a red square sliding right", "a blue square sliding down"), frames=9, size=32):
    """GIF clips of a square moving frame by frame, each with a sidecar caption."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n, caption in enumerate(captions):
        images = []
        for f in range(frames):
            pixels = np.full((size, size, 3), 230, np.uint8)
            top, left = (8, 2 + 2 * f) if n == 0 else (2 + 2 * f, 8)
            pixels[top: top + 10, left: left + 10] = (220, 30, 30) if n == 0 else (30, 30, 220)
            images.append(Image.fromarray(pixels))
        images[0].save(folder / f"clip{n}.gif", save_all=True, append_images=images[1:], duration=100)
        (folder / f"clip{n}.txt").write_text(caption)
    return folder


def video_setup(tmp_path, *extra, name="move"):
    backbone = make_backbone("wan21_tiny")
    data = example_data(backbone, "wan21_tiny", f"data.images={write_clips(tmp_path / 'clips')}", "data.frames=5")
    method = make_method("bico", "wan21_tiny", name, *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.initialize(backbone, data)
    method.attach(backbone)
    return backbone, method, data


def test_video_stage1_trains_the_frames_as_images_with_per_frame_prompts(tmp_path):
    from conceptkit.method import TrainBatch
    from conceptkit.methods.bico.binders import DualBranchBinder

    backbone, method, data = video_setup(tmp_path)
    assert data.frames == 5 and data.count == 2
    assert [s.name for s in method.stages(backbone)] == ["frames_global", "frames_all", "clip_global", "clip_all"]
    assert [s.steps for s in method.stages(backbone)] == [162, 243, 120, 180]  # official code's budgets
    assert all(isinstance(b, DualBranchBinder) for b in [method.global_binder, *method.block_binders])
    stage = method.stages(backbone)[0]
    frames = method.stage_data(stage, data)
    assert method.stage_data(method.stages(backbone)[2], data) is data  # stage 2: the whole clips
    # every frame its own item: a one-frame latent, encoded alone as an image would be
    assert frames.count == 10 and frames.frames == 1 and frames.names[:2] == ["clip0.gif#0", "clip0.gif#1"]
    assert frames.latents.mean.shape[:3] == (10, data.latents.mean.shape[1], 1)
    alone = backbone.encode_media(data.pixels[1:2, :, 3:4])  # clip 1, frame 3
    torch.testing.assert_close(frames.latents.mean[1 * 5 + 3], alone.mean[0])  # batched: rounding only
    # per-frame prompts, derived offline from each frame's own clip caption, in still-image wording
    prompts = method.frame_training_prompts
    assert len(prompts) == 10
    assert method.resolved_description == "a red square sliding right"  # the first caption
    assert all(any("blue square" in p for p in prompts[k]) == (k >= 5) for k in range(10))
    assert all(any("red square" in p for p in prompts[k]) for k in range(10))  # the description, everywhere
    assert not any("video" in p for ps in prompts for p in ps)
    # one training step sees the frames it was given, with their own prompts
    method.frame_training_prompts = [[f"frame number {k} of the clip"] for k in range(10)]
    method.begin_stage(stage, backbone)
    seen = []
    handle = backbone.denoiser.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"].shape),
                                                         with_kwargs=True)
    try:
        batch = TrainBatch(indices=torch.tensor([3, 7]), data=frames, generator=torch.Generator().manual_seed(0))
        method.training_loss(batch, backbone, stage)["loss"].backward()
    finally:
        handle.remove()
    assert seen[0][2] == 1  # one latent frame: an image
    expected = backbone.tokenize(["frame number 3 of the clip", "frame number 7 of the clip"]).input_ids
    assert torch.equal(backbone.hooks.rows.input_ids, expected)
    # stage 1 trains the spatial branch of the global binder (and the absorbent) only
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in method.named_parameters() if n.startswith("global_binder.spatial.")} | {"absorbent_token"}
    assert all(p.grad is not None for n, p in method.named_parameters() if n in trainable)
    with pytest.raises(RuntimeError, match="stage_data"):
        method.training_loss(TrainBatch(torch.tensor([0]), data, torch.Generator().manual_seed(0)), backbone, stage)


def test_video_stage2_starts_from_stage1(tmp_path):
    backbone, method, data = video_setup(tmp_path)
    stages = {s.name: s for s in method.stages(backbone)}
    method.begin_stage(stages["frames_all"], backbone)
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        n for n, _ in method.named_parameters() if ".spatial." in n} | {"absorbent_token"}
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand in for stage-1 training: spatial branches (scales too) move
        for n, p in method.named_parameters():
            if ".spatial." in n:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    stage1 = {n: p.detach().clone() for n, p in method.named_parameters()}
    prompt = method.prompt("{move} in a park")
    end_of_stage1 = predict(backbone, [prompt])
    method.begin_stage(stages["clip_global"], backbone)
    binders = {"global_binder": method.global_binder, **{f"block_binders.{i}": b for i, b in enumerate(method.block_binders)}}
    for prefix, binder in binders.items():  # weights carried over: spatial kept, motion a copy of it
        for n, p in binder.spatial.named_parameters():
            assert torch.equal(p, stage1[f"{prefix}.spatial.{n}"])
            assert torch.equal(dict(binder.motion.named_parameters())[n], p)
    # the clip stage starts where the frames ended (g * s + (1 - g) * s: equal up to float rounding)
    torch.testing.assert_close(predict(backbone, [prompt]), end_of_stage1, rtol=1e-5, atol=1e-6)
    assert not torch.equal(end_of_stage1, predict(make_backbone("wan21_tiny"), [prompt]))  # the check can fail
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        n for n, _ in method.named_parameters() if n.startswith("global_binder.")} | {"absorbent_token"}
    method.begin_stage(stages["clip_all"], backbone)
    assert all(p.requires_grad for p in method.parameters())
    assert method.stage_favours("frames_global") == method.stage_favours("clip_global") == "low"
    assert method.stage_favours("frames_all") == method.stage_favours("clip_all") == "high"


def test_one_stage_ablation_trains_every_binder_throughout_with_the_backbones_timesteps(tmp_path, monkeypatch):
    """method.two_stage=false (the paper's "w/o two-stage"): one `all` stage per phase with the whole
    budget, no favoured timestep side; a video concept's motion branches still start at the clip stage."""
    from conceptkit.method import TrainBatch

    backbone, method, data = video_setup(tmp_path, "method.two_stage=false")
    image = make_method("bico", "wan21_tiny", "x", "method.two_stage=false")
    assert [(s.name, s.steps) for s in image.stages(backbone)] == [("all", 120 + 180)]
    stages = {s.name: s for s in method.stages(backbone)}
    assert [(s.name, s.steps) for s in method.stages(backbone)] == [("frames_all", 162 + 243), ("clip_all", 120 + 180)]
    method.begin_stage(stages["clip_all"], backbone)
    for binder in [method.global_binder, *method.block_binders]:  # motion restarted from spatial
        for n, p in binder.spatial.named_parameters():
            assert torch.equal(dict(binder.motion.named_parameters())[n], p)
    assert all(p.requires_grad for p in method.parameters())
    # timesteps: the backbone's own draw (make_noisy's), never the favoured-side sampler
    import conceptkit.methods.bico as bico_module

    def favoured_side_sampler(*args, **kwargs):
        raise AssertionError("side_timesteps called")

    monkeypatch.setattr(bico_module, "side_timesteps", favoured_side_sampler)
    batch = TrainBatch(indices=torch.tensor([0]), data=data, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(method.training_loss(batch, backbone, stages["clip_all"])["loss"])
    two_stage = make_method("bico", "wan21_tiny", "y", "method.prompts=[a thing moving]")
    with pytest.raises(AssertionError, match="side_timesteps called"):  # the default samples by side
        two_stage.training_loss(batch, backbone, two_stage.stages(backbone)[0])


def test_global_stages_skip_the_per_block_binders_in_training(tmp_path):
    """Official: a `global` stage runs the global binder only. For an image concept that is what
    applying the (scale 0) per-block binders gives, bit for bit; in a video concept's clip stage the
    per-block binders hold stage 1's training, and are skipped."""
    from conceptkit.method import TrainBatch

    def loss(method, backbone, data, stage, global_only):
        method._global_only = global_only
        batch = TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return method.training_loss(batch, backbone, stage)["loss"]

    backbone, method = attached("wan21_tiny")
    data = example_data(backbone, "wan21_tiny")
    stage = method.stages(backbone)[0]
    method.begin_stage(stage, backbone)
    perturb(method, scales=False)
    with torch.no_grad():
        method.global_binder.scale.fill_(0.5)
    assert torch.equal(loss(method, backbone, data, stage, True), loss(method, backbone, data, stage, False))
    backbone, video, clips = video_setup(tmp_path)
    stage = next(s for s in video.stages(backbone) if s.name == "clip_global")
    video.begin_stage(stage, backbone)
    perturb(video)
    assert not torch.equal(loss(video, backbone, clips, stage, True), loss(video, backbone, clips, stage, False))


def test_gate_hyperparameter_reaches_every_dual_binder(tmp_path):
    from conceptkit.artifact import build_method

    for kind in ("sigmoid", "code"):
        _, method, _ = video_setup(tmp_path / kind, f"method.gate={kind}")
        assert method.hparams()["gate"] == kind
        assert {b.kind for b in [method.global_binder, *method.block_binders]} == {kind}
        rebuilt = build_method({"name": "move", "method": "bico", "hparams": method.hparams(),
                                "method_info": method.export_info()})
        rebuilt.attach(make_backbone("wan21_tiny"))
        assert {b.kind for b in [rebuilt.global_binder, *rebuilt.block_binders]} == {kind}
    from conceptkit.training.run import build_parts

    from conftest import train_config

    with pytest.raises(UserError, match="method.gate must be one of sigmoid, code") as error:
        build_parts(train_config("bico", "wan21_tiny", "method.gate=softmax"))
    assert _one_line(error)


def test_temporal_disentanglement_off_trains_clips_whole_with_plain_binders(tmp_path):
    backbone, method, data = video_setup(tmp_path, "method.temporal_disentanglement=false")
    assert [s.name for s in method.stages(backbone)] == ["global", "all"]
    assert isinstance(method.global_binder, Binder) and method.frame_training_prompts == []
    assert method.stage_data(method.stages(backbone)[0], data) is data


def test_frame_prompts_own_list_vlm_per_frame_and_bad_input(tmp_path):
    from conceptkit.methods.bico.diversify import per_frame_prompts

    assert per_frame_prompts("x", [None], 3, own=["a still dog", " "]) == [["a still dog"]] * 3
    with pytest.warns(UserWarning, match="method.prompts"):
        assert per_frame_prompts("x", [None, None], 2, clip_prompts=["my own prompt"]) == [["my own prompt"]] * 4
    with pytest.raises(UserError, match="method.frame_prompts is a list of empty strings") as error:
        per_frame_prompts("x", [None], 3, own=[" "])
    assert _one_line(error)
    with pytest.raises(UserError, match="data.captioner|cannot load"):
        per_frame_prompts("x", [None], 2, vlm=str(tmp_path / "no_model_here"), images=[None, None])
    # a video concept's own still-image prompts reach every frame
    _, method, _ = video_setup(tmp_path, "method.frame_prompts=[a red square,a square on grey]")
    assert method.frame_training_prompts == [["a red square", "a square on grey"]] * 10


def test_video_concept_resumes_exactly_in_every_stage(tmp_path):
    """A resumed run restores finished stages' snapshots without re-running begin_stage: the binders'
    shapes never change between stages, and stage 2's start (motion <- spatial) happens once."""
    import lightning as L
    from safetensors.torch import load_file

    from conceptkit.training.run import train

    from conftest import train_config

    class CrashAt(L.Callback):
        def __init__(self, stage_name):
            self.stage_name = stage_name

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.stage.name == self.stage_name and trainer.global_step == 1:
                raise RuntimeError("simulated crash")

    clips = write_clips(tmp_path / "clips")

    def run(name, *extra, callbacks=None):
        cfg = train_config("bico", "wan21_tiny", "trainer.max_steps=2", "trainer.checkpoint_every=1",
                           "trainer.progress_bar=false", "sample.count=0", "name=move", f"data.images={clips}",
                           "data.frames=5", f"output={tmp_path / name}", *extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_file(str(train(cfg, callbacks=callbacks) / "weights.safetensors"))

    reference = run("ref.concept")
    for stage_name in ("frames_all", "clip_global", "clip_all"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(f"{stage_name}.concept", callbacks=[CrashAt(stage_name)])
        resumed = run(f"{stage_name}.concept", "resume=true")
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), stage_name


def test_vlm_writes_one_prompt_per_frame(tmp_path):
    from test_data import _tiny_blip

    model = tmp_path / "blip"
    model.mkdir()
    words = set(_tiny_blip(model))
    _, method, _ = video_setup(tmp_path, f"method.vlm={model}", "method.prompts=[a square moving]")
    assert method.training_prompts == ["a square moving"]  # the clip's own prompts win over the VLM
    prompts = method.frame_training_prompts
    assert len(prompts) == 10
    answered = [p for p in prompts if p != ["a square moving"]]  # the rest: the VLM's answer was unusable
    assert answered and all(len(p) == 1 and set(p[0].split()) <= words for p in answered)


def test_video_concept_without_pixels_is_one_clear_line(tmp_path):
    from dataclasses import replace

    backbone = make_backbone("wan21_tiny")
    data = example_data(backbone, "wan21_tiny", f"data.images={write_clips(tmp_path / 'clips')}", "data.frames=5")
    method = make_method("bico", "wan21_tiny", "move")
    with pytest.raises(UserError, match="temporal_disentanglement=false") as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.initialize(backbone, replace(data, pixels=None))
    assert _one_line(error)


def test_video_concept_trains_saves_reloads_and_composes_with_an_image_concept(tmp_path):
    import json
    import os
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import load_file

    from conceptkit.artifact import load_concept
    from conceptkit.compose import compose, render_prompt
    from conceptkit.config import compose as compose_config
    from conceptkit.methods.bico.binders import DualBranchBinder
    from conceptkit.training.run import train

    from conftest import train_config

    clips = write_clips(tmp_path / "clips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        video_folder = train(train_config("bico", "wan21_tiny", "experiment=smoke", "name=move", "sample.count=0",
                                          f"data.images={clips}", "data.frames=5", f"output={tmp_path / 'move.concept'}"))
        image_folder = train(train_config("bico", "wan21_tiny", "experiment=smoke", "name=thing", "sample.count=0",
                                          f"output={tmp_path / 'thing.concept'}"))
    meta = json.loads((video_folder / "concept.json").read_text())
    assert [s["name"] for s in meta["training"]["stages"]] == ["frames_global", "frames_all", "clip_global", "clip_all"]
    assert meta["method_version"] == "2" and meta["hparams"]["gate"] == "sigmoid"
    assert meta["method_info"]["clip_frames"] == 5 and len(meta["method_info"]["frame_prompts"]) == 10
    weights = load_file(str(video_folder / "weights.safetensors"))
    assert {"global_binder.spatial.scale", "global_binder.motion.scale", "global_binder.gate.weight",
            "global_binder.gate_norm.weight", "block_binders.0.motion.net.1.weight"} <= set(weights)
    # the clip stage trained the motion branch on its own: it no longer equals the spatial branch
    assert not torch.equal(weights["global_binder.motion.net.1.weight"], weights["global_binder.spatial.net.1.weight"])
    assert "global" in json.loads((image_folder / "concept.json").read_text())["training"]["stages"][0]["name"]

    backbone = make_backbone("wan21_tiny")
    video, _ = load_concept(video_folder, backbone)
    image, _ = load_concept(image_folder, backbone)
    assert isinstance(video.global_binder, DualBranchBinder) and isinstance(image.global_binder, Binder)
    assert all(torch.equal(v, weights[k]) for k, v in video.state_dict().items())
    here = predict(backbone, [video.prompt("a photo of {move}")])
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import predict
        from conceptkit.artifact import backbone_from_meta, load_concept, read_meta
        backbone = backbone_from_meta(read_meta({str(video_folder)!r})).load()
        method, _ = load_concept({str(video_folder)!r}, backbone)
        torch.save(predict(backbone, [method.prompt("a photo of {{move}}")]), {str(tmp_path / 'fresh.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), here)  # reloaded in a fresh process: identical
    prompt = render_prompt("{thing} is {move}", [image, video])
    together = predict(backbone, [prompt])
    for method in (video, image):  # each concept's binders contribute, and detach/attach is exact
        method.detach(backbone)
        assert not torch.equal(predict(backbone, [prompt]), together), method.name
        method.attach(backbone)
        assert torch.equal(predict(backbone, [prompt]), together)
    out = compose(compose_config("compose", [f"concepts=[{video_folder},{image_folder}]", "prompt='{thing} is {move}'", "count=1",
                                             "steps=2", f"output={tmp_path / 'render'}"]))
    assert json.loads((out / "compose.json").read_text())["expanded_prompt"] == prompt


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


def _tiny_qwen_answer(tokenizer, text):
    """Token ids a Qwen2.5-VL would write for `text`: the text, then <|im_end|> (where generation stops)."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_vlm_qwen25_chat_answer_is_parsed_into_prompts_or_falls_back(tiny_qwen_vl, monkeypatch):
    """diversify through the tiny Qwen2.5-VL's chat path: the real (random) answer, a scripted answer
    with list markers, and an empty one (the documented warning and the offline wordings)."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from conceptkit.captioning import load_vlm
    from conceptkit.methods.bico.diversify import INSTRUCTION, diversified_prompts, offline_prompts, parse_prompt_lines

    from conftest import GenerateSpy

    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration)
    vlm = load_vlm(str(tiny_qwen_vl), setting="method.vlm")
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = diversified_prompts("a red square", None, 2, vlm, image=image)
    (call,) = spy.calls
    prompt = vlm.processor.tokenizer.decode(call["inputs"]["input_ids"][0])
    assert INSTRUCTION.format(count=2) in prompt and prompt.count("<|vision_start|>") == 1
    ids = call["inputs"]["input_ids"]
    written = vlm.processor.tokenizer.decode(call["output"][0, ids.shape[1]:], skip_special_tokens=True)
    parsed = parse_prompt_lines("\n".join(" ".join(line.split()) for line in written.splitlines()), 2)
    fell_back = any("returned no usable prompts" in str(w.message) for w in caught)
    if parsed:  # random weights: whichever way the gibberish goes, it is handled as documented
        assert prompts == parsed and not fell_back
    else:
        assert prompts == offline_prompts("a red square", None, 2) and fell_back
    answer = '1. a red square slides to the right\n\n- "a blue square moves down"\nok'
    spy.answer = _tiny_qwen_answer(vlm.processor.tokenizer, answer)
    assert diversified_prompts("x", None, 5, vlm, image=image) == ["a red square slides to the right",
                                                                    "a blue square moves down"]
    spy.answer = _tiny_qwen_answer(vlm.processor.tokenizer, "")
    with pytest.warns(UserWarning, match=f"method.vlm '{tiny_qwen_vl}' returned no usable prompts"):
        assert diversified_prompts("a dog", "a dog on grass", 3, vlm, image=image) == offline_prompts(
            "a dog", "a dog on grass", 3)
    vlm.release()


def test_vlm_is_loaded_once_per_concept_and_sees_the_clip(tiny_qwen_vl, tmp_path, monkeypatch):
    """A video concept: one load of the VLM for its clip prompts and its per-frame prompts, released
    after; the clip prompts are written from 4 evenly spaced frames in one message (motion asked),
    each frame's from that frame. An image concept keeps the one-image message."""
    import numpy as np
    from transformers import (AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                              Qwen2_5_VLForConditionalGeneration)

    from conceptkit.captioning import VisionLanguageModel
    from conceptkit.methods.bico import BiCo
    from conceptkit.vlm_requests import CLIP_INSTRUCTION, FRAME_INSTRUCTION, INSTRUCTION
    from conceptkit.methods.bico.temporal import frame_images

    from conftest import GenerateSpy

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_vl)  # loaded before the counters go in
    decode = tokenizer.decode
    loads, released = [], []
    for cls in (AutoProcessor, AutoModelForImageTextToText):
        original = cls.from_pretrained  # bound to its class: count the call, then load as usual

        def counted(*args, _original=original, _name=cls.__name__, **kwargs):
            loads.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", counted)
    release = VisionLanguageModel.release

    def counted_release(vlm):
        released.append(vlm)
        release(vlm)

    monkeypatch.setattr(VisionLanguageModel, "release", counted_release)
    # Scripted answers (generation itself runs in the test above): this test is about what is loaded and asked.
    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration,
                      answer=_tiny_qwen_answer(tokenizer, "a red square on a grey background"))
    _, method, data = video_setup(tmp_path, f"method.vlm={tiny_qwen_vl}", "method.prompt_count=2")
    assert loads == ["AutoProcessor", "AutoModelForImageTextToText"]  # once, for every question
    assert len(released) == 1 and released[0].released  # and let go before training
    # each clip's concept phrases (unusable here: the answer is no "spatial:" / "temporal:" pair), the
    # clip's prompts, then one per frame (2 clips x 5 frames)
    assert len(spy.calls) == 2 + 1 + 10
    phrase_calls, (clip_call, *frame_calls) = spy.calls[:2], spy.calls[2:]
    assert all(c["inputs"]["image_grid_thw"].shape[0] == 4 for c in phrase_calls)
    assert method.concept_phrases == [None, None]  # so the prompts are asked for without phrases, as before
    assert CLIP_INSTRUCTION.format(frames=4, count=2) in decode(clip_call["inputs"]["input_ids"][0])
    assert clip_call["inputs"]["image_grid_thw"].shape[0] == 4  # 4 frames in one message
    assert all(c["inputs"]["image_grid_thw"].shape[0] == 1 and FRAME_INSTRUCTION in decode(c["inputs"]["input_ids"][0])
               for c in frame_calls)
    assert method.training_prompts == ["a red square on a grey background"]  # the answer's one line
    assert method.frame_training_prompts == [["a red square on a grey background"]] * 10
    # the frames shown are evenly spaced over the first clip, first and last included: 0, 1, 3, 4 of 5
    views = BiCo._clip_views(None, data)
    frames = frame_images(data)
    assert len(views) == 4 and all(np.abs(np.asarray(v, int) - np.asarray(frames[k], int)).max() <= 1
                                   for v, k in zip(views, [0, 1, 3, 4]))
    # an image concept: one load, one message with its one image and the image instruction
    loads.clear()
    spy.calls.clear()
    attached("sd15_tiny", "thing", f"method.vlm={tiny_qwen_vl}", "method.prompt_count=2")
    (call,) = spy.calls
    assert loads == ["AutoProcessor", "AutoModelForImageTextToText"] and len(released) == 2
    assert call["inputs"]["image_grid_thw"].shape[0] == 1
    assert INSTRUCTION.format(count=2) in decode(call["inputs"]["input_ids"][0])
    # loaded only when it writes something; a path that does not load is one line naming method.vlm
    loads.clear()
    missing = tmp_path / "no_model_here"
    video_setup(tmp_path / "own", f"method.vlm={missing}", "method.prompts=[a square moving]",
                "method.frame_prompts=[a red square]")
    assert loads == []
    with pytest.raises(UserError, match="^method.vlm: cannot load captioning model") as error:
        attached("sd15_tiny", "thing", f"method.vlm={missing}")
    assert _one_line(error) and len(released) == 2


def test_concept_phrases_parser_reads_two_lines_or_the_codes_json_else_none():
    from conceptkit.methods.bico.diversify import parse_concept_phrases

    assert parse_concept_phrases("spatial: red square, grey background\ntemporal: sliding right, fast") == {
        "spatial": ["red square", "grey background"], "temporal": ["sliding right", "fast"]}
    # a chat answer's usual wrappings: a lead-in line, markdown, a word before the colon, quotes, a full
    # stop, a phrase repeated in another case; "none" for a clip without motion
    answer = 'Here are the concepts:\n**Spatial concepts:** "red square"; grey background; Red Square.\n- Temporal: none'
    assert parse_concept_phrases(answer) == {"spatial": ["red square", "grey background"], "temporal": []}
    # the official code's JSON format; its own example misses the comma between the entries (read by line)
    assert parse_concept_phrases('{"spatial": ["brown cat", "grassland"], "temporal": ["jumping"]}') == {
        "spatial": ["brown cat", "grassland"], "temporal": ["jumping"]}
    assert parse_concept_phrases('{\n"spatial": ["brown cat"]\n"temporal": ["jumping", "near to far"]\n}') == {
        "spatial": ["brown cat"], "temporal": ["jumping", "near to far"]}
    # a sentence is not a phrase
    long = "spatial: a red square that slides slowly to the right over a grey floor, red\ntemporal: sliding"
    assert parse_concept_phrases(long)["spatial"] == ["red"]
    # not usable: a missing line (the format not followed, or an answer cut off), no spatial phrase, garbage
    assert parse_concept_phrases("spatial: red square, grey background") is None
    assert parse_concept_phrases("temporal: sliding right") is None
    assert parse_concept_phrases("spatial: none\ntemporal: sliding right") is None
    assert parse_concept_phrases("ok the square qz spatially: x\n{not json") is None
    assert parse_concept_phrases("") is None and parse_concept_phrases(None) is None


def test_phrase_instructions_frame_gets_only_the_spatial_phrases_clip_gets_both():
    from conceptkit.vlm_requests import CLIP_INSTRUCTION, FRAME_INSTRUCTION, clip_instruction, frame_instruction

    phrases = {"spatial": ["red square", "grey background"], "temporal": ["sliding right", "speeding up"]}
    frame = frame_instruction(phrases)
    assert "red square, grey background" in frame
    assert "sliding right" not in frame and "speeding up" not in frame  # a frame is a still image
    clip = clip_instruction(4, 7, phrases)
    assert "red square, grey background" in clip and "sliding right, speeding up" in clip
    assert "These 4 images" in clip and "Write 7 different prompts" in clip
    assert "(its motion): none." in clip_instruction(4, 7, {"spatial": ["red square"], "temporal": []})
    # phrases unknown: the instructions without them
    assert clip_instruction(4, 7, None) == CLIP_INSTRUCTION.format(frames=4, count=7)
    assert frame_instruction(None) == FRAME_INSTRUCTION


def test_concept_phrases_one_greedy_call_per_clip_unusable_answer_warns_once(tiny_qwen_vl, monkeypatch):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from conceptkit.captioning import load_vlm
    from conceptkit.methods.bico.diversify import PHRASES_INSTRUCTION, concept_phrases

    from conftest import GenerateSpy

    vlm = load_vlm(str(tiny_qwen_vl), setting="method.vlm")
    tokenizer = vlm.processor.tokenizer
    scripted = iter(["spatial: red square\ntemporal: sliding right", "the square the square"])
    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration,
                      answer=lambda input_ids: _tiny_qwen_answer(tokenizer, next(scripted)))
    frames = [Image.new("RGB", (32, 32), (200, 40 * k, 0)) for k in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phrases = concept_phrases([frames, frames[:2]], vlm)
    assert phrases == [{"spatial": ["red square"], "temporal": ["sliding right"]}, None]
    messages = [str(w.message) for w in caught if "concept phrases" in str(w.message)]
    assert len(messages) == 1 and "for 1 of 2 clips" in messages[0]
    first, second = spy.calls  # one message per clip, its frames in order
    assert PHRASES_INSTRUCTION.format(frames=3) in tokenizer.decode(first["inputs"]["input_ids"][0])
    assert first["inputs"]["image_grid_thw"].shape[0] == 3 and second["inputs"]["image_grid_thw"].shape[0] == 2
    assert first["inputs"]["do_sample"] is False and second["inputs"]["do_sample"] is False
    vlm.release()


def test_vlm_sampling_is_seeded_per_message_and_leaves_the_global_rng(tiny_qwen_vl, monkeypatch):
    """Real (random-weight) generation: the settings reach generate, the same seed writes the same
    tokens, message i samples with seed + i, the caller's RNG state is as it was; greedy is the default."""
    from dataclasses import replace

    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from conceptkit.captioning import GREEDY, Decoding, caption_images, load_vlm

    from conftest import GenerateSpy

    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration)
    vlm = load_vlm(str(tiny_qwen_vl), setting="method.vlm")
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    sampled = Decoding(sample=True, temperature=0.7, top_k=50, top_p=0.95, seed=3)

    def outputs(decoding=None, items=1):
        spy.calls.clear()
        settings = {} if decoding is None else {"decoding": decoding}
        caption_images([image] * items, vlm, instruction="Write one prompt.", max_new_tokens=16, **settings)
        return [call["output"] for call in spy.calls]

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = outputs(sampled, items=2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    kwargs = spy.calls[0]["inputs"]
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]) == (True, 0.7, 50, 0.95)
    again = outputs(sampled, items=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same seed: same tokens
    assert torch.equal(outputs(replace(sampled, seed=4))[0], first[1])  # message i samples with seed + i
    assert not torch.equal(first[0], first[1])  # (so two messages do not share one random stream)
    greedy = outputs()  # the default (data.captioner's path): greedy
    assert spy.calls[0]["inputs"]["do_sample"] is False and "temperature" not in spy.calls[0]["inputs"]
    assert torch.equal(outputs(GREEDY)[0], greedy[0]) and not torch.equal(greedy[0], first[0])
    vlm.release()


def test_bico_vlm_decoding_keys_reach_generate_seeded_from_init_seed(tiny_qwen_vl, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from conftest import GenerateSpy

    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration)  # real (random-weight) generation

    def written(*extra):
        spy.calls.clear()
        _, method = attached("sd15_tiny", "thing", f"method.vlm={tiny_qwen_vl}", "method.prompt_count=1", *extra)
        (call,) = spy.calls
        return method, call["inputs"], call["output"]

    def sampling(kwargs):
        return kwargs["do_sample"], kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]

    method, kwargs, output = written()
    assert sampling(kwargs) == (True, 0.7, 50, 0.95)  # the defaults: the official code's
    rebuilt = type(method)(concept_name="thing", **method.hparams())  # how a saved concept is rebuilt
    assert rebuilt.vlm_decoding == method.vlm_decoding and method.vlm_decoding.seed == 0
    assert torch.equal(written()[2], output)  # the same config writes the same prompts
    assert not torch.equal(written("method.init_seed=1")[2], output)  # seeded from init_seed
    _, kwargs, _ = written("method.vlm_temperature=1.3", "method.vlm_top_k=5", "method.vlm_top_p=0.5")
    assert sampling(kwargs) == (True, 1.3, 5, 0.5)
    _, kwargs, _ = written("method.vlm_sampling=false")
    assert kwargs["do_sample"] is False and "top_p" not in kwargs


@pytest.mark.parametrize("key,value", [("vlm_temperature", 0), ("vlm_temperature", -0.5), ("vlm_top_p", 0),
                                       ("vlm_top_p", 1.5), ("vlm_top_k", -1), ("vlm_top_k", 2.5)])
def test_bad_vlm_sampling_values_are_one_line(key, value):
    from conceptkit.methods.bico import BiCo

    with pytest.raises(UserError, match=f"^method.{key} must") as error:  # (train shows the constructor's UserError)
        BiCo(**{key: value})
    assert _one_line(error)
    BiCo(vlm_sampling=False, **{key: value})  # greedy decoding reads none of them


def test_vlm_video_prompts_are_written_from_each_clips_phrases(tiny_qwen_vl, tmp_path, monkeypatch):
    """A video concept: each clip's phrases first (greedy), then the clip's prompts from both phrase lists,
    then every frame's from its own clip's spatial phrases only (sampled); the phrases are recorded."""
    import json

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from conceptkit.methods.bico.diversify import clip_instruction, frame_instruction

    from conftest import GenerateSpy

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_vl)
    phrase_answers = iter(["spatial: red square, grey background\ntemporal: sliding right",
                           "Spatial: blue square, grey background\nTemporal: sliding down"])

    def answer(input_ids):
        asked = tokenizer.decode(input_ids[0])
        text = next(phrase_answers) if "List the concepts" in asked else "a square on a grey background, seen from the front"
        return _tiny_qwen_answer(tokenizer, text)

    spy = GenerateSpy(monkeypatch, Qwen2_5_VLForConditionalGeneration, answer=answer)
    _, method, _ = video_setup(tmp_path, f"method.vlm={tiny_qwen_vl}", "method.prompt_count=2")
    red = {"spatial": ["red square", "grey background"], "temporal": ["sliding right"]}
    blue = {"spatial": ["blue square", "grey background"], "temporal": ["sliding down"]}
    assert method.concept_phrases == [red, blue]
    asked = [tokenizer.decode(call["inputs"]["input_ids"][0]) for call in spy.calls]
    assert len(asked) == 2 + 1 + 10  # the phrases of each clip, the clip's prompts, one per frame
    assert clip_instruction(4, 2, red) in asked[2]  # the first clip's prompts: both of its phrase lists
    assert all(frame_instruction(red) in a for a in asked[3:8]) and all(frame_instruction(blue) in a for a in asked[8:])
    assert not any("sliding" in a for a in asked[3:])  # no frame is told the motion
    assert [call["inputs"]["do_sample"] for call in spy.calls] == [False] * 2 + [True] * 11
    assert method.training_prompts == ["a square on a grey background, seen from the front"]
    # recorded with the concept (concept.json's method_info) and read back
    info = json.loads(json.dumps(method.export_info()))
    assert info["concept_phrases"] == [red, blue]
    rebuilt = type(method)(concept_name="move", **method.hparams())
    rebuilt.import_info(info)
    assert rebuilt.concept_phrases == [red, blue]


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
    with pytest.raises(UserError, match="cannot be read") as error:
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


# the global binding, once per forward ---------------------------------------------------------
class CountingCache:
    """Wraps BiCo's shared-binding cache: counts the global bindings made and keeps each weakly."""

    def __init__(self, enabled=True):
        from conceptkit.methods.bico.cache import SiteSharedCache

        self.cache = SiteSharedCache(enabled=enabled)
        self.made = []

    def get(self, *args):
        return self.cache.get(*args)

    def put(self, context, rows, state, site, value):
        if value.bound is not None:
            self.made.append(weakref.ref(value.bound))
        self.cache.put(context, rows, state, site, value)

    def clear(self):
        self.cache.clear()


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append(1))
    return calls, handle


def training_step_grads(method, backbone, data, stage, cached=True):
    """Loss, gradients and global-binder calls of one training step (forward + backward)."""
    from conceptkit.method import TrainBatch

    method._global_bindings = CountingCache(enabled=cached)
    method.zero_grad(set_to_none=True)
    calls, handle = count_calls(method.global_binder)
    try:
        batch = TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(0))
        loss = method.training_loss(batch, backbone, stage)["loss"]
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls), method._global_bindings


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_global_binding_runs_once_per_forward_and_equals_the_uncached_path(backbone_name):
    """One global-binder pass per denoiser forward, shared by every site: the same loss, the same
    gradients (the global binder's is the sum over sites either way) as computing it at each site,
    also with gradient checkpointing (blocks recomputed in backward), and nothing kept after the step."""
    backbone, method = attached(backbone_name)
    sites = len([s for s in backbone.attention_sites() if s.kind == "cross"])
    assert sites > 1
    data = example_data(backbone, backbone_name)
    perturb(method)
    stage = method.stages(backbone)[1]  # `all`: the global binder, every site's own binder and the absorbent train
    method.begin_stage(stage, backbone)
    loss, grads, calls, cache = training_step_grads(method, backbone, data, stage)
    assert calls == 1 and len(cache.made) == 1
    assert all(ref() is None for ref in cache.made) and not cache.cache.holds  # freed with the step's graph
    plain_loss, plain_grads, plain_calls, _ = training_step_grads(method, backbone, data, stage, cached=False)
    assert plain_calls == sites
    assert torch.equal(loss, plain_loss)  # the forward is the same computation, bit for bit
    assert grads.keys() == plain_grads.keys() and "global_binder.scale" in grads and "absorbent_token" in grads
    for name in grads:  # backward sums the sites' contributions in another order: rounding only
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)
    method.gradient_checkpointing = True
    method.begin_stage(stage, backbone)
    assert backbone.denoiser.is_gradient_checkpointing
    checkpointed_loss, checkpointed_grads, calls, cache = training_step_grads(method, backbone, data, stage)
    assert calls == 2  # the forward, and the recomputation of the first site's block in backward
    assert all(ref() is None for ref in cache.made) and not cache.cache.holds
    assert torch.equal(checkpointed_loss, loss)
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-5, atol=1e-6)
    method.detach(backbone)
    assert not backbone.denoiser.is_gradient_checkpointing


def test_global_binding_cache_per_concept_in_guided_composed_sampling():
    """Sampling with guidance and two concepts, each with its own cache: the images equal the uncached
    path's and nothing is kept after generate. The first concept's hooks see the backbone's context,
    one tensor for every site, and bind globally once per denoiser call; the second's see the first's
    per-site output, a new tensor at each site, and bind per site (the key is tensor identity)."""
    from conceptkit.compose import render_prompt

    backbone = make_backbone("sd15_tiny")
    sites = len([s for s in backbone.attention_sites() if s.kind == "cross"])
    data = example_data(backbone, "sd15_tiny")
    concepts = [make_method("bico", "sd15_tiny", "subject", "method.description=red dog"),
                make_method("bico", "sd15_tiny", "motion", "method.description=jumping high")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, concept in enumerate(concepts):
            concept.initialize(backbone, data)
            concept.attach(backbone)
            perturb(concept, seed=seed + 1)
    prompt = render_prompt("a {subject} is {motion} in a park", concepts)

    def sample(cached):
        counted = []
        for concept in concepts:
            concept._global_bindings = CountingCache(enabled=cached)
            counted.append(count_calls(concept.global_binder))
        try:
            images = backbone.generate([prompt, prompt], negative_prompt="a cat", steps=3)
        finally:
            for _, handle in counted:
                handle.remove()
        return images, [len(calls) for calls, _ in counted]

    images, calls = sample(cached=True)
    assert calls == [3, 3 * sites]  # 3 denoiser calls (the guided batch in one call each)
    assert all(not c._global_bindings.cache.holds and all(r() is None for r in c._global_bindings.made)
               for c in concepts)
    plain, plain_calls = sample(cached=False)
    assert plain_calls == [3 * sites] * 2
    assert torch.equal(images, plain)


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_training_prompts_are_encoded_once_and_give_the_same_loss(backbone_name):
    """begin_stage encodes the fixed diversified prompts once; a training step calls no text encoder and
    gets the loss (and binder gradients) that encoding its prompts then and there gives."""
    from conceptkit.method import TrainBatch

    backbone, method = attached(backbone_name)
    perturb(method)
    data = example_data(backbone, backbone_name)
    stage = method.stages(backbone)[-1]
    calls = []
    handle = backbone.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        method.begin_stage(stage, backbone)
        assert len(calls) >= 1  # encoded here, in chunks
        calls.clear()

        def step():
            batch = TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(3))
            method.zero_grad(set_to_none=True)
            loss = method.training_loss(batch, backbone, stage)["loss"]
            loss.backward()
            return loss.detach(), method.global_binder.net[1].weight.grad.clone()

        cached_loss, cached_grad = step()
        assert calls == []  # no text encoder in the training step
        method._encoded = None  # what every step did before: encode the drawn prompts
        fresh_loss, fresh_grad = step()
        assert calls  # the check can fail: this path does call it
    finally:
        handle.remove()
    torch.testing.assert_close(cached_loss, fresh_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_grad, fresh_grad, rtol=1e-4, atol=1e-6)


def test_global_binding_cache_is_keyed_on_context_rows_mode_and_parameters():
    """A site reuses the shared binding only for the same context tensor, the same declared rows, the
    same mode and unchanged binder parameters; the site that made it recomputes (a new forward)."""
    from conceptkit.attention import ContextRows
    from conceptkit.methods.bico.binders import bind

    backbone, method = attached("wan21_tiny")
    perturb(method)
    method._global_bindings = counting = CountingCache()
    prompt = method.prompt("a photo of {thing}")
    context, tokenized = backbone.encode_text([prompt])
    width = method.global_binder.net[0].normalized_shape[0]
    context = torch.randn(*context.shape[:2], width, generator=torch.Generator().manual_seed(0))

    def expected(site):
        mask = method.positions(backbone.hooks.rows, backbone)
        return bind(context, mask, method.global_binder, method.block_binders[site])

    with torch.no_grad():
        first = [method.bind_context(context, site) for site in (0, 1)]  # wan21_tiny: 2 cross sites
        assert len(counting.made) == 1
        for site, out in zip((0, 1), first):
            assert torch.equal(out, expected(site))
        method.bind_context(context, 0)  # the site that made it: a new forward
        assert len(counting.made) == 2
        method.bind_context(context.clone(), 1)  # another context tensor (site 1 now owns the entry)
        assert len(counting.made) == 3
        backbone.hooks.declare_rows(ContextRows.conditional(tokenized))  # the same ids, newly declared
        method.bind_context(context, 0)
        assert len(counting.made) == 4
        method.global_binder.scale.add_(0.25)  # an optimiser step, in place
        assert torch.equal(method.bind_context(context, 1), expected(1)) and len(counting.made) == 5
        method.bind_context(context, 0)  # nothing changed: reused
        assert len(counting.made) == 5
        method._global_only = not method._global_only  # another stage phase
        method.bind_context(context, 0)
        assert len(counting.made) == 6
        method._training_rows = weakref.ref(backbone.hooks.rows)  # training mode: what training_loss sets
        trained = method.bind_context(context, 0)
        assert len(counting.made) == 7 and not torch.equal(trained, expected(0))  # whole-prompt mask, absorbent
    method.detach(backbone)
    assert not counting.cache.holds


# bf16 binders ----------------------------------------------------------------------------------
def test_bind_carries_the_residual_in_the_wider_dtype():
    torch.manual_seed(0)
    g, b = Binder(8).to(torch.bfloat16), Binder(8).to(torch.bfloat16)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False, True, True, False, False], [True, False, False, False, False]])
    assert torch.equal(bind(x, mask, g, b), x)  # scale 0: the float32 context, bit for bit (not rounded)
    with torch.no_grad():
        g.scale.fill_(0.7)
        b.scale.fill_(-0.3)
    out = bind(x, mask, g, b)
    assert out.dtype == torch.float32 and torch.equal(out[~mask], x[~mask])
    bound = x + g(x.bfloat16()).float()
    torch.testing.assert_close(out[mask], (bound + b(bound.bfloat16()).float())[mask])
    y = x.bfloat16()  # a bf16 backbone with bf16 binders: bf16 throughout (the official code)
    assert bind(y, mask, g, b).dtype == torch.bfloat16
    torch.testing.assert_close(bind(y, mask, g, b)[mask], (y + g(y) + b(y + g(y)))[mask])


@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_bf16_binders_hold_bf16_bind_exactly_at_scale_zero_and_train(backbone_name):
    from conceptkit.method import TrainBatch

    backbone, method = attached(backbone_name, "thing", "method.binder_dtype=bfloat16")
    binders = [method.global_binder, *method.block_binders]
    assert {p.dtype for b in binders for p in b.parameters()} == {torch.bfloat16}
    assert method.absorbent_token.dtype == torch.float32  # d numbers; in bf16 lr 1e-4 steps would vanish
    assert method.hparams()["binder_dtype"] == "bfloat16"
    perturb(method, scales=False)
    prompt = method.prompt("a photo of {thing} on the beach")
    bound = predict(backbone, [prompt])
    method.detach(backbone)
    assert torch.equal(bound, predict(backbone, ["a photo of %s on the beach" % method.resolved_description]))
    method.attach(backbone)
    data = example_data(backbone, backbone_name)
    stage = method.stages(backbone)[1]
    method.begin_stage(stage, backbone)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
    batch = TrainBatch(indices=torch.arange(data.count), data=data, generator=torch.Generator().manual_seed(0))
    method.training_loss(batch, backbone, stage)["loss"].backward()
    assert all(p.grad.dtype == p.dtype for p in method.parameters() if p.grad is not None)
    optimizer.step()
    assert {p.dtype for b in binders for p in b.parameters()} == {torch.bfloat16}
    moved = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert "global_binder.scale" in moved and "block_binders.0.scale" in moved and "absorbent_token" in moved


def test_bf16_binders_save_and_load_back_in_bf16(tmp_path):
    import json

    from safetensors.torch import load_file

    from conceptkit.artifact import load_concept
    from conceptkit.methods.bico.binders import DualBranchBinder
    from conceptkit.training.run import build_parts, train

    from conftest import train_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = train(train_config("bico", "wan21_tiny", "experiment=smoke", "name=move", "sample.count=0",
                                    f"data.images={write_clips(tmp_path / 'clips')}", "data.frames=5",
                                    "method.binder_dtype=bfloat16", "method.frame_global_steps=1",
                                    "method.frame_all_steps=1", "method.global_steps=1", "method.all_steps=1",
                                    f"output={tmp_path / 'move.concept'}"))
    assert json.loads((folder / "concept.json").read_text())["hparams"]["binder_dtype"] == "bfloat16"
    weights = load_file(str(folder / "weights.safetensors"))
    assert weights["global_binder.motion.net.1.weight"].dtype == torch.bfloat16
    assert weights["block_binders.0.gate.bias"].dtype == torch.bfloat16
    assert weights["absorbent_token"].dtype == torch.float32
    assert weights["global_binder.spatial.scale"] != 0 and weights["global_binder.motion.scale"] != 0  # trained
    method, _ = load_concept(folder, make_backbone("wan21_tiny"))
    assert isinstance(method.global_binder, DualBranchBinder)
    state = method.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in weights.items())
    with pytest.raises(UserError, match="^method.binder_dtype must be one of float32, bfloat16, got 'float16'$") as error:
        build_parts(train_config("bico", "wan21_tiny", "method.binder_dtype=float16"))
    assert _one_line(error)
