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


def test_the_core_never_names_a_method():
    """src/conceptkit reaches methods only through the registry and the ConceptMethod interface: no
    import of a method's package, no method-specific loss in the core (DESIGN.md)."""
    import ast
    from pathlib import Path

    from conceptkit.registry import method_names

    core = Path(__file__).resolve().parents[1] / "src" / "conceptkit"
    named = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                      [a.name for a in node.names] if isinstance(node, ast.Import) else []
            named += [f"{path.relative_to(core)}: {m}" for m in modules
                      if any(m == f"conceptkit.methods.{name}" or m.startswith(f"conceptkit.methods.{name}.")
                             for name in method_names())]
    assert named == []


def test_what_suites_tell_a_method_binds_to_its_config():
    """The bench suites address methods through class_word_overrides / scene_overrides: each override a
    method declares must compose and reach the constructor argument it names (a rename breaks here,
    not silently in a 50-minute suite run)."""
    from conceptkit.config import compose
    from conceptkit.registry import method_class, method_names

    taken = {}
    for name in method_names():
        cls = method_class(name)
        word = compose("train", [f"method={name}", *cls.class_word_overrides("circle")]).method
        scene = compose("train", [f"method={name}", *cls.scene_overrides("a {left} and a {right}",
                                                                          {"left": "circle", "right": "star"})]).method
        taken[name] = ("circle" in word.values(), dict(scene.get("init_words") or {}))
        assert not cls.renders_class_word or cls.class_word_overrides("circle"), name
    assert {n for n, (word, _) in taken.items() if word} == {"lora", "bico"}
    assert {n: init for n, (_, init) in taken.items() if init} == {"mcpl": {"left": "circle", "right": "star"}}
