"""User code a flag names as "module.path:name" (a verifier function, an environment class, tool
functions): imported in one place, so every such flag fails the same way, as a ValueError whose
message starts with the flag's label ("verifier 'x:y'", "environment 'x:Y'")."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def import_module_for(label: str, module_name: str) -> ModuleType:
    """The module, or a ValueError naming it and why it did not import."""
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"{label}: cannot import {module_name!r}: {e}") from e


def import_named(label: str, module_name: str, attr: str) -> Any:
    """module_name's attribute `attr` (dotted for nested ones), or a ValueError naming it."""
    obj: Any = import_module_for(label, module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{label}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
