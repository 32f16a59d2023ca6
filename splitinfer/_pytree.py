"""torch's pytree structures (``treespec_dumps`` strings in a manifest) read without torch.

A bundle stores the structure of a model's inputs and outputs as torch's ``treespec_dumps``
JSON. The ONNX Runtime path (splitinfer/runtime.py) runs where torch is not installed, so it
flattens inputs and rebuilds outputs here for the containers models return in practice
(tuples, lists, dicts, nested); another node type (a namedtuple, a dataclass registered with
torch) is handed to torch's own pytree when torch is importable, and is a clear error otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from splitinfer.errors import BundleError, ConfigError

__all__ = ["flatten", "unflatten"]

_TUPLE, _LIST, _DICT = "builtins.tuple", "builtins.list", "builtins.dict"


def _parse(spec: str) -> dict[str, Any]:
    try:
        protocol, node = json.loads(spec)
    except (ValueError, TypeError):
        raise BundleError("the manifest's tree spec is not torch treespec JSON") from None
    if protocol != 1 or not isinstance(node, dict):
        raise BundleError(f"the manifest's tree spec has protocol {protocol!r}; this splitinfer reads 1")
    return node


def _known(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if kind is None:
        return True
    return kind in (_TUPLE, _LIST, _DICT) and all(_known(c) for c in node.get("children_spec", []))


def _torch_pytree(what: str) -> Any:
    try:
        from torch.utils import _pytree as pytree
    except ImportError:
        raise ConfigError(
            f"this model's {what} use a container type other than tuple, list and dict; rebuilding "
            f"them needs torch installed"
        ) from None
    return pytree


def unflatten(leaves: Sequence[Any], spec: str) -> Any:
    """The structure ``spec`` describes, with ``leaves`` in its leaf slots (in order)."""
    node = _parse(spec)
    if not _known(node):
        pytree = _torch_pytree("outputs")
        return pytree.tree_unflatten(list(leaves), pytree.treespec_loads(spec))
    it = iter(leaves)

    def build(n: dict[str, Any]) -> Any:
        kind = n.get("type")
        if kind is None:
            return next(it)
        children = [build(c) for c in n.get("children_spec", [])]
        if kind == _TUPLE:
            return tuple(children)
        if kind == _LIST:
            return children
        keys = json.loads(n.get("context") or "[]")
        return dict(zip(keys, children, strict=True))

    try:
        out = build(node)
    except StopIteration:
        raise ConfigError(f"got {len(leaves)} leaves, fewer than the structure holds") from None
    return out


def flatten(tree: Any, spec: str) -> list[Any]:
    """The leaves of ``tree``, which must have the structure ``spec`` describes (ConfigError)."""
    node = _parse(spec)
    if not _known(node):
        pytree = _torch_pytree("inputs")
        leaves, got = pytree.tree_flatten(tree)
        if pytree.treespec_dumps(got) != spec:
            raise ConfigError("the inputs do not have the structure the model was compiled with")
        return list(leaves)
    out: list[Any] = []

    def walk(n: dict[str, Any], value: Any) -> None:
        kind = n.get("type")
        children = n.get("children_spec", [])
        if kind is None:
            if isinstance(value, tuple | list | dict):
                raise ConfigError("the inputs do not have the structure the model was compiled with")
            out.append(value)
            return
        if kind == _DICT:
            keys = json.loads(n.get("context") or "[]")
            if not isinstance(value, dict) or list(value) != keys:
                raise ConfigError("the inputs do not have the structure the model was compiled with")
            values = [value[k] for k in keys]
        else:
            want = tuple if kind == _TUPLE else list
            if not isinstance(value, want) or len(value) != len(children):
                raise ConfigError("the inputs do not have the structure the model was compiled with")
            values = list(value)
        for c, v in zip(children, values):
            walk(c, v)

    walk(node, tree)
    return out
