"""The conformance table: every (method, tiny backbone) pair passes the same checks.

attach -> detach restores bit-identical outputs; gradients reach only method parameters; a short
Lightning run writes a concept; loading it in a fresh process gives identical outputs; two concepts
compose on one backbone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import (PAIRS, condition, example_data, family_of, full_batch, make_backbone, make_method, predict,
                      train_config)


def _perturb(method, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("method_name,backbone_name", PAIRS)
def test_attach_detach_is_exact(method_name, backbone_name):
    backbone = make_backbone(backbone_name)
    method = make_method(method_name, backbone_name, "thing")
    prompts = [method.prompt("a photo of {thing}"), "a photo of a red dog"]
    before = predict(backbone, prompts)
    lora_linear_types = {type(m) for m in backbone.denoiser.modules()}
    method.initialize(backbone, example_data(backbone, backbone_name, method=method))
    method.attach(backbone)
    condition(method, backbone)
    _perturb(method)  # make sure the attached concept really changes something
    if method.kind == "encoder":
        condition(method, backbone)  # the references' tokens from the perturbed adapters
    attached = predict(backbone, [method.prompt("a photo of {thing}"), "a photo of a red dog"])
    assert not torch.equal(attached, before)
    method.detach(backbone)
    after = predict(backbone, prompts)
    assert torch.equal(after, before)
    assert {type(m) for m in backbone.denoiser.modules()} == lora_linear_types  # PEFT layers gone too
    assert backbone.hooks.owners() == [] and backbone.tokens.placeholders() == []


@pytest.mark.parametrize("method_name,backbone_name", PAIRS)
def test_gradients_reach_only_method_parameters(method_name, backbone_name):
    backbone = make_backbone(backbone_name)
    method = make_method(method_name, backbone_name, "thing")
    data = example_data(backbone, backbone_name, method=method)
    method.initialize(backbone, data)
    method.attach(backbone)
    _perturb(method)  # LoRA B starts at zero, which would hide A's gradient
    for stage in method.stages(backbone):
        method.begin_stage(stage, backbone)
        method.zero_grad(set_to_none=True)
        # every image in one batch, so per-image parameters (ConceptPrism's residuals) all take part
        method.training_loss(full_batch(method, data), backbone, stage)["loss"].backward()
        trainable = [p for p in method.parameters() if p.requires_grad]
        assert trainable, stage
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), stage.name
        assert all(p.grad is None for p in method.parameters() if not p.requires_grad), stage.name
        method_ids = {id(p) for p in method.parameters()}
        for module in backbone.frozen_modules():
            for p in module.parameters():
                if id(p) not in method_ids:
                    assert p.grad is None and not p.requires_grad


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short Lightning run per pair (2 steps per stage), reused by the checks below."""
    from conceptkit.training.run import train

    root = tmp_path_factory.mktemp("concepts")
    folders = {}
    for method_name, backbone_name in PAIRS:
        name = f"{method_name}_{backbone_name}"
        cfg = train_config(method_name, backbone_name, "experiment=smoke", f"name={name}",
                           f"output={root / name}.concept", "sample.count=0", "data.corpus.workers=0")
        folders[(method_name, backbone_name)] = train(cfg)
    return folders


@pytest.mark.parametrize("method_name,backbone_name", PAIRS)
def test_short_lightning_run_writes_a_concept(trained, method_name, backbone_name):
    folder = trained[(method_name, backbone_name)]
    meta = json.loads((folder / "concept.json").read_text())
    assert meta["method"] == method_name and meta["backbone"]["family"] == family_of(backbone_name)
    assert all(stage["steps"] == 2 for stage in meta["training"]["stages"])
    assert (folder / "weights.safetensors").is_file() and (folder / "config.yaml").is_file()
    assert not folder.with_name(folder.name + ".partial").exists()
    from safetensors.torch import load_file

    assert not any("denoiser" in k or "unet" in k.split(".")[0] for k in load_file(str(folder / "weights.safetensors")))


LOAD_AND_PREDICT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import condition, predict
    from conceptkit.artifact import backbone_from_meta, load_concept, read_meta
    backbone = backbone_from_meta(read_meta({folder!r})).load()
    method, meta = load_concept({folder!r}, backbone)
    condition(method, backbone, meta["name"])
    torch.save(predict(backbone, [method.prompt("a photo of {{%s}}" % meta["name"])]), {out!r})
