"""Run checkpoints of ``train.py``: one Orbax ``CheckpointManager`` in ``<workdir>/checkpoints``.

Each step directory holds two items, written together (async) and published atomically by Orbax
(a half-written step stays ``<step>.orbax-checkpoint-tmp-*``: never chosen on resume, removed at the
next start by ``cleanup_tmp_directories``):

* ``state``: the trainable parameters (LoRA adapters, embeddings, LM head, norms, projectors, UNet),
  the optimizer state and its step counter, as a flat dict ``{"model.unet....kernel": array}``. The
  frozen weights (vision tower, LoRA base projections, VAE) are not stored: they come back from
  ``init_from`` (or the seeded random init) at start-up, so a checkpoint is ~the trainable size.
  RNG streams are not stored either: the train step reseeds them from ``fold_in(key, step)``.
* ``data``: the global Grain state (one state per logical data shard, :mod:`got_jax.train.data`) as JSON.

Restores go straight into the current run's shardings (``jax.ShapeDtypeStruct`` targets with concrete
``NamedSharding`` on the current mesh), so a checkpoint written on one device count / mesh shape
restores onto another. Keep policy: the last ``keep`` steps plus every ``keep_every``-th.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from got_jax.checkpoint.mapping import path_str

log = logging.getLogger(__name__)

ITEMS = ("state", "data")

# Orbax's replica-parallel save splits every replicated array among its replicas, and each distinct slice
# is a jitted program of its own: the tiny test run on 8 CPU devices compiled 332 of them (22 s) at its first
# save; got_6b's ~1,000 arrays would do the same on a pod. Arrays under this many bytes per slice are written
# whole by one replica (Orbax's ``min_slice_bytes_for_replica_parallel``); big ones still split.
MIN_SLICE_BYTES = 8 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's standard PyTree handler with :data:`MIN_SLICE_BYTES` set on its ``jax.Array`` handler."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None))
    registry = ocp.type_handlers.create_type_handler_registry(
        *[(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)],
        (jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(workdir: str, *, save_every: int, keep: int, keep_every: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
    policies = [ocp.checkpoint_managers.LatestN(max(1, int(keep)))]
    if keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(int(keep_every)))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_every)), enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()})


def _is_saved(path, var, frozen) -> bool:
    if isinstance(var, (nnx.RngKey, nnx.RngCount)):
        return False
    return not (path[0] == "model" and frozen(path[1:], var))


def saved_flat(state: nnx.State, frozen_filter) -> dict[str, Any]:
    """``{path: Variable}`` of the part of a TrainState's state that checkpoints hold (see module doc)."""
    frozen = nnx.filterlib.to_predicate(frozen_filter)
    return {path_str(p): v for p, v in nnx.to_flat_state(state) if _is_saved(p, v, frozen)}


def values(flat: dict[str, Any]) -> dict[str, jax.Array]:
    return {k: v.get_value() for k, v in flat.items()}


def save(mgr: ocp.CheckpointManager, step: int, state: nnx.State, frozen_filter, data_state: dict,
         *, force: bool = False) -> bool:
    """Offers ``step`` to the manager (it saves on its interval, at preemption, or when ``force``)."""
    if step in mgr.all_steps():
        return False
    return mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(values(saved_flat(state, frozen_filter))),
                                                  data=ocp.args.JsonSave(data_state)), force=force)


def restore(mgr: ocp.CheckpointManager, step: int, state: nnx.State, shardings: nnx.State,
            frozen_filter) -> tuple[nnx.State, dict]:
    """Restores checkpoint ``step`` into ``state`` (in place) with ``shardings``; returns (state, data state)."""
    flat = saved_flat(state, frozen_filter)
    shard_flat = {path_str(p): s for p, s in nnx.to_flat_state(shardings)}
    target = {}
    for k, var in flat.items():
        v = var.get_value()
        sh = shard_flat[k]
        sh = getattr(sh, "get_value", lambda: sh)() if isinstance(sh, nnx.Variable) else sh
        target[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=restore_args),
                                                        data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{mgr.directory}/{step}: the checkpoint does not match this run's trainable state "
                         f"(model / LoRA settings changed?): {e}") from None
    got = out["state"]
    missing = sorted(set(target) - set(got))
    if missing:
        raise ValueError(f"{mgr.directory}/{step}: checkpoint lacks {missing[:5]} ({len(missing)} entries)")
    for k, var in flat.items():
        var.set_value(got[k])
    return state, out["data"]
