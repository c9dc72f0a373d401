"""GoT's train step: AdamW (the paper's hyper-parameters) over the trainable filter, one jit, sharded.

* :func:`make_tx`: ``clip_by_global_norm`` then AdamW (b1 0.9, b2 0.98, eps 1e-6, decoupled weight
  decay 0.05 on matrices only: no decay of biases, norms and other vectors) with linear warmup from
  0 and cosine decay (:func:`learning_rate_schedule`).
* :class:`TrainState`: the model and its ``nnx.Optimizer`` (``wrt`` = the trainable filter, so the
  optimizer state holds only trainable parameters; float32 master weights, compute dtype from the
  model's options).
* :func:`prepare_batch` (host): a pipeline batch -> ``grad_accum`` stacked microbatches of reasoner
  inputs (:func:`got_jax.train.batch.reasoner_inputs`) and image fields (or, from
  :class:`got_jax.train.latent_cache.LatentCache`, the latents of those images).
* :class:`TrainStep`: ``jax.jit`` of the pure ``(state, batch, key, draws) -> (state, metrics)``
  with explicit in / out shardings on a ``(data, fsdp, tensor)`` mesh (parameters and optimizer
  state by their logical axis names and the rules; batch over ``data`` x ``fsdp``) and the state
  donated. Gradients are summed over the microbatches with ``lax.scan`` and averaged (the loss of a
  step is the mean of its microbatch losses); one microbatch runs without the loop. Random draws
  come from ``fold_in(key, microbatch)`` unless ``draws`` are given (stacked like the batch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from got_jax import sharding
from got_jax.diffusion.schedulers import TrainSchedule
from got_jax.train import losses
from got_jax.train.batch import reasoner_inputs

IMAGE_KEYS = (*losses.IMAGE_FIELDS, "time_ids")
# a batch whose frozen-VAE encodes were done on the host (got_jax.train.latent_cache)
LATENT_KEYS = (*losses.LATENT_FIELDS, "time_ids")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule (defaults: the paper's pretraining recipe)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 500
    total_steps: int = 60_000
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.05
    clip_norm: float | None = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.total_steps <= self.warmup_steps:
            raise ValueError(f"OptimConfig: total_steps {self.total_steps} must exceed warmup_steps {self.warmup_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"OptimConfig.grad_accum must be >= 1, got {self.grad_accum}")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup 0 -> ``learning_rate`` over ``warmup_steps``, then cosine to ``end_learning_rate``."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps,
                                              cfg.end_learning_rate)


def _is_bias(path) -> bool:
    return any(str(getattr(k, "key", getattr(k, "name", ""))) == "bias" for k in path)


def decay_mask(params):
    """True for the tensors weight decay applies to: matrices (ndim >= 2) that are not biases."""
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(jnp.ndim(x) >= 2 and not _is_bias(p)), params)


def make_tx(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw


class TrainState(nnx.Module):
    """The model and its optimizer over the ``trainable`` filter."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, trainable):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=trainable)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def prepare_batch(batch: Mapping[str, Any], reasoner_cfg, grad_accum: int = 1,
                  num_query_tokens: int = 64) -> dict[str, Any]:
    """A pipeline batch -> ``{"inputs": ReasonerInputs, "images": {...}}`` with a leading microbatch axis
    of size ``grad_accum`` on every array (numpy, host side)."""
    b = int(np.shape(batch["input_ids"])[0])
    if b % grad_accum:
        raise ValueError(f"batch size {b} is not divisible by grad_accum={grad_accum}")
    m = b // grad_accum
    micro = []
    for i in range(grad_accum):
        part = {k: np.asarray(v)[i * m:(i + 1) * m] for k, v in batch.items()}
        keys = LATENT_KEYS if "target_latents" in part else IMAGE_KEYS
        missing = [k for k in keys if k not in part]
        if missing:
            raise KeyError(f"training batch lacks {missing} (keys: {sorted(batch)}); see got_jax/data/pipeline.py")
        micro.append({"inputs": reasoner_inputs(part, reasoner_cfg, num_query_tokens),
                      "images": {k: part[k] for k in keys}})
    return jax.tree.map(lambda *xs: np.stack(xs), *micro)


