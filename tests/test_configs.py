"""Every YAML composes and binds to its target's signature, without building a model."""

from __future__ import annotations

import inspect

import pytest

from conceptkit.config import compose, conf_dir, group_options


def test_every_method_and_backbone_config_binds():
    for method in group_options("method"):
        for backbone in group_options("backbone"):
            cfg = compose("train", [f"method={method}", f"backbone={backbone}"])  # validate() binds both
            assert cfg.method._target_ and cfg.backbone._target_


def test_method_configs_list_every_constructor_argument():
    """Airtight: a config that forgets an argument silently takes a code default; ours spell all out."""
    import importlib

    for method in group_options("method"):
        cfg = compose("train", [f"method={method}"])
        module, _, name = cfg.method._target_.rpartition(".")
        params = set(inspect.signature(getattr(importlib.import_module(module), name)).parameters) - {"concept_name"}
        assert params == set(cfg.method.keys()) - {"_target_"}, method


def test_other_groups_and_commands_compose():
    for experiment in group_options("experiment"):
        compose("train", [f"experiment={experiment}"])
    compose("compose", ["concepts=[a,b]", "prompt=x"])
    compose("bench", ["methods=[lora]"])
    for backbone in ("sd15_shapes", "wan21_shapes"):
        compose("pretrain", [f"backbone={backbone}"])
    assert (conf_dir() / "train.yaml").is_file()


def test_toy_budgets_apply_only_to_their_method_and_backbone():
    """conf/budget/<method>_<backbone>.yaml: the embedded default (no arguments) is ConceptPrism on
    sd15_shapes with its toy budget; other backbones keep the official defaults; overrides win."""
    default = compose("train", [])
    assert (default.backbone.architecture, default.method._target_.rsplit(".", 1)[1]) == ("shapes", "ConceptPrism")
    assert (default.method.token_steps, default.method.token_lr, default.method.lora_steps) == (250, 5e-3, 100)
    official = compose("train", ["backbone=sd15_tiny"]).method
    assert (official.token_steps, official.token_lr, official.lora_steps) == (200, 5e-4, 200)
    assert compose("train", ["method.token_lr=1e-4"]).method.token_lr == 1e-4
    pairs = {f"{m}_{b}": (m, b) for m in group_options("method") for b in group_options("backbone")}
    for budget in group_options("budget"):
        assert budget in pairs, f"conf/budget/{budget}.yaml names no <method>_<backbone> pair"
        method, backbone = pairs[budget]
        compose("train", [f"method={method}", f"backbone={backbone}"])  # validate(): every budget key is a real key


def test_unknown_keys_are_refused():
    from conceptkit.errors import UserError

    with pytest.raises(UserError, match="lr_typo"):
        compose("train", ["+method.lr_typo=1"])
    with pytest.raises(UserError, match="unknown config key 'data.imagez'"):
        compose("train", ["+data.imagez=x"])
