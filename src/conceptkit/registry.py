"""Names users type -> classes, resolved lazily.

Methods are found as folders of the `conceptkit.methods` package (methods/<name>/ in the source tree),
each exporting its class as `METHOD`; the core never names a method, and nothing registers itself on
import. Backbone families are modules of `conceptkit.backbones` (BACKBONE_MODULES), each exporting `BACKBONE`.
"""

from __future__ import annotations

import importlib
import pkgutil

from conceptkit.errors import UserError

# family -> the module exporting its class: Wan2.1's image-to-video family is the wan21 class with task=i2v.
BACKBONE_MODULES = {"sd15": "sd15", "wan21": "wan21", "wan21_i2v": "wan21"}
BACKBONE_FAMILIES = tuple(BACKBONE_MODULES)


def method_names() -> list[str]:
    import conceptkit.methods as package

    return sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.ispkg)


def method_class(name: str):
    names = method_names()
    if name not in names:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(names)}")
    return importlib.import_module(f"conceptkit.methods.{name}").METHOD


def backbone_class(family: str):
    if family not in BACKBONE_FAMILIES:
        raise UserError(f"unknown backbone family {family!r}: choose one of {', '.join(BACKBONE_FAMILIES)}")
    return importlib.import_module(f"conceptkit.backbones.{BACKBONE_MODULES[family]}").BACKBONE
