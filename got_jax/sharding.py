"""Logical axis names, mesh construction and the rules that map one onto the other.

This is the one module that decides how sharding works in got-jax:

* Every parameter is created through :func:`param_init` with a tuple of *logical* axis
  names from :data:`LOGICAL_AXES` (MaxText's vocabulary). Variables are created without
  eager sharding, so models build the same way on one CPU and on a pod.
* Activations are annotated with :func:`constrain` (a no-op outside a mesh context).
* Entry points (``train.py``, ``sample.py``, converters) build a mesh with :func:`make_mesh`
  (axes ``data``, ``fsdp``, ``tensor``; GSPMD-style ``AxisType.Auto`` axes) and map logical
  names to mesh axes with rules from the config (``configs/sharding_rules.py``). There are no
  default rules in the library: every function that takes a mesh also needs the rules
  (:func:`require_rules`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The logical axis vocabulary. Parameters and activations use only these names.
LOGICAL_AXES = (
    "activation_batch",   # batch of activations
    "activation_length",  # sequence / spatial length of activations
    "activation_embed",   # hidden size of activations
    "activation_heads",   # attention heads of activations
    "embed",              # model width of a weight (d_model)
    "mlp",                # feed-forward hidden width
    "heads",              # attention heads (q) of a weight
    "kv_heads",           # key/value heads of a weight
    "kv",                 # per-head width
    "vocab",              # vocabulary rows / logits
    "conv_in",            # input channels of a conv kernel
    "conv_out",           # output channels of a conv kernel
    "conv_spatial",       # kernel spatial dims (never sharded)
    "norm",               # norm scales / biases
    "lora_rank",          # the rank dimension of LoRA adapters (replicated unless a rule says otherwise)
)

Rules = Sequence[tuple[str, Any]]

def param_init(initializer: Callable, *names: str | None) -> Callable:
    """Wraps an initializer so the created ``nnx.Param`` carries logical axis ``names``.

    The names must come from :data:`LOGICAL_AXES` (or be ``None``) and there must be one
    per dimension of the parameter. No sharding happens at creation time.
    """
    for n in names:
        if n is not None and n not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis name {n!r}; known: {LOGICAL_AXES}")
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with GSPMD-style Auto axes.

    ``shape`` defaults to all devices on ``fsdp``. A ``-1`` entry takes the remaining devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if shape is None:
        shape = (1, n, 1)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1 entry")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if n % known:
            raise ValueError(f"mesh shape {shape} does not divide {n} devices")
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}")
    dev = np.asarray(devices).reshape(shape)
    return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def require_rules(where: str, mesh, rules) -> None:
    """Raises ValueError when ``mesh`` is given without ``rules`` (``where`` names the caller)."""
    if mesh is not None and rules is None:
        raise ValueError(f"{where}: a mesh was given without sharding rules; pass the rules from the config "
                         "(e.g. configs.sharding_rules.RULES)")


def _rules_dict(rules: Rules) -> dict[str, Any]:
    if rules is None:
        raise ValueError("sharding rules are None; pass the rules from the config (e.g. configs.sharding_rules.RULES)")
    out = {}
    for name, axes in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(f"sharding rule for unknown logical axis {name!r}")
        out[name] = axes
    return out


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical ``names`` under ``rules``.

    A mesh axis is used at most once per spec (later dims that would reuse one stay replicated).
    With ``mesh`` and ``shape`` given, a dim that the mesh axes do not divide stays replicated.
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        if mesh is not None:
            axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
            if shape is not None:
                size = int(np.prod([mesh.shape[a] for a in axes_t])) if axes_t else 1
                if shape[i] % size:
                    axes_t = ()
        if not axes_t:
            spec.append(None)
            continue
        used.update(axes_t)
        spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
    return PartitionSpec(*spec)


def variable_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a variable was created with (None when it has none)."""
    md = var.get_metadata()
    names = md.get("out_sharding") or md.get("sharding_names")
    return tuple(names) if names else None


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
    names = variable_names(var)
    shape = getattr(var.get_value() if hasattr(var, "get_value") else var.value, "shape", ())
    if names is None:
        return NamedSharding(mesh, PartitionSpec())
    if len(names) != len(shape):
        raise ValueError(f"variable of shape {tuple(shape)} has {len(names)} logical names {names}")
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
    """A pytree of NamedShardings matching ``state`` (an ``nnx.State`` of Variables)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` according to its logical names (in place)."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharded = jax.device_put(values, jax.tree.map(lambda s: s, shardings))
    nnx.update(model, sharded)
    return model


_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[Mesh]:
    """Within this context :func:`constrain` applies sharding constraints on ``mesh``."""
    _rules_dict(rules)
    _ACTIVE.append((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Annotates activation ``x`` with logical axis names; a no-op outside :func:`use_mesh`."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {names} for an array of rank {x.ndim}")
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
