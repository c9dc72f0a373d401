"""The converted got-jax checkpoint: one Orbax checkpoint of pure parameter dicts plus configs.

Layout of a converted GoT folder (written by ``convert/got_checkpoint.py``; the part converters
``convert/qwen2_5_vl.py`` and ``convert/sdxl.py`` write the same layout with fewer parts)::

    <out>/
      config.json     {"format": "got-jax", "version": 1,
                       "reasoner":  <Qwen2.5-VL HF config dict; vocab_size = embedding rows found>,
                       "unet":      <diffusers UNet2DConditionModel config (in_channels 12 for GoT)>,
                       "vae":       <diffusers AutoencoderKL config>,
                       "scheduler": <diffusers scheduler config>,
                       "parts":     ["reasoner", "projector", "pooled_projector", "unet", "vae"],
                       "projectors": {"projector": {"in_features": 2048, "out_features": 2048},
                                      "pooled_projector": {"in_features": 2048, "out_features": 1280}},
                       "param_dtype": "float32", "source": {<part>: <file it came from>}}
      tokenizer/      tokenizer + chat template + preprocessor files (Qwen folder or GoT folder)
      params/         ONE Orbax PyTree checkpoint (OCDBT, uncompressed) of the nested dict
                      {"reasoner": <pure dict of nnx.state(Qwen model)>,
                       "projector": {"kernel": (2048, 2048), "bias": (2048,)},
                       "pooled_projector": {"kernel": (2048, 1280), "bias": (1280,)},
                       "unet": <pure dict of nnx.state(UNet)>, "vae": <pure dict of nnx.state(VAE)>}

Pure dicts are ``nnx.to_pure_dict(nnx.state(module))``: nested dicts keyed by attribute names
(list indices as ints) whose leaves are arrays. A GoT model whose submodules carry the same
attribute names (``reasoner``, ``projector``, ``pooled_projector``, ``unet``, ``vae``; projectors
are ``nnx.Linear``) matches this tree, so ``nnx.replace_by_pure_dict(nnx.state(model), tree)``
followed by ``nnx.update(model, state)`` loads it. :func:`load_checkpoint` restores the tree (sharded onto a
mesh by the logical axis names of abstract modules given by the caller: GoT's part builders are in
:mod:`got_jax.got.checkpoint`, which also has ``load_got_checkpoint``) and returns it with the config.
This module is pure I/O: it builds no model.

Writes are atomic: everything goes to a hidden temp folder beside the target, renamed into place
only when complete; a failure removes the temp folder and leaves the target untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from got_jax import sharding
from got_jax.checkpoint.errors import CheckpointError

FORMAT = "got-jax"
VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def pure_tree(model_or_state) -> dict:
    """The pure nested dict of arrays of a module or ``nnx.State`` (what is stored per part)."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return nnx.to_pure_dict(state)


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp folder beside ``path``; on success it becomes ``path``, on error it is removed.

    ``path`` must not exist (or be an empty folder) unless ``overwrite``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        if not os.path.isdir(path) or os.listdir(path):
            raise CheckpointError(f"output {path} already exists and is not empty (choose a new path)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result gets the usual mode of a new folder
    try:
        yield tmp
        if os.path.isdir(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Bytes Orbax may hold in flight while writing (GiB); small keeps the write from copying the whole model.
SAVE_CONCURRENT_GB = 1


def _save_into(directory: str, tree: Mapping[str, Any]) -> None:
    """Writes ``tree`` as an Orbax checkpoint at ``directory`` (which must not exist), synchronously."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    # No compression: zstd buffers cost ~60% of the model in extra memory and weights barely compress.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB, use_compression=False)
    ckptr = ocp.Checkpointer(handler)
    try:
        ckptr.save(directory, args=ocp.args.PyTreeSave(dict(tree)))
    finally:
        ckptr.close()


def save_params(path: str, tree: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Saves a nested dict of arrays as one Orbax checkpoint at ``path`` (atomically)."""
    _check_leaves(tree)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        _save_into(os.path.join(tmp, "ckpt"), tree)
        # move the checkpoint's contents up so ``path`` itself is the checkpoint directory
        inner = os.path.join(tmp, "ckpt")
        for name in os.listdir(inner):
            os.rename(os.path.join(inner, name), os.path.join(tmp, name))
        os.rmdir(inner)


def _check_leaves(tree) -> None:
    bad = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(tree)
           if not hasattr(v, "shape") or not hasattr(v, "dtype")]
    if bad:
        raise CheckpointError(f"save_params: leaves that are not arrays at {bad[:5]} (store pure dicts of arrays)")


def _as_struct(x, sharding=None):
    if x is _skip():
        return x
    if isinstance(x, nnx.Variable):
        x = x.get_value()
    if sharding is None:
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


def _skip():
    import orbax.checkpoint as ocp  # noqa: PLC0415

    return ocp.PLACEHOLDER


def stored_structure(path: str) -> dict:
    """The stored tree as ``jax.ShapeDtypeStruct`` leaves (no data read)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"no Orbax checkpoint at {path}")
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def restore_params(path: str, abstract_tree: Mapping[str, Any] | None = None, shardings=None, *,
                   dtype=None) -> dict:
    """Restores an Orbax checkpoint written by :func:`save_params`.

    ``abstract_tree``: a pytree of arrays / ``jax.ShapeDtypeStruct`` / ``nnx.Variable`` with the
    stored structure (e.g. ``pure_tree(nnx.eval_shape(...))``); None restores what is stored.
    A leaf equal to ``orbax.checkpoint.PLACEHOLDER`` is skipped (not read).
    ``shardings``: a matching pytree of ``jax.sharding.Sharding`` (e.g. from
    :func:`got_jax.sharding.state_shardings`), so each host reads only its shards. ``dtype`` casts
    every floating leaf on restore (e.g. bf16 for inference).
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.path.abspath(os.fspath(path))
    if abstract_tree is None:
        abstract_tree = stored_structure(path)
    elif not os.path.isdir(path):
        raise CheckpointError(f"no Orbax checkpoint at {path}")
    is_leaf = lambda x: isinstance(x, nnx.Variable) or x is _skip()  # noqa: E731
    if shardings is not None:
        target = jax.tree.map(_as_struct, abstract_tree, shardings, is_leaf=is_leaf)
    else:
        target = jax.tree.map(_as_struct, abstract_tree, is_leaf=is_leaf)
    if dtype is not None:
        target = jax.tree.map(
            lambda s: s if s is _skip() or not np.issubdtype(s.dtype, np.floating)
            else jax.ShapeDtypeStruct(s.shape, dtype, sharding=s.sharding), target, is_leaf=is_leaf)
    ckptr = ocp.PyTreeCheckpointer()
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: stored parameters do not match the requested tree ({e})") from None
    finally:
        ckptr.close()


# ----------------------------------------------------------------------------- the GoT folder


def write_checkpoint_folder(out: str, config: Mapping[str, Any], params: Mapping[str, Any],
                            tokenizer_files: Mapping[str, str] | None = None, *, overwrite: bool = False) -> dict:
    """Writes ``config.json`` + ``tokenizer/`` + ``params/`` to ``out`` atomically; returns the written config.

    ``tokenizer_files`` maps a file name to the path it is copied from.
    """
    _check_leaves(params)
    cfg = {"format": FORMAT, "version": VERSION, **dict(config), "parts": [p for p in params]}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _save_into(os.path.join(tmp, PARAMS_DIR), params)
        if tokenizer_files:
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for name, src in tokenizer_files.items():
                shutil.copy2(src, os.path.join(tmp, TOKENIZER_DIR, name))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=False, default=_json_default)
    return cfg


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in config.json")


