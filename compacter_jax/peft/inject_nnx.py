"""NNX side of `inject` (see `inject.py`): module surgery in place.

Each matched module is replaced in its parent (attribute, `nnx.List` item or dict entry) by a
wrapper that holds it as `base`: `AdapterAfter` (adapter on the output) or `LoRABeside` (LoRA
update beside a projection). New parameters are `nnx_layers.AdapterParam`s; `also_train`
retypes matching backbone `nnx.Param`s to `AdapterParam`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from compacter_jax.peft import layers, nnx_layers
from compacter_jax.peft.methods import LoRAMethod


def path_str(path: tuple) -> str:
    """("blocks", 0, "mlp") -> "blocks/0/mlp"."""
    return "/".join(str(p) for p in path)


class AdapterAfter(nnx.Module):
    """`base` followed by `adapter` on its output: y = adapter(base(*args, **kwargs))."""

    def __init__(self, base: nnx.Module, adapter: nnx.Module, path: str):
        self.base, self.adapter, self.path = base, adapter, path

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        y = self.base(*args, **kwargs)
        if not isinstance(y, jax.Array):
            raise TypeError(f"inject: module {self.path!r} returned {type(y).__name__}; an "
                            "adapter needs one array (narrow `where`)")
        return self.adapter(y).astype(y.dtype)


class LoRABeside(nnx.Module):
    """`base` plus a LoRA update of its input: y = base(x, ...) + lora(x)."""

    def __init__(self, base: nnx.Module, lora: nnx.Module):
        self.base, self.lora = base, lora

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        y = self.base(x, *args, **kwargs)
        return y + self.lora(x).astype(y.dtype)


def trainable_values(model: nnx.Module) -> dict[str, Any]:
    """{"a/0/b": value} of every AdapterParam, at the path NNX first reaches it by."""
    return {path_str(p): v[...] for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx_layers.AdapterParam)}


def assign_values(model: nnx.Module, values: Mapping[str, Any]) -> None:
    """Sets every AdapterParam from `values` (keys as `trainable_values` writes them)."""
    for p, v in nnx.iter_graph(model):
        if isinstance(v, nnx_layers.AdapterParam):
            v[...] = jnp.asarray(values[path_str(p)], v[...].dtype)


def _set_child(parent: Any, key: Any, child: Any) -> None:
    if isinstance(key, int) or isinstance(parent, (list, dict, nnx.List)):
        parent[key] = child
    else:
        setattr(parent, key, child)


def inject_nnx(model: nnx.Module, inj: Any, match: Callable[[str], bool], rngs: nnx.Rngs | None,
               features: int | None) -> None:
    """Wraps the modules of `model` whose path `match`es with `inj.method`'s modules."""
    if rngs is None:
        raise ValueError("inject: an NNX model needs rngs=nnx.Rngs(...) for the new parameters")
    m = inj.method
    nodes = dict(nnx.iter_graph(model))
    targets = [(p, node) for p, node in nodes.items()
               if p and isinstance(node, nnx.Module) and match(path_str(p))]
    if not targets:
        known = [path_str(p) for p, n in nodes.items() if p and isinstance(n, nnx.Module)]
        raise ValueError(f"inject: no module of {type(model).__name__} matches where="
                         f"{inj.where!r}; module paths include {known[:8]}")
    roots = {g: nnx_layers.PeftRoot(m.n, rule_std=m.rule_init_std or layers.SHARED_RULE_STD,
                                    rngs=rngs)
             for g in inj.root_names()}
    for path, module in targets:
        p = path_str(path)
        if isinstance(m, LoRAMethod):
            k, d = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if not (isinstance(k, int) and isinstance(d, int)):
                raise ValueError(f"inject: LoRA needs a projection with in_features and "
                                 f"out_features (as nnx.Linear); {p!r} is a "
                                 f"{type(module).__name__} (narrow `where`)")
            wrapped = LoRABeside(module, nnx_layers.LoRA(k, d, rank=m.rank, alpha=m.alpha,
                                                         rngs=rngs))
        else:
            d = getattr(module, "out_features", None)
            d = d if isinstance(d, int) else features
            if d is None:
                raise ValueError(f"inject: cannot tell the output width of {p!r} "
                                 f"({type(module).__name__} has no out_features); pass "
                                 "features=<d_model>")
            rule = roots[inj.group_of(p)] if m.shared_rule else None
            adapter = nnx_layers.Adapter(
                d, reduction_factor=m.reduction_factor, projection=m.projection, n=m.n,
                rank=m.rank, shared_rule=rule, own_rule_std=m.rule_init_std or layers.OWN_RULE_STD,
                phm_path=m.phm_path, rngs=rngs)
            wrapped = AdapterAfter(module, adapter, p)
        _set_child(nodes[path[:-1]], path[-1], wrapped)
    if inj.also_train:
        for path, var in list(nnx.iter_graph(model)):
            if (type(var) is nnx.Param and re.search(inj.also_train, path_str(path))):
                _set_child(_node_at(model, path[:-1]), path[-1],
                           nnx_layers.AdapterParam(var[...]))


def _node_at(model: Any, path: tuple) -> Any:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) or isinstance(node, dict) else getattr(node, key)
    return node
