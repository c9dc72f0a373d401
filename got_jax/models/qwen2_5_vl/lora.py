"""LoRA adapters of the reasoner: fresh init on loaded models, merging, and PEFT's adapter format both ways.

The adapters themselves live in :class:`~got_jax.models.qwen2_5_vl.model.DenseGeneral` (``lora_a`` (*in, r),
``lora_b`` (r, *out), ``nnx.LoRAParam``), created when :class:`~got_jax.models.options.ModelOptions` has
``lora_rank > 0``. This module works on whole models:

* :func:`add_lora` - a loaded base model rebuilt with LoRA options and fresh adapters.
* :func:`materialize` - a model restored from a converted folder into an abstract LoRA model has abstract
  adapters (the folder holds none): give them PEFT's fresh init (A uniform, B zero) and the dropout streams
  keys, so the model computes exactly the base model.
* :func:`merge_lora` - a model of the same class without adapters whose kernels are ``W + scale * A @ B``.
* :func:`peft_state_dict` / :func:`save_peft_adapter` - PEFT's ``adapter_model.safetensors`` (keys
  ``base_model.model.<transformers 5.x key>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r)) and
  ``adapter_config.json``; ``peft.PeftModel.from_pretrained`` loads them onto transformers'
  ``Qwen2_5_VLForConditionalGeneration``. The config's ``target_modules`` is a regex naming the language
  model's projections only (a bare ``"down_proj"`` would also match the vision tower's MLP).
* :func:`load_peft_adapter` - the reverse: set our adapters from a PEFT adapter (file, folder or dict).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax import sharding
from got_jax.checkpoint import CheckpointError, Hook, open_safetensors, write_safetensors
from got_jax.checkpoint.mapping import LINEAR, path_str
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl.model import DenseGeneral, lora_a_init

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_modules(model: nnx.Module) -> dict[str, DenseGeneral]:
    """``{"language_model.layers.0.self_attn.q_proj": module}`` for every projection holding an adapter."""
    return {path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, DenseGeneral) and m.has_lora}


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def materialize(model: nnx.Module, key: jax.Array, *, mesh=None, rules=None) -> nnx.Module:
    """Gives every still-abstract adapter (``lora_a`` / ``lora_b``) and RNG stream of ``model`` a value.

    ``lora_a`` gets PEFT's init (U(+-1/sqrt(fan_in)), one key per module folded from ``key``), ``lora_b``
    zeros, RNG keys are folded from ``key`` and counts start at 0. With ``mesh`` the new arrays are placed
    by their logical names under ``rules`` (required with a mesh). Concrete variables are left alone. Returns the filled model.
    """
    sharding.require_rules("materialize", mesh, rules)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for n, (path, var) in enumerate(flat):
        value = var.get_value()
        if not _is_abstract(value):
            continue
        k = jax.random.fold_in(key, n)
        name = str(path[-1])
        if isinstance(var, nnx.LoRAParam) and name == "lora_a":
            new = lora_a_init(len(value.shape) - 1)(k, value.shape, value.dtype)
        elif isinstance(var, nnx.LoRAParam) and name == "lora_b":
            new = jnp.zeros(value.shape, value.dtype)
        elif isinstance(var, nnx.RngKey):
            new = k if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) else jax.random.key_data(k)
        elif isinstance(var, nnx.RngCount):
            new = jnp.zeros(value.shape, value.dtype)
        else:
            raise ValueError(f"materialize: variable {path_str(path)} ({type(var).__name__}) has no value; only "
                             "LoRA adapters and RNG state are created here, the rest must come from a checkpoint")
        if mesh is not None:
            new = jax.device_put(new, sharding.variable_sharding(var, mesh, rules))
        var.set_value(new)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _rebuild(model: nnx.Module, options: ModelOptions) -> nnx.Module:
    """An abstract model of the same class and config as ``model`` built with ``options``."""
    config = model.config if hasattr(model, "config") else model.cfg
    return nnx.eval_shape(lambda: type(model)(config, options=options, rngs=nnx.Rngs(0)))


def add_lora(model: nnx.Module, options: ModelOptions, key: jax.Array, *, mesh=None, rules=None) -> nnx.Module:
    """``model`` (reasoner or GoT, e.g. from a checkpoint loader) rebuilt with ``options`` (LoRA), sharing its
    parameters, with fresh adapters (:func:`materialize`): same outputs as ``model`` until trained."""
    sharding.require_rules("add_lora", mesh, rules)
    graphdef, state = nnx.split(_rebuild(model, options))
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return materialize(nnx.merge(graphdef, state), key, mesh=mesh, rules=rules)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A model of ``model``'s class (the reasoner or :class:`~got_jax.got.model.GoT`) built without adapters,
    with every adapted kernel replaced by ``kernel + scale * A @ B`` (computed in float32) and every other
    parameter shared. Its outputs equal the adapted model's (dropout off)."""
    mods = lora_modules(model)
    graphdef, state = nnx.split(_rebuild(model, model.options.without_lora()))
    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    for path, m in mods.items():
        node = base
        for part in path.split("."):
            node = node[int(part) if part.isdigit() and int(part) in node else part]
        node["kernel"] = m.merged_kernel()
    nnx.replace_by_pure_dict(state, base)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------
# PEFT format
# --------------------------------------------------------------------------------------------------


