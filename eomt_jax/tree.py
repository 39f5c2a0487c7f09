"""Parameter-tree paths as 'a/b/0/c' strings, the names that conversion, optimizer and sharding rules match."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def key_str(k) -> str:
    if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    return str(k)


def path_str(path) -> str:
    """'a/b/0/c' for a `jax.tree_util` key path of a dict, an `nnx.State`, lists, tuples or dataclasses.

    `nnx.State` leaves sit under a Variable, which adds a trailing `.value` attribute key; it is dropped so that a
    pure dict and the State of the same model give the same names.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(key_str(k) for k in path)


def flatten_paths(tree: Any) -> dict[str, Any]:
    """Flat {'a/b/c': leaf} view of an nnx.State, a nested dict, or any pytree."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): v for p, v in leaves}


def set_from_flat(state: nnx.State, flat: dict[str, Any]) -> nnx.State:
    """Return `state` with every leaf replaced by `flat[path]`; all paths must be present."""
    pure = nnx.to_pure_dict(state)
    missing = []

    def pick(path, _):
        p = path_str(path)
        if p not in flat:
            missing.append(p)
            return None
        return flat[p]

    new = jax.tree_util.tree_map_with_path(pick, pure)
    if missing:
        raise KeyError(f"no value for parameter(s): {', '.join(missing)}")
    nnx.replace_by_pure_dict(state, new)
    return state


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Nested dict of a flat {'a/b/c': leaf} mapping (the inverse of `flatten_paths` for nested dicts)."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree
