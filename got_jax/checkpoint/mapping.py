"""Declarative checkpoint name mapping, one table per model family, used in both directions.

A :class:`Rule` pairs a PyTorch key template with an NNX parameter path template, e.g.::

    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.kernel", LINEAR)

``{name}`` placeholders match integers and must appear on both sides. A :class:`Hook` converts
the tensor layout (torch -> jax and back). :func:`load_into_abstract` fills an abstract model
(built with ``nnx.eval_shape``) from a :class:`~got_jax.checkpoint.tensor_io.TensorSource`,
strictly: every missing, unexpected or mis-shaped tensor is reported by name with both shapes.
:func:`export_state` walks the same table backwards.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax.checkpoint.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Hook:
    """A layout change between a torch tensor and its JAX parameter (both directions)."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Hook("identity", lambda x: x, lambda x: x)
# torch Linear (out, in) <-> jax (in, out)
LINEAR = Hook("linear", lambda x: x.T, lambda x: x.T)
# torch Conv2d (O, I, kh, kw) <-> jax (kh, kw, I, O)
CONV2D = Hook("conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
# torch Conv3d (O, I, t, kh, kw) <-> jax (t, kh, kw, I, O)
CONV3D = Hook("conv3d", lambda x: x.transpose(2, 3, 4, 1, 0), lambda x: x.transpose(4, 3, 0, 1, 2))


def reshape_hook(name: str, jax_shape: Callable[[tuple[int, ...]], tuple[int, ...]],
                 torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]], base: Hook = IDENTITY) -> Hook:
    """A hook that applies ``base`` and then reshapes (shapes computed from the input shape)."""
    return Hook(name,
                lambda x: base.to_jax(x).reshape(jax_shape(base.to_jax(x).shape)),
                lambda x: base.to_torch(x.reshape(torch_shape(x.shape))))


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> tuple[re.Pattern, tuple[str, ...]]:
    names = tuple(_PLACEHOLDER.findall(template))
    parts = _PLACEHOLDER.split(template)
    regex = ""
    for i, p in enumerate(parts):
        regex += re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)"
    return re.compile(f"^{regex}$"), names


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    jax: str
    hook: Hook = IDENTITY

    def __post_init__(self):
        t, j = set(_PLACEHOLDER.findall(self.torch)), set(_PLACEHOLDER.findall(self.jax))
        if t != j:
            raise ValueError(f"rule {self.torch!r} -> {self.jax!r}: placeholders differ ({sorted(t)} vs {sorted(j)})")


class MappingTable:
    """An ordered list of rules plus regexes of torch keys that are deliberately not loaded."""

    def __init__(self, rules: Sequence[Rule], ignore: Sequence[str] = ()):
        self.rules = tuple(rules)
        self.ignore = tuple(re.compile(p) for p in ignore)
        self._t = [(_compile(r.torch)[0], r) for r in self.rules]
        self._j = [(_compile(r.jax)[0], r) for r in self.rules]

    def __add__(self, other: "MappingTable") -> "MappingTable":
        return MappingTable(self.rules + other.rules, [p.pattern for p in self.ignore + other.ignore])

    def prefixed(self, torch_prefix: str = "", jax_prefix: str = "") -> "MappingTable":
        """The same table with prefixes added to every torch key and / or jax path."""
        return MappingTable([Rule(torch_prefix + r.torch, jax_prefix + r.jax, r.hook) for r in self.rules],
                            [("^" + re.escape(torch_prefix) + p.pattern.lstrip("^")) for p in self.ignore])

    def is_ignored(self, torch_key: str) -> bool:
        return any(p.search(torch_key) for p in self.ignore)

    @staticmethod
    def _match(table, key: str):
        for regex, rule in table:
            m = regex.match(key)
            if m:
                return m.groupdict(), rule
        return None

    def to_jax(self, torch_key: str) -> tuple[str, Hook] | None:
        """The jax path and hook for ``torch_key``; None when no rule matches."""
        hit = self._match(self._t, torch_key)
        if hit is None:
            return None
        groups, rule = hit
        return rule.jax.format(**groups), rule.hook

    def to_torch(self, jax_path: str) -> tuple[str, Hook] | None:
        hit = self._match(self._j, jax_path)
        if hit is None:
            return None
        groups, rule = hit
        return rule.torch.format(**groups), rule.hook