def read_config(folder: str) -> dict:
    """The ``config.json`` of a converted folder, checked for format and version."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: not a converted got-jax folder ({type(e).__name__}: {e})") from None
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {cfg.get('version')!r}, this code reads version {VERSION}")
    return cfg


# A part builder returns an abstract module (``nnx.eval_shape``) for the folder's config.
PartBuilder = Callable[[Mapping[str, Any]], nnx.Module]


def load_checkpoint(folder: str, *, parts: Mapping[str, PartBuilder], mesh=None, rules=None,
                    dtype=None, only: tuple[str, ...] | None = None,
                    config: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """Restores a converted folder: returns ``(pure params tree, config dict)``.

    ``parts`` maps part names to builders of abstract modules from the folder's config (GoT's:
    :func:`got_jax.got.checkpoint.part_builders`); with ``mesh`` every array is restored directly into
    its sharding (logical names of the abstract module, ``rules``: required with a mesh), so no host holds the whole model.
    ``only`` restores a subset of parts. ``config``: the folder's config when the caller has read it already.
    """
    sharding.require_rules("load_checkpoint", mesh, rules)
    cfg = dict(config) if config is not None else read_config(folder)
    stored = tuple(cfg.get("parts", ()))
    wanted = tuple(only) if only is not None else stored
    unknown = [p for p in wanted if p not in stored]
    if unknown:
        raise CheckpointError(f"{folder}: parts {unknown} not stored (folder holds {list(stored)})")
    abstract, shards = {}, {}
    for name in stored:
        if name not in wanted:
            continue
        if name not in parts:
            raise CheckpointError(f"{folder}: no builder for part {name!r}")
        state = nnx.state(parts[name](cfg))
        abstract[name] = nnx.to_pure_dict(state)
        if mesh is not None:
            shards[name] = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shards[name] = jax.tree.map(lambda _: dev, abstract[name])
    params_dir = os.path.join(os.fspath(folder), PARAMS_DIR)
    if set(wanted) != set(stored):
        skip = _skip()
        structure = stored_structure(params_dir)
        for name in stored:
            if name not in wanted:
                abstract[name] = jax.tree.map(lambda _: skip, structure[name])
                shards[name] = abstract[name]
    tree = restore_params(params_dir, abstract, shards, dtype=dtype)
    return {k: tree[k] for k in wanted}, cfg