""")


@pytest.mark.parametrize("method_name,backbone_name", PAIRS)
def test_save_then_load_in_fresh_process_is_identical(trained, tmp_path, method_name, backbone_name):
    from conceptkit.artifact import load_concept, read_meta

    folder = trained[(method_name, backbone_name)]
    backbone = make_backbone(backbone_name)
    method, meta = load_concept(folder, backbone)
    condition(method, backbone, meta["name"])
    here = predict(backbone, [method.prompt("a photo of {%s}" % meta["name"])])
    out = tmp_path / "fresh.pt"
    import os

    code = LOAD_AND_PREDICT.format(tests=os.path.dirname(__file__), folder=str(folder), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.equal(torch.load(out), here)
    # and the loaded concept really is the trained one, not a fresh init
    plain = predict(make_backbone(backbone_name), [method.prompt("a photo of {%s}" % meta["name"])])
    assert not torch.equal(here, plain)
    assert read_meta(folder)["tokens"] == method.token_names()


@pytest.mark.parametrize("backbone_name", ["sd15_tiny", "wan21_tiny"])
def test_concepts_of_all_methods_compose(trained, backbone_name):
    from conceptkit.artifact import load_concept
    from conceptkit.compose import render_prompt

    backbone = make_backbone(backbone_name)
    methods = [load_concept(trained[(m, backbone_name)], backbone)[0] for m in ("textual_inversion", "lora", "conceptprism", "mcpl")]
    names = [m.concept_name for m in methods]
    prompt = render_prompt("a photo of " + " and ".join("{%s}" % n for n in names), methods)
    assert all(tok in prompt for m in methods for tok in [m.prompt("{%s}" % m.concept_name)])
    together = predict(backbone, [prompt])
    # each concept contributes: dropping any one changes the result, and putting it back restores it
    for method in methods:
        method.detach(backbone)
        assert not torch.equal(predict(backbone, [prompt]), together), method.name
        method.attach(backbone)
        # re-attached, a LoRA adapter is summed in another order: equal up to float rounding
        torch.testing.assert_close(predict(backbone, [prompt]), together, atol=1e-6, rtol=1e-5)
    media = backbone.generate([render_prompt("a photo of {%s}" % names[0], methods[:1])], steps=2)
    assert media.shape[:3] == (1, 3, backbone.default_frames) and torch.isfinite(media).all()


# Methods whose concept holds no LoRA adapter (token vectors or binders only).
WITHOUT_LORA = {"textual_inversion", "mcpl", "bico", "kv_mixed", "bindweave"}  # bindweave: tune=full by default
# Methods whose concept holds no learned token vectors (LoRA weights or binders only).
WITHOUT_EMBEDDINGS = {"lora", "bico", "kv_mixed", "bindweave"}


@pytest.mark.parametrize("method_name,backbone_name", [p for p in PAIRS if p[0] not in WITHOUT_LORA] +
                         [("lora_alpha8", "sd15_tiny")])
def test_exported_lora_loads_in_stock_diffusers(trained, tmp_path, method_name, backbone_name):
    """pytorch_lora_weights.safetensors is what diffusers' own loader reads, and gives our outputs."""
    from safetensors.torch import load_file

    from conceptkit.artifact import load_concept
    from conceptkit.backbones.tiny import tiny_sd15_modules, tiny_wan21_modules
    from conceptkit.training.run import train
    from conftest import fixed_inputs

    if method_name == "lora_alpha8":  # alpha != rank: the scale must survive the export
        folder = train(train_config("lora", backbone_name, "experiment=smoke", "sample.count=0", "method.alpha=8",
                                    f"output={tmp_path / 'a8.concept'}"))
    else:
        folder = trained[(method_name, backbone_name)]
    backbone = make_backbone(backbone_name)
    load_concept(folder, backbone)
    latents, timesteps = fixed_inputs(backbone)
    with torch.no_grad():
        context, _ = backbone.encode_text(["a photo of a red dog", "a cat"])
        ours = backbone.denoise(latents, timesteps, context)
        stock = (tiny_sd15_modules if backbone_name == "sd15_tiny" else tiny_wan21_modules)(0)[2]
        stock.load_lora_adapter(load_file(str(folder / "pytorch_lora_weights.safetensors")),
                                prefix=backbone.lora_prefix, adapter_name="exported")
        if backbone_name == "sd15_tiny":
            theirs = stock(latents, timesteps, encoder_hidden_states=context).sample
        else:
            theirs = stock(hidden_states=latents, timestep=timesteps, encoder_hidden_states=context).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, predict(make_backbone(backbone_name), ["a photo of a red dog", "a cat"]))


@pytest.mark.parametrize("method_name,backbone_name", [p for p in PAIRS if p[0] not in WITHOUT_EMBEDDINGS])
def test_exported_embeddings_are_the_learned_tokens(trained, method_name, backbone_name):
    """learned_embeds*.safetensors: one token per file (what diffusers' load_textual_inversion reads),
    named as in concept.json, holding exactly the learned vectors."""
    from safetensors.torch import load_file

    folder = trained[(method_name, backbone_name)]
    meta = json.loads((folder / "concept.json").read_text())
    weights = load_file(str(folder / "weights.safetensors"))
    files = sorted(folder.glob("learned_embeds*.safetensors"))
    exported = {}
    for path in files:
        embeds = load_file(str(path))
        assert len(embeds) == 1, path.name
        exported.update(embeds)
    name = meta["name"]
    if method_name == "mcpl":  # one file per learned word, each the word's vector
        assert sorted(exported) == sorted(meta["tokens"])
        for token, vector in exported.items():
            word = token[len(name) + 2:-1]  # <name/word>
            assert torch.equal(vector, weights[f"vectors.{word}"])
        return
    assert list(exported) == [f"<{name}>"] and [p.name for p in files] == ["learned_embeds.safetensors"]
    key = "vectors" if method_name == "textual_inversion" else "target"
    assert torch.equal(exported[f"<{name}>"], weights[key])