def path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def flat_variables(model_or_state) -> dict[str, nnx.Variable]:
    """``{"a.b.0.kernel": Variable}`` for every variable of a module or state."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def load_into_abstract(abstract_model: nnx.Module, source, table: MappingTable, *, param_dtype=None,
                       shardings: Callable[[str, nnx.Variable], jax.sharding.Sharding | None] | None = None,
                       progress: bool = False, desc: str = "loading") -> nnx.Module:
    """Fills ``abstract_model`` (from ``nnx.eval_shape``) with tensors from ``source``.

    Every variable must be provided and every tensor used (or ignored by the table); all
    problems are collected and raised together as one :class:`CheckpointError`. Tensors are
    cast to the variable's dtype (or ``param_dtype``) and, when ``shardings`` returns a
    sharding for a path, placed with it one tensor at a time.
    """
    graphdef, state = nnx.split(abstract_model)
    targets = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    filled: dict[str, jax.Array] = {}
    problems: list[str] = []
    keys = source.keys()
    it: Iterator = iter(keys)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        it = iter(tqdm(keys, desc=desc, unit="tensor"))
    for key in it:
        hit = table.to_jax(key)
        if hit is None:
            if not table.is_ignored(key):
                problems.append(f"unexpected tensor {key!r} {source.shape(key)} in {source.where(key)}")
            continue
        path, hook = hit
        if path not in targets:
            problems.append(f"tensor {key!r} maps to {path!r}, which the model does not have "
                            f"(source {source.where(key)})")
            continue
        if path in filled:
            problems.append(f"tensor {key!r} maps to {path!r}, which another tensor already filled")
            continue
        var = targets[path]
        want = tuple(var.get_value().shape)
        # shape check before reading data: apply the hook to a zero-strided dummy
        got = tuple(hook.to_jax(np.lib.stride_tricks.as_strided(np.zeros((), np.float32), source.shape(key),
                                                                 (0,) * len(source.shape(key)))).shape)
        if got != want:
            problems.append(f"tensor {key!r}: checkpoint shape {source.shape(key)} (as {got} after {hook.name}) "
                            f"!= model shape {want} at {path!r} (source {source.where(key)})")
            continue
        if problems:
            continue  # keep scanning names and shapes; don't read data for a load that will fail
        dtype = param_dtype or var.get_value().dtype
        arr = np.asarray(hook.to_jax(source.get(key)))
        arr = arr.astype(np.dtype(dtype)) if arr.dtype != np.dtype(dtype) else arr
        sharding = shardings(path, var) if shardings is not None else None
        filled[path] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
    missing = sorted(set(targets) - set(filled))
    if not problems:
        problems += [f"missing tensor for {p!r} (shape {tuple(targets[p].get_value().shape)}; expected checkpoint "
                     f"key {(table.to_torch(p) or ('<no rule>',))[0]!r})" for p in missing]
    if problems:
        head = f"{source.description}: checkpoint does not match the model ({len(problems)} problems)"
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise CheckpointError(head + "\n  " + "\n  ".join(shown))
    flat = nnx.to_flat_state(state)
    for p, v in flat:
        v.set_value(filled[path_str(p)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_state(model_or_state, table: MappingTable, *, dtype=None) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Yields ``(torch_key, thunk)`` for every variable, walking ``table`` backwards.

    Thunks gather one tensor at a time (``thunk.meta`` holds its torch shape and dtype) so
    writers can stream. A variable without a rule raises :class:`CheckpointError`.
    """
    variables = flat_variables(model_or_state)
    unmapped = [p for p in variables if table.to_torch(p) is None]
    if unmapped:
        raise CheckpointError(f"no export rule for {len(unmapped)} parameters, e.g. {unmapped[:5]}")
    for path, var in variables.items():
        key, hook = table.to_torch(path)
        value = var.get_value()
        out_dtype = np.dtype(dtype or value.dtype)
        shape = hook.to_torch(np.lib.stride_tricks.as_strided(np.zeros((), np.float32), value.shape,
                                                              (0,) * value.ndim)).shape

        def thunk(value=value, hook=hook, out_dtype=out_dtype):
            return np.ascontiguousarray(hook.to_torch(np.asarray(jax.device_get(value))).astype(out_dtype))

        thunk.meta = (tuple(shape), out_dtype)
        yield key, thunk
