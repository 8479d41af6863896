"""Add a PEFT method to a model the library does not know, linen or NNX, without editing its code.

    model, inj = cj.inject(model, "compacter++", where=r"mlp$", rngs=nnx.Rngs(0))   # NNX
    model, inj = cj.inject(model, "compacter++", where=r"DenseReluDense$")           # linen

`where` picks modules by path ("/"-joined attribute names or list indices, e.g.
"blocks/0/mlp"; a regex searched in it, or a predicate path -> bool):

* the adapter family (Adapter, Pfeiffer, PHM-Adapter, Compacter, Compacter++ ...): a bottleneck
  adapter h -> h + up(gelu(down(h))) on the output of every matched module (its `__call__` must
  return one array [..., d_model]); Compacter's shared rule is one `PeftRoot` per model, or one
  per named group with `rule_groups={"enc": r"^encoder/", ...}`;
* LoRA: (alpha / rank) x A B added to the output of every matched projection (called as
  `module(x, ...)` with x [..., in], returning [..., out]).

The method's T5 placement fields (positions, stacks, blocks, targets, train_layer_norms) do not
apply: `where` replaces them, and `also_train` (a path regex) adds backbone parameters to the
trained set (e.g. r"layer_norm" for the paper's Compacter recipe on our T5).

Linen: the returned module wraps the original (`nn.share_scope`, so the backbone's parameter
paths are unchanged) and inserts the modules with `nn.intercept_methods` while it runs:
adapters at `<matched path>/adapter`, LoRA at `<matched path>/lora`, the shared rule at
`peft_root` (`peft_root_<group>` per group). `Injection.init(rng, *args, backbone=params)`
initialises the new parameters around existing backbone weights; `partition` / `combine` split
trainable from frozen. Layers run by `nn.scan` / `nn.vmap` lifts are not supported.

NNX (`inject_nnx.py`): module surgery in place. Each matched module is replaced in its parent by a wrapper
holding it as `base` (its parameters move to `<path>/base/...`) and the new module as `adapter`
/ `lora`; new parameters are `AdapterParam`s (`nnx_layers`), so `nnx.Optimizer(model, tx,
wrt=AdapterParam)` trains exactly them. An adapter needs d_model at construction: taken from
the matched module's `out_features` when it has one, else from `features=`.

`Injection.save(path, ...)` / `load(path, ...)` write and read the trained parameters with the
manifest and checksums of `export.py`; loading refuses another method or a tree that differs.

Our T5's hooks (`compacter_jax.models.hooks`) remain the fast path for that model: injecting
Compacter++ with where=r"DenseReluDense$" gives the same logits as the hook T5.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from compacter_jax.peft import export, inject_nnx, layers, partition
from compacter_jax.peft.method import Method
from compacter_jax.peft.methods import AdapterMethod, LoRAMethod
from compacter_jax.peft.registry import get_method

Where = str | Callable[[str], bool]
ADAPTER, LORA, ROOT = "adapter", "lora", "peft_root"


def _matcher(where: Where, field: str = "where") -> Callable[[str], bool]:
    if callable(where):
        return where
    if not isinstance(where, str) or not where:
        raise ValueError(f"inject: {field} must be a non-empty path regex or a predicate "
                         f"path -> bool, got {where!r}")
    try:
        pattern = re.compile(where)
    except re.error as e:
        raise ValueError(f"inject: {field}={where!r} is not a valid regex ({e})") from None
    return lambda path: pattern.search(path) is not None


_path_str = inject_nnx.path_str


@dataclasses.dataclass(frozen=True, eq=False)
class Injection:
    """What `inject` added and how to train it.

    Attributes:
      method: the Method whose modules were added (AdapterMethod or LoRAMethod).
      where: the path rule of the matched modules.
      also_train: a path regex of backbone parameters trained too (None: none).
      rule_groups: group name -> path regex, one shared PHM rule per group (None: one rule).
      model: the linen module that runs with the injection (None for NNX).
    """

    method: Method
    where: Where
    also_train: str | None = None
    rule_groups: Mapping[str, str] | None = None
    model: nn.Module | None = None

    @property
    def name(self) -> str:
        """The inserted module's name: "adapter" or "lora"."""
        return LORA if isinstance(self.method, LoRAMethod) else ADAPTER

    @property
    def shared_rule(self) -> bool:
        return isinstance(self.method, AdapterMethod) and self.method.shared_rule

    def root_names(self) -> dict[str, str]:
        """Shared-rule holder name per group ({"": "peft_root"} without groups; {} if none)."""
        if not self.shared_rule:
            return {}
        if not self.rule_groups:
            return {"": ROOT}
        return {g: f"{ROOT}_{g}" for g in self.rule_groups}

    def group_of(self, path: str) -> str:
        """The rule group of a matched module path (ValueError if it is in none or several)."""
        if not self.rule_groups:
            return ""
        hits = [g for g, rx in self.rule_groups.items() if re.search(rx, path)]
        if len(hits) != 1:
            raise ValueError(f"inject: module {path!r} matches rule groups {hits} of "
                             f"{dict(self.rule_groups)}; every matched module needs exactly one")
        return hits[0]

    # -- trainable / frozen (linen trees; NNX: the AdapterParam filter) ----------------------
    def is_trainable(self, path: tuple[str, ...]) -> bool:
        """Whether a parameter path (tuple of names) is trained: the inserted modules, the
        shared rule(s), and backbone parameters matching `also_train`."""
        if path and path[0] in self.root_names().values():
            return True
        match = _matcher(self.where)
        for i, part in enumerate(path):
            if part == self.name and match(_path_str(path[:i])):
                return True
        return bool(self.also_train) and re.search(self.also_train, _path_str(path)) is not None

    def partition(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        """(trainable, frozen) of a linen parameter tree."""
        labels = partition.label_params(params, self.is_trainable)
        if not any(v == partition.TRAINABLE
                   for v in traverse_util.flatten_dict(labels).values()):
            raise ValueError(f"inject: no parameter of this tree is trainable under where="
                             f"{self.where!r}: was it initialised with the injected model?")
        return partition.split(params, labels)

    def combine(self, trainable: Any, frozen: Any) -> dict:
        return partition.merge(trainable, frozen)

    def init(self, rng: jax.Array, *args: Any, backbone: Mapping[str, Any] | None = None,
             **kwargs: Any) -> dict:
        """Linen: the injected model's `params` for inputs `args`, the backbone's taken from
        `backbone` (unchanged) when given. Raises ValueError naming missing backbone weights."""
        if self.model is None:
            raise ValueError("Injection.init is for linen models; an NNX model is built by "
                             "inject itself")
        params = self.model.init(rng, *args, **kwargs)["params"]
        if backbone is None:
            return params
        _, backbone_new = partition.split(params, partition.label_params(params, self._added))
        want = traverse_util.flatten_dict(backbone_new)
        got = traverse_util.flatten_dict(dict(backbone))
        missing = sorted(_path_str(k) for k in set(want) - set(got))
        extra = sorted(_path_str(k) for k in set(got) - set(want))
        if missing or extra:
            raise ValueError(f"inject: the backbone params do not fit the model: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        flat = traverse_util.flatten_dict(params)
        flat.update(got)
        return traverse_util.unflatten_dict(flat)

    def _added(self, path: tuple[str, ...]) -> bool:
        """A parameter the injection added (not a backbone one trained through also_train)."""
        return dataclasses.replace(self, also_train=None).is_trainable(path)

    # -- save / load ----------------------------------------------------------------------
    def trainable_tree(self, params_or_model: Any) -> dict:
        """The trained parameters: a nested dict (linen) or {path: array} of an NNX model's
        AdapterParams (paths "/"-joined, as NNX first reaches them)."""
        if isinstance(params_or_model, nnx.Module):
            return traverse_util.unflatten_dict(
                {tuple(k.split("/")): v
                 for k, v in inject_nnx.trainable_values(params_or_model).items()})
        return self.partition(params_or_model)[0]

    def save(self, path: str | Path, params_or_model: Any, **metadata: Any) -> Path:
        """Writes the trained parameters and the method (plus JSON-able metadata) to `path/`."""
        where = self.where if isinstance(self.where, str) else None
        record = {"method": self.method.to_dict(),
                  "injection": {"where": where, "also_train": self.also_train,
                                "rule_groups": dict(self.rule_groups or {})}, **metadata}
        return export.export_trainable(path, self.trainable_tree(params_or_model), record)

    def load(self, path: str | Path, params_or_model: Any) -> Any:
        """Puts the parameters saved at `path` in place: returns the combined linen params, or
        updates the NNX model in place (and returns it). Refuses another method or a tree whose
        paths or shapes differ, naming them."""
        saved, meta = export.load_trainable(path)
        method = export.method_of_export(meta, path)
        if method != self.method:
            raise export.AdapterFileError(f"{path}: saved with method {method.name} "
                                          f"({method.to_dict()}), this injection uses "
                                          f"{self.method.name} ({self.method.to_dict()})")
        got = {_path_str(k): v for k, v in traverse_util.flatten_dict(saved).items()}
        if isinstance(params_or_model, nnx.Module):
            want = inject_nnx.trainable_values(params_or_model)
        else:
            trainable, frozen = self.partition(params_or_model)
            want = {_path_str(k): v for k, v in traverse_util.flatten_dict(trainable).items()}
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise export.AdapterFileError(f"{path}: the saved parameters do not fit this model: "
                                          f"missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in got.items():
            if tuple(value.shape) != tuple(want[key].shape):
                raise export.AdapterFileError(f"{path}: parameter {key} has shape {value.shape}, "
                                              f"the model expects {tuple(want[key].shape)}")
        if isinstance(params_or_model, nnx.Module):
            inject_nnx.assign_values(params_or_model, got)
            return params_or_model
        loaded = traverse_util.unflatten_dict(
            {tuple(k.split("/")): jnp.asarray(v, want[k].dtype) for k, v in got.items()})
        return self.combine(loaded, frozen)


# ---------------------------------------------------------------------------------------------
# Linen: interception
# ---------------------------------------------------------------------------------------------
class InjectedModel(nn.Module):
    """`model` run with the injection's modules inserted (same parameter paths as `model` plus
    the new ones). Call it as the model; other methods via `apply(..., method=...)` with
    `InjectedModel.call` and the method name as first argument."""

    model: nn.Module
    injection: Injection

    def setup(self) -> None:
        nn.share_scope(self, self.model)
        m = self.injection.method
        self.roots = {g: layers.PeftRoot(n=m.n, rule_std=m.rule_init_std or layers.SHARED_RULE_STD,
                                         name=name)
                      for g, name in self.injection.root_names().items()}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("__call__", *args, **kwargs)

    def call(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Runs `model.<method_name>(*args, **kwargs)` with the injection."""
        shared = {g: root()["phm_rule"] for g, root in self.roots.items()}
        with nn.intercept_methods(_interceptor(self.injection, shared)):
            return getattr(self.model, method_name)(*args, **kwargs)


def _interceptor(inj: Injection, shared: dict[str, jax.Array]):
    match = _matcher(inj.where)
    m = inj.method
    inserting = [False]      # calls made by the inserted modules are not intercepted
    made: dict[int, nn.Module] = {}   # one inserted module per module instance (called twice)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if inserting[0] or context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = _path_str(module.scope.path)
        if not path or not match(path):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        if not isinstance(y, jax.Array):
            raise TypeError(f"inject: module {path!r} returned {type(y).__name__}; "
                            f"{m.name} needs a module that returns one array (narrow `where`)")
        inserting[0] = True
        try:
            new = made.get(id(module))
            if isinstance(m, LoRAMethod):
                if not args or not hasattr(args[0], "shape"):
                    raise TypeError(f"inject: LoRA at {path!r} needs the module called as "
                                    "module(x, ...) with an array x")
                if new is None:
                    new = layers.LoRA(y.shape[-1], rank=m.rank, alpha=m.alpha, parent=module,
                                      name=LORA)
                out = y + new(args[0]).astype(y.dtype)
            else:
                if new is None:
                    new = layers.Adapter(
                        reduction_factor=m.reduction_factor, projection=m.projection, n=m.n,
                        rank=m.rank, use_shared_rule=m.shared_rule,
                        own_rule_std=m.rule_init_std or layers.OWN_RULE_STD,
                        phm_path=m.phm_path, parent=module, name=ADAPTER)
                rule = ({"phm_rule": shared[inj.group_of(path)]} if m.shared_rule else None)
                out = new(y, rule).astype(y.dtype)
            made[id(module)] = new
            return out
        finally:
            inserting[0] = False

    return interceptor


# ---------------------------------------------------------------------------------------------
def inject(model: nn.Module | nnx.Module, method: Method | str, where: Where, *,
           rngs: nnx.Rngs | None = None, features: int | None = None,
           also_train: str | None = None, rule_groups: Mapping[str, str] | None = None,
           **overrides: Any) -> tuple[Any, Injection]:
    """Adds `method`'s modules to `model` at the modules `where` selects (module docstring).

    Args:
      model: a linen Module (not bound) or an NNX Module (changed in place).
      method: an adapter-family or LoRA method, or a preset name ("compacter++", "lora" ...)
        with field `overrides` (e.g. reduction_factor=16).
      where: path regex (searched in "a/b/0/c") or predicate path -> bool.
      rngs: NNX only: the keys of the new parameters.
      features: NNX adapters only: d_model of matched modules without `out_features`.
      also_train: path regex of backbone parameters to train too (NNX: made AdapterParams).
      rule_groups: group -> path regex: one shared PHM rule per group instead of per model.
    Returns:
      (model, injection): linen: an `InjectedModel` (init/apply as the original);
      NNX: the same model object, changed. `injection` tells trainable from frozen.
    """
    method = get_method(method, **overrides)
    if not isinstance(method, (AdapterMethod, LoRAMethod)):
        raise ValueError(f"inject supports the adapter family and LoRA, not {method.name} "
                         f"({type(method).__name__}); use our T5 (cj.from_pretrained) for it")
    _matcher(where)
    if also_train is not None:
        _matcher(also_train, "also_train")
    if rule_groups is not None:
        if not (isinstance(method, AdapterMethod) and method.shared_rule):
            raise ValueError(f"inject: rule_groups needs a method with a shared PHM rule "
                             f"(compacter, compacter++), not {method.name}")
        for g, rx in rule_groups.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", str(g)):
                raise ValueError(f"inject: rule group name {g!r} must be letters, digits or _")
            _matcher(rx, f"rule_groups[{g!r}]")
        rule_groups = dict(rule_groups)
    inj = Injection(method, where, also_train, rule_groups)
    if isinstance(model, nnx.Module):
        inject_nnx.inject_nnx(model, inj, _matcher(where), rngs, features)
        return model, inj
    if isinstance(model, nn.Module):
        if model.scope is not None:
            raise ValueError("inject: pass an unbound linen module (the class instance, not one "
                             "bound by init/apply/bind)")
        inj = dataclasses.replace(inj, model=None)
        wrapped = InjectedModel(model, inj)
        return wrapped, dataclasses.replace(inj, model=wrapped)
    raise TypeError(f"inject: model must be a flax linen or NNX Module, got {type(model).__name__}")


