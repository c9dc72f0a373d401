"""Merging PEFT LoRA adapters into base weights, lazily, over a :class:`TensorSource`.

PEFT stores a LoRA-wrapped Linear ``X`` as ``X.base_layer.weight`` (+ ``X.base_layer.bias``),
``X.lora_A.<adapter>.weight`` (r, in) and ``X.lora_B.<adapter>.weight`` (out, r); adapters saved
on their own drop the adapter name (``X.lora_A.weight``) and keep the base weight as
``X.weight``. Fully trained modules (``modules_to_save``) appear as
``X.modules_to_save.<adapter>.weight`` beside ``X.original_module.weight``. The PEFT wrapper adds
``base_model.model.`` in front of the wrapped model's keys.

:func:`merge_lora` returns a new :class:`TensorSource` with plain keys (``X.weight``) in which a
LoRA-wrapped weight is ``W + scaling * B @ A`` (float32), computed only when that tensor is read,
so merging never holds more than one layer's tensors. ``scaling`` is ``alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA), from the adapter config or given.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from got_jax.checkpoint.errors import CheckpointError
from got_jax.checkpoint.tensor_io import TensorSource

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$")
_LORA_OTHER = re.compile(r"\.(lora_embedding_[AB]|lora_magnitude_vector)\b")
_SAVE = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[\w-]+)\.(?P<rest>.+)$")
_ORIGINAL = re.compile(r"^(?P<module>.+)\.original_module\.(?P<rest>.+)$")
_BASE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<rest>.+)$")
PEFT_PREFIX = "base_model.model."


def has_lora(source: TensorSource) -> bool:
    """True when ``source`` holds any PEFT adapter keys."""
    return any(_LORA.match(k) or _SAVE.match(k) or _BASE.match(k) or _LORA_OTHER.search(k) for k in source.keys())


def read_adapter_config(path: str) -> dict:
    """Reads a PEFT ``adapter_config.json`` (a file or a folder holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable adapter config {path} ({type(e).__name__}: {e})") from None


def _pattern_value(pattern: Mapping[str, Any], module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lora_scaling(module: str, rank: int, adapter_config: Mapping[str, Any] | None = None,
                 alpha: float | None = None) -> float:
    """``alpha / r`` for ``module`` (``alpha / sqrt(r)`` with ``use_rslora``).

    ``alpha`` given explicitly wins; otherwise it comes from ``adapter_config`` (``lora_alpha``,
    ``alpha_pattern``). The rank is the one found in the tensors; a config rank that disagrees is
    an error.
    """
    cfg = adapter_config or {}
    if cfg:
        want_r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r"))
        if want_r is not None and int(want_r) != rank:
            raise CheckpointError(f"LoRA for {module!r}: adapter config says r={want_r}, tensors have rank {rank}")
    if alpha is None:
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha"))
    if alpha is None:
        raise CheckpointError(f"LoRA for {module!r}: no alpha (give an adapter config or alpha)")
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def merge_lora(source: TensorSource, *, adapter_config: Mapping[str, Any] | None = None,
               alpha: float | None = None, adapter: str | None = None,
               strip_peft_prefix: bool = True) -> TensorSource:
    """A lazy view of ``source`` with every LoRA adapter merged into its base weight.

    ``adapter`` selects one adapter name when several are stored (default: the only one).
    Raises :class:`CheckpointError` for LoRA tensors without a base weight, an A without a B,
    mismatched ranks/shapes, or several adapters without ``adapter``.
    """
    keys = source.keys()
    other = [k for k in keys if _LORA_OTHER.search(k)]
    if other:
        raise CheckpointError(f"{source.description}: unsupported adapter tensor {other[0]!r} "
                              f"(only Linear LoRA A/B is merged)")
    adapters = {m.group("adapter") for k in keys for m in [_LORA.match(k) or _SAVE.match(k)] if m}
    if adapter is None and len(adapters - {None}) > 1:
        raise CheckpointError(f"{source.description}: several adapters {sorted(adapters - {None})}; choose one")
    if adapter is not None and adapter not in adapters:
        raise CheckpointError(f"{source.description}: adapter {adapter!r} not found (have {sorted(adapters)})")

    def clean(key: str) -> str:
        return key.replace(PEFT_PREFIX, "", 1) if strip_peft_prefix and PEFT_PREFIX in key else key

    loras: dict[str, dict[str, str]] = {}
    plain: dict[str, str] = {}   # output key -> source key
    saved: dict[str, str] = {}   # output key -> source key from modules_to_save (wins over original)
    for k in keys:
        m = _LORA.match(k)
        if m:
            if adapter is not None and m.group("adapter") not in (adapter, None):
                continue
            loras.setdefault(clean(m.group("module")), {})[m.group("ab")] = k
            continue
        m = _SAVE.match(k)
        if m:
            if adapter is None or m.group("adapter") == adapter:
                saved[clean(f"{m.group('module')}.{m.group('rest')}")] = k
            continue
        m = _ORIGINAL.match(k) or _BASE.match(k)
        out = clean(f"{m.group('module')}.{m.group('rest')}") if m else clean(k)
        if out in plain:
            raise CheckpointError(f"{source.description}: {k!r} and {plain[out]!r} both give {out!r}")
        plain[out] = k
    plain.update(saved)

    entries = {}
    for out, k in plain.items():
        entries[out] = source._entry(k)  # noqa: SLF001  (re-use the lazy loader as is)
    for module, ab in sorted(loras.items()):
        weight = f"{module}.weight"
        if "A" not in ab or "B" not in ab:
            have = ab.get("A") or ab.get("B")
            raise CheckpointError(f"{source.description}: LoRA tensor {have!r} has no lora_{'B' if 'A' in ab else 'A'} "
                                  f"partner")
        if weight not in plain:
            raise CheckpointError(f"{source.description}: LoRA tensors {ab['A']!r} / {ab['B']!r} have no base weight "
                                  f"(looked for {module}.base_layer.weight or {weight})")
        a_shape, b_shape, w_shape = source.shape(ab["A"]), source.shape(ab["B"]), source.shape(plain[weight])
        if (len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2 or a_shape[0] != b_shape[1]
                or (b_shape[0], a_shape[1]) != tuple(w_shape)):
            raise CheckpointError(f"{source.description}: LoRA for {module!r}: A {a_shape} / B {b_shape} do not fit "
                                  f"base weight {w_shape} (expect A (r, in), B (out, r), W (out, in))")
        scale = lora_scaling(module, int(a_shape[0]), adapter_config, alpha)
        wkey, akey, bkey = plain[weight], ab["A"], ab["B"]

        def load(wkey=wkey, akey=akey, bkey=bkey, scale=scale):
            w = source.get(wkey).astype(np.float32)
            a = source.get(akey).astype(np.float32)
            b = source.get(bkey).astype(np.float32)
            return w + np.float32(scale) * (b @ a)

        entries[weight] = (tuple(w_shape), np.dtype(np.float32), source.where(wkey), load)
    return TensorSource(entries, f"{source.description} [LoRA merged]")