def peft_target_regex(targets) -> str:
    """PEFT ``target_modules`` regex for the decoder projections ``targets`` of the language model only."""
    attn = [t for t in targets if t in _ATTN]
    mlp = [t for t in targets if t not in _ATTN]
    alts = ([rf"self_attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
    return rf".*language_model\.layers\.\d+\.({'|'.join(alts)})"


def peft_adapter_config(options: ModelOptions, base_model_name_or_path: str | None = None) -> dict:
    """PEFT ``adapter_config.json`` contents for adapters built with ``options``."""
    if not options.lora_rank:
        raise ValueError("peft_adapter_config: options have no LoRA (lora_rank = 0)")
    return {"peft_type": "LORA", "task_type": None, "r": options.lora_rank, "lora_alpha": options.lora_alpha,
            "lora_dropout": options.lora_dropout, "use_rslora": options.use_rslora, "bias": "none",
            "target_modules": peft_target_regex(options.lora_targets), "modules_to_save": None,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
            "base_model_name_or_path": base_model_name_or_path,
            "auto_mapping": {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                             "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"}}


def _hooks(proj: str, head_dim: int) -> tuple[Hook, Hook]:
    """(A hook, B hook) between our (*in, r) / (r, *out) arrays and torch's (r, in) / (out, r) weights."""
    if proj in ("q_proj", "k_proj", "v_proj"):  # B (r, N, H) <-> (N*H, r)
        return LINEAR, Hook("lora_b_heads", lambda x: x.T.reshape(x.shape[1], -1, head_dim),
                            lambda x: x.reshape(x.shape[0], -1).T)
    if proj == "o_proj":  # A (N, H, r) <-> (r, N*H)
        return Hook("lora_a_heads", lambda x: x.T.reshape(-1, head_dim, x.shape[0]),
                    lambda x: x.reshape(-1, x.shape[-1]).T), LINEAR
    return LINEAR, LINEAR


def _torch_module_name(path: str, layout: str) -> str:
    """Our ``language_model.layers.{i}.self_attn.q_proj`` -> transformers' key of that module."""
    if not path.startswith("language_model."):
        raise ValueError(f"adapter outside the language model: {path}")
    rest = path[len("language_model."):]
    return ("model.language_model." if layout == "5.x" else "model.") + rest


def peft_state_dict(reasoner: nnx.Module, *, layout: str = "5.x", dtype=np.float32) -> dict[str, np.ndarray]:
    """``{base_model.model.<module>.lora_A.weight: (r, in), ....lora_B.weight: (out, r)}`` for every adapter."""
    head_dim = reasoner.cfg.text.head_dim
    out = {}
    for path, m in lora_modules(reasoner).items():
        key = PEFT_PREFIX + _torch_module_name(path, layout)
        ha, hb = _hooks(path.rsplit(".", 1)[-1], head_dim)
        out[key + ".lora_A.weight"] = np.ascontiguousarray(ha.to_torch(np.asarray(m.lora_a[...], np.float32)), dtype)
        out[key + ".lora_B.weight"] = np.ascontiguousarray(hb.to_torch(np.asarray(m.lora_b[...], np.float32)), dtype)
    if not out:
        raise ValueError("peft_state_dict: the model has no LoRA adapters (built with lora_rank = 0?)")
    return out


def save_peft_adapter(reasoner: nnx.Module, folder: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      dtype=np.float32) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    sd = peft_state_dict(reasoner, dtype=dtype)
    write_safetensors(os.path.join(folder, ADAPTER_WEIGHTS), sd, {"format": "pt"})
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_adapter_config(reasoner.options, base_model_name_or_path), f, indent=2)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.language_model\.|model\.)(?P<rest>layers\.\d+\.\w+\.\w+)"
                       r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


def load_peft_adapter(reasoner: nnx.Module, adapter: str | os.PathLike | Mapping[str, Any]) -> nnx.Module:
    """Sets ``reasoner``'s adapters from a PEFT adapter (folder, safetensors file or ``{key: array}``).

    Every adapter of the model must be present with matching shapes, and every adapter key used; otherwise
    :class:`CheckpointError` names the key. The rank / alpha of the model's options are not checked against
    an adapter config (pass a model built with the adapter's options). Returns ``reasoner``.
    """
    if isinstance(adapter, Mapping):
        tensors = {k: np.asarray(v) for k, v in adapter.items()}
        where = "adapter dict"
    else:
        path = os.fspath(adapter)
        if os.path.isdir(path):
            path = os.path.join(path, ADAPTER_WEIGHTS)
        src = open_safetensors(path)
        tensors = {k: src.get(k) for k in src.keys()}
        where = path
    mods = lora_modules(reasoner)
    head_dim = reasoner.cfg.text.head_dim
    seen, problems = set(), []
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            problems.append(f"not a language-model LoRA key: {key!r}")
            continue
        path = "language_model." + m["rest"]
        if path not in mods:
            problems.append(f"{key!r}: the model has no adapter at {path!r}")
            continue
        ha, hb = _hooks(path.rsplit(".", 1)[-1], head_dim)
        var = mods[path].lora_a if m["ab"] == "A" else mods[path].lora_b
        arr = (ha if m["ab"] == "A" else hb).to_jax(np.asarray(value, np.float32))
        if arr.shape != var.shape:
            problems.append(f"{key!r}: shape {tuple(np.shape(value))} (as {arr.shape}) != model {var.shape} at "
                            f"{path}.lora_{m['ab'].lower()}")
            continue
        var.set_value(jnp.asarray(arr, var.get_value().dtype))
        seen.add((path, m["ab"]))
    missing = [f"{p}.lora_{ab.lower()}" for p in mods for ab in "AB" if (p, ab) not in seen]
    problems += [f"no tensor for adapter {p}" for p in missing]
    if problems:
        raise CheckpointError(f"{where}: adapter does not match the model ({len(problems)} problems)\n  "
                              + "\n  ".join(problems[:20]))
    return reasoner
