"""The registry: one discriminated union of every schedule node type.

How it fits together (keep it this simple):

1. Every node module exports ``NODES: tuple[type[ScheduleNode], ...]``; each node class has a
   ``type: Literal["Name"]`` field, the discriminator.
2. Composite nodes (SequentialLR, ChainedScheduler, Epochs, optax.join_schedules, ...) annotate
   their children with the *forward reference* ``"AnySchedule"`` (a string: their modules
   only import it under ``TYPE_CHECKING``), so pydantic leaves them "not fully defined".
3. This module builds ``AnySchedule = Annotated[Union[every node], Field(discriminator="type")]``
   and calls ``model_rebuild`` on every node class with ``AnySchedule`` in the namespace,
   which resolves the forward references (the union is recursive through them).

A new node module is added by importing it below and appending it to ``NODE_MODULES``.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field, TypeAdapter

from . import (
    keras_nodes,
    optax_nodes,
    plateau,
    range_test,
    timm_nodes,
    torch_basic,
    torch_compose,
    torch_cyclic,
    torch_lambda,
    torch_swa,
    transformers_nodes,
)
from .base import ScheduleNode

NODE_MODULES: tuple[ModuleType, ...] = (
    torch_basic,
    torch_lambda,
    torch_cyclic,
    torch_swa,
    plateau,
    range_test,
    torch_compose,
    transformers_nodes,
    timm_nodes,
    optax_nodes,
    keras_nodes,
)

ALL_NODES: tuple[type[ScheduleNode], ...] = tuple(
    node for module in NODE_MODULES for node in module.NODES
)
"""Every node class, torch's first (the order of the docs and of the JSON schema)."""

NODE_TYPES: dict[str, type[ScheduleNode]] = {}
for _node in ALL_NODES:
    _name = _node.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    if _name in NODE_TYPES:
        raise RuntimeError(f"schedule type {_name!r} is defined twice")
    NODE_TYPES[_name] = _node

if TYPE_CHECKING:
    AnySchedule = ScheduleNode
else:
    AnySchedule = Annotated[Union[ALL_NODES], Field(discriminator="type")]  # noqa: UP007

for _node in ALL_NODES:
    _node.model_rebuild(force=True, _types_namespace={"AnySchedule": AnySchedule})

schedule_adapter: TypeAdapter[Any] = TypeAdapter(AnySchedule)
"""Validates one node (``schedule_adapter.validate_python({...})``)."""

__all__ = ["ALL_NODES", "NODE_MODULES", "NODE_TYPES", "AnySchedule", "schedule_adapter"]
