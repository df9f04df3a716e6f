"""Names users type -> classes, resolved lazily. An explicit table: nothing registers itself on import."""

from __future__ import annotations

import importlib

from conceptkit.errors import UserError

METHODS = {
    "textual_inversion": "conceptkit.methods.textual_inversion:TextualInversion",
    "lora": "conceptkit.methods.lora:DreamBoothLoRA",
    "conceptprism": "conceptkit.methods.conceptprism:ConceptPrism",
}

BACKBONE_FAMILIES = {
    "sd15": "conceptkit.backbones.sd15:SD15Backbone",
    "wan21": "conceptkit.backbones.wan21:Wan21Backbone",
}


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return _load(METHODS[name])


def backbone_class(family: str):
    if family not in BACKBONE_FAMILIES:
        raise UserError(f"unknown backbone family {family!r}: choose one of {', '.join(BACKBONE_FAMILIES)}")
    return _load(BACKBONE_FAMILIES[family])