def draws_for(key: jax.Array, prepared: Mapping[str, Any], model, schedule: TrainSchedule,
              cfg: losses.LossConfig) -> losses.Draws:
    """Draws for every microbatch of ``prepared``: microbatch ``i`` from ``fold_in(key, i)`` (jit-able)."""
    images = prepared["images"]
    if "target_latents" in images:
        shape = tuple(images["target_latents"].shape[1:])
        accum = images["target_latents"].shape[0]
    else:
        accum, b, h, w = images["target_image"].shape[:4]
        f = model.vae_scale
        shape = (b, h // f, w // f, model.latent_channels)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum))
    return jax.vmap(lambda k: losses.draw(k, shape, schedule.num_train_timesteps, cfg))(keys)


def _reseed_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Fresh keys for every RNG stream of the model (LoRA dropout) from ``key``."""
    streams = sorted({v.tag for _, v in nnx.iter_graph(model) if isinstance(v, nnx.RngKey)}
                     if hasattr(nnx, "iter_graph") else set())
    if streams:
        nnx.reseed(model, **{s: jax.random.fold_in(key, i) for i, s in enumerate(streams)})


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


def _batch_spec(path, x) -> PartitionSpec:
    """Microbatch axis replicated; the example axis over (data, fsdp); vision tables replicated."""
    names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
    if "vision_aux" in names:
        return PartitionSpec()
    if "positions" in names:
        return PartitionSpec(None, None, ("data", "fsdp"))
    return PartitionSpec(None, ("data", "fsdp"))


class TrainStep:
    """The compiled GoT train step (see the module docstring).

    ``step(state, prepared, key, draws=None) -> (state, metrics)``: ``state`` is ``nnx.state`` of a
    :class:`TrainState` (donated), ``prepared`` from :func:`prepare_batch`, ``key`` this step's key
    (``fold_in(run_key, step)``). ``metrics``: loss, lm_loss, diffusion_loss (means over microbatches),
    grad_norm (before clipping) and learning_rate (of this update); with ``return_grads`` also
    ``grads`` (the averaged, unclipped gradients of the trainable parameters; for tests). ``loss_fn``
    (default :func:`got_jax.train.losses.got_loss`) has that function's signature; ``draws_fn`` (default
    :func:`draws_for`) makes a step's random draws ``draws_fn(key, prepared, model, schedule, loss_cfg)`` (other
    models than GoT, e.g. the VAE stage of :mod:`got_jax.train.tasks`, bring their own pair).
    """

    def __init__(self, graphdef, state, *, schedule: TrainSchedule, loss_cfg: losses.LossConfig,
                 optim_cfg: OptimConfig, mesh=None, rules=None, donate: bool = True, return_grads: bool = False,
                 loss_fn=losses.got_loss, draws_fn=None):
        self.graphdef = graphdef
        self.loss_fn = loss_fn
        self.draws_fn = draws_fn if draws_fn is not None else draws_for
        self.return_grads = return_grads
        self.schedule = schedule
        self.loss_cfg = loss_cfg
        self.lr = learning_rate_schedule(optim_cfg)
        self.mesh, self.rules = mesh, rules
        if mesh is not None and rules is None:
            raise ValueError("TrainStep: a mesh needs its logical-axis rules (from the config)")
        kw = {"donate_argnums": (0,)} if donate else {}
        if mesh is not None:
            self.state_shardings = sharding.state_shardings(state, mesh, rules)
            self._jit = {}
            self._kw = kw
        else:
            self.state_shardings = None
            self._fn = jax.jit(self._step, **kw)

    @classmethod
    def create(cls, train_state: TrainState, **kw) -> tuple["TrainStep", nnx.State]:
        graphdef, state = nnx.split(train_state)
        return cls(graphdef, state, **kw), state

    def place_state(self, state):
        """``state`` placed with the step's shardings (identity without a mesh)."""
        if self.mesh is None:
            return state
        return jax.device_put(state, self.state_shardings)

    def batch_shardings(self, prepared):
        return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(self.mesh, _batch_spec(p, x)), prepared)

    def __call__(self, state, prepared, key, draws=None):
        if self.mesh is None:
            return self._fn(state, prepared, key, draws)
        sig = (jax.tree.structure(prepared), draws is None)
        if sig not in self._jit:
            rep = NamedSharding(self.mesh, PartitionSpec())
            dsh = None if draws is None else jax.tree_util.tree_map_with_path(
                lambda p, x: NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp"))), draws)
            self._jit[sig] = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_shardings(prepared),
                                                               rep, dsh),
                                     out_shardings=(self.state_shardings, rep), **self._kw)
        with sharding.use_mesh(self.mesh, self.rules):
            return self._jit[sig](state, prepared, key, draws)

    def _step(self, state, prepared, key, draws):
        ts = nnx.merge(self.graphdef, state)
        model, optimizer = ts.model, ts.optimizer
        k_draw, k_drop = jax.random.split(key)
        if draws is None:
            draws = self.draws_fn(k_draw, prepared, model, self.schedule, self.loss_cfg)
        gdef, params, rest = nnx.split(model, optimizer.wrt, ...)

        def micro_loss(p, r, mb, d, i):
            m = nnx.merge(gdef, p, r, copy=True)  # fresh variables: the RNG streams (LoRA dropout) change here
            _reseed_dropout(m, jax.random.fold_in(k_drop, i))
            return self.loss_fn(m, mb["inputs"], mb["images"], d, self.schedule, self.loss_cfg)

        grad_fn = jax.grad(micro_loss, has_aux=True)
        accum = jax.tree.leaves(prepared)[0].shape[0]

        def body(acc, xs):
            mb, d, i = xs
            g, metrics = grad_fn(params, rest, mb, d, i)
            return jax.tree.map(jnp.add, acc, g), metrics

        if accum == 1:  # no loop, no zero-init / add / divide per parameter (~1,300 fewer CPU kernels)
            first = functools.partial(jax.tree.map, lambda x: x[0])
            grads, metrics = grad_fn(params, rest, first(prepared), first(draws), jnp.int32(0))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, metrics = jax.lax.scan(body, zeros, (prepared, draws, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(self.lr(optimizer.step[...]), jnp.float32)
        if self.return_grads:
            metrics["grads"] = grads
        optimizer.update(model, grads)
        return nnx.state(ts), metrics
