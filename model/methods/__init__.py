"""The methods, one module each, and the registry that names them. Adding a method is a new module with a
``Method`` subclass and its ``MethodConfig``, and one ``register`` call (here, or in the user's own code)."""

from __future__ import annotations

from .base import Method, MethodConfig
from .densecl import DenseCL
from .mocov2 import MoCoV2
from .vader import Vader

METHODS: dict[str, type[Method]] = {}
DEFAULT = "vader"  # what the trainer and the random evaluation baseline build when nothing is said


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` available under its config's ``name`` (``method.name=...`` in the training config)."""
    METHODS[method.Config.name] = method
    return method


for _method in (Vader, DenseCL, MoCoV2):
    register(_method)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"name={name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str = DEFAULT, **fields) -> MethodConfig:
    """The ``MethodConfig`` of the method called ``name``, with ``fields`` set (the rest at its defaults)."""
    return method_class(name).Config(name=name, **fields)


__all__ = ["DEFAULT", "METHODS", "Method", "MethodConfig", "method_class", "method_config", "register"]
