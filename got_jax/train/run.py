"""The GoT training run behind ``train.py``: config -> mesh -> data -> sharded state -> resume -> loop.

:func:`train_and_evaluate` reads top to bottom (big_vision's order):

1. **Check** (:func:`got_jax.train.setup.validate`): workdir, stage, ``init_from``, mesh and batch sizes, and
   every data source opened - errors name the field or file before anything compiles.
2. **Mesh** ``(data, fsdp, tensor)`` with GSPMD Auto axes and the config's logical-axis rules.
3. **Data**: per record kind one :class:`~got_jax.train.data.ShardedLoader` (Grain, per-process logical
   shards); mixtures of kinds pick the kind of step ``s`` from ``(seed, s)``.
4. **State** (what differs per model is a task of :mod:`got_jax.train.tasks`: ``config.stage=vae`` trains the
   VAE alone, every other stage GoT): the GoT (``init_from`` restored into its shardings, or seeded random weights for small
   models), ``TrainState`` (AdamW over the trainable filter), the jitted :class:`TrainStep` (state donated),
   everything placed by its logical axis names.
5. **Resume** from the newest complete step in ``<workdir>/checkpoints`` (trainable weights, optimizer, data
   state), restored straight into this run's shardings (any device count / mesh shape).
6. **Loop**: step ``s`` uses ``fold_in(key(seed), s)``; every step is offered to the ``CheckpointManager``
   (it saves every ``save_every`` steps and on preemption); on SIGTERM (one process: :class:`SigtermFlag`;
   several: Orbax's ``reached_preemption`` sync point) the step is saved and the run stops cleanly. Metrics
   (clu) every ``log_every`` steps to TensorBoard, the log and
   ``<workdir>/metrics.jsonl``; eval loss on the held-out records every ``eval_every`` steps and at the end;
   sample images every ``sample_every`` steps and at the end. A non-finite loss stops the run naming the steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from clu import periodic_actions
from flax import nnx

from got_jax import sharding
from got_jax.train import checkpointing as ckpt
from got_jax.train import data as D
from got_jax.train import setup
from got_jax.train import summaries
from got_jax.train import tasks
from got_jax.train.step import OptimConfig, TrainStep
from got_jax.train.tasks import loss_config  # noqa: F401  (re-exported: benchmarks/train_scale.py)

log = logging.getLogger(__name__)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for pods and explicit multi-process runs; a single process is left alone
    (it catches SIGTERM itself: :class:`SigtermFlag`). Initialising it there would change the programs' numbers:
    with the distributed client, XLA:CPU reduces across the local devices with other collectives, and at LLVM
    -O0 a train step's gradients then differ in their last bits from the same program in a plain process."""
    if coordinator or (num_processes and num_processes > 1):
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif any(os.environ.get(k) for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                         "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID")):
        jax.distributed.initialize()


class SigtermFlag:
    """SIGTERM sets a flag that the loop reads after each step (single-process runs). Several processes agree on
    the step to save through JAX's preemption sync point instead (``CheckpointManager.reached_preemption``, which
    needs ``jax.distributed``). Installed only from the main thread; the previous handler comes back on exit."""

    def __init__(self):
        self.raised, self._installed, self._old = False, False, None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)  # None: a handler not set from Python
            self._installed = True
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._old is None else self._old)


def optim_config(config) -> OptimConfig:
    o = config.optim
    return OptimConfig(learning_rate=float(o.learning_rate), warmup_steps=int(o.warmup_steps),
                       total_steps=int(o.get("decay_steps") or config.total_steps), end_learning_rate=float(o.end_learning_rate),
                       b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), weight_decay=float(o.weight_decay),
                       clip_norm=o.clip_norm, grad_accum=int(o.grad_accum))


def kind_for_step(kinds: list[str], weights: np.ndarray, seed: int, step: int) -> str:
    if len(kinds) == 1:
        return kinds[0]
    return kinds[int(np.random.default_rng([seed, step]).choice(len(kinds), p=weights))]


class Evaluator:
    """Mean metrics over ``num_batches`` held-out batches (same batches every time; no condition dropout)."""

    def __init__(self, task, step_fn: TrainStep, source, pipeline_cfg, tokenizer, config):
        self.task, self.step_fn, self.source, self.pcfg, self.tok = task, step_fn, source, pipeline_cfg, tokenizer
        self.config = config
        self._fns: dict[Any, Any] = {}
        self.first_batch = None  # the first prepared held-out batch (the VAE stage's image summaries)

    def _loss(self, state, prepared, key):
        model = nnx.merge(self.step_fn.graphdef, state).model
        tasks.eval_mode(model)
        return self.task.eval_metrics(self.step_fn, model, prepared, key)

    def batches(self):
        c = self.config
        loader = D.ShardedLoader(self.source, self.pcfg, self.tok, num_shards=jax.process_count(),
                                 global_batch=int(c.global_batch_size), process_index=jax.process_index(),
                                 process_count=jax.process_count())
        for _ in range(int(c.eval_batches)):
            yield self.task.prepare(next(loader), 1)

    def __call__(self, state) -> dict[str, float]:
        c = self.config
        totals: dict[str, float] = {}
        n = int(c.eval_batches)
        for i, prepared in enumerate(self.batches()):
            if i == 0:
                self.first_batch = prepared
            shard = self.step_fn.batch_shardings(prepared) if self.step_fn.mesh is not None else None
            if shard is not None:
                prepared = D.global_batch_arrays(prepared, shard)
            sig = jax.tree.structure(prepared)
            if sig not in self._fns:
                kw = {}
                if self.step_fn.mesh is not None:
                    rep = jax.sharding.NamedSharding(self.step_fn.mesh, jax.sharding.PartitionSpec())
                    kw = dict(in_shardings=(self.step_fn.state_shardings, shard, rep), out_shardings=rep)
                self._fns[sig] = jax.jit(self._loss, **kw)
            ctx = (sharding.use_mesh(self.step_fn.mesh, self.step_fn.rules) if self.step_fn.mesh is not None
                   else _null())
            with ctx:
                m = self._fns[sig](state, prepared, jax.random.fold_in(jax.random.key(int(c.seed) + 7), i))
            for k, v in jax.device_get(m).items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        return totals


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _write_jsonl(workdir: str, record: dict) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def train_and_evaluate(config, workdir: str, *, devices=None) -> dict[str, Any]:
    """Runs (or resumes) the training described by ``config`` in ``workdir``; returns a summary dict."""
    # ---------------------------------------------------------------------------- checks (no compile)
    config = setup.resolve(config)
    opened = setup.validate(config, workdir, devices)
    os.makedirs(workdir, exist_ok=True)
    if config.get("compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    # ---------------------------------------------------------------------------- mesh, tokenizer, model config
    mesh = setup.make_mesh(config, devices)
    rules = setup.rules(config)
    from got_jax.got.tokenizer import load_tokenizer  # noqa: PLC0415

    tok_dir = os.path.join(config.init_from, "tokenizer") if config.init_from else None
    tok = load_tokenizer(tok_dir if tok_dir and os.path.isdir(tok_dir) else None)
    got_cfg = setup.got_config(config, tok)
    options = setup.model_options(config)
    writer = summaries.make_writer(workdir)
    log.info("mesh %s on %d devices (%d processes); stage %s", dict(mesh.shape), mesh.devices.size,
             jax.process_count(), config.stage)

    # ---------------------------------------------------------------------------- data
    pidx, pcount = jax.process_index(), jax.process_count()
    num_shards = int(config.data.num_shards or pcount)
    gb = int(config.global_batch_size)
    kinds = sorted(opened)
    by_kind = setup.kind_sources(config)
    weights = np.asarray([sum(s.weight for s in by_kind[k]) for k in kinds], np.float64)
    weights = weights / weights.sum()
    pcfgs = {k: setup.pipeline_config(config, k) for k in kinds}
    loaders = {k: D.ShardedLoader(opened[k][0], pcfgs[k], tok, num_shards=num_shards, global_batch=gb,
                                  process_index=pidx, process_count=pcount) for k in kinds}

    # ---------------------------------------------------------------------------- state
    task = tasks.make_task(config, got_cfg, tok, options)  # what differs per model: got_jax/train/tasks.py
    model = task.initial_model(mesh, rules)
    frozen = task.frozen
    counts = summaries.log_parameter_overview(model, task.trainable, frozen, writer)
    optim_cfg = optim_config(config)
    step_fn, state = task.make_step(model, optim_cfg, mesh, rules)
    del model
    state = setup.place(state, step_fn.state_shardings)

    # ---------------------------------------------------------------------------- resume
    mgr = ckpt.make_manager(workdir, save_every=int(config.save_every), keep=int(config.keep),
                            keep_every=int(config.keep_every), async_save=bool(config.async_checkpoints))
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(mgr, latest, state, step_fn.state_shardings, frozen)
        for k in kinds:
            if k not in data_state:
                raise ValueError(f"checkpoint step {latest} has no data state for {k!r} records (stored: "
                                 f"{sorted(data_state)}): the data mixture changed")
            loaders[k].set_state(data_state[k])
        start = int(jax.device_get(state["optimizer"]["step"].get_value()))
        if start != latest:
            raise ValueError(f"checkpoint {latest}: optimizer step {start} != checkpoint step")
        log.info("resumed from %s at step %d", mgr.directory, start)
    else:
        log.info("starting from %s", config.init_from or f"random weights (seed {config.seed})")

    def data_state() -> dict:
        return {k: D.gather_state(loaders[k]) for k in kinds}

    # ---------------------------------------------------------------------------- evals
    eval_src = [(k, opened[k][1]) for k in kinds if opened[k][1] is not None]
    evaluator = None
    if eval_src and int(config.eval_batches) > 0:
        k, src = eval_src[0]
        evaluator = Evaluator(task, step_fn, src, pcfgs[k], tok, config)

    def run_eval(step):
        if evaluator is None:
            return None
        m = evaluator(state)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in m.items()})
        _write_jsonl(workdir, {"step": step, **{f"eval_{k}": v for k, v in m.items()}})
        return m

    def run_samples(step):
        model = nnx.merge(step_fn.graphdef, state).model
        tasks.eval_mode(model)
        held_out = evaluator.first_batch if evaluator is not None else None
        if held_out is None and evaluator is not None:
            held_out = next(iter(evaluator.batches()), None)
        return task.summaries(model, step, writer, held_out, mesh, rules)

    # ---------------------------------------------------------------------------- loop
    total = int(config.total_steps)
    key = jax.random.key(int(config.seed))
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=int(config.log_every) or None)
    collected, first_unlogged = None, start + 1
    step, preempted, last_eval = start, False, None
    log_every = max(1, int(config.log_every))
    t0 = time.time()
    prepared = None
    with SigtermFlag() as sigterm:
        while step < total:
            kind = kind_for_step(kinds, weights, int(config.seed), step)
            prepared = task.prepare(next(loaders[kind]), optim_cfg.grad_accum)
            prepared = D.global_batch_arrays(prepared, step_fn.batch_shardings(prepared))
            state, m = step_fn(state, prepared, jax.random.fold_in(key, step))
            step += 1
            one = task.metrics.single_from_model_output(**m)
            collected = one if collected is None else collected.merge(one)
            stop_here = step == int(config.get("stop_at_step") or 0)
            term = sigterm.raised  # single process: SIGTERM seen (several processes: Orbax's sync point below)
            if mgr.should_save(step) or stop_here or term:
                jax.block_until_ready(state)
                ckpt.save(mgr, step, state, frozen, data_state(), force=stop_here or term)
                if step == int(config.get("debug_sigkill_after_save") or 0):  # tests: kill -9 right after a checkpoint
                    mgr.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
            if term or mgr.reached_preemption(step):
                mgr.wait_until_finished()
                log.warning("preemption signal: saved step %d in %s, stopping", step, mgr.directory)
                preempted = True
            report(step)
            if step % log_every == 0 or step == total or preempted:
                vals = {k: float(v) for k, v in jax.device_get(collected.compute()).items()}
                if not np.isfinite(vals["loss"]) or not np.isfinite(vals["grad_norm"]):
                    raise FloatingPointError(f"non-finite loss {vals['loss']} / grad norm {vals['grad_norm']} "
                                             f"in steps {first_unlogged}..{step}")
                writer.write_scalars(step, {f"train/{k}": v for k, v in vals.items()})
                _write_jsonl(workdir, {"step": step, "kind": kind, **vals})
                collected, first_unlogged = None, step + 1
            if preempted:
                break
            if stop_here:
                log.info("config.stop_at_step=%d reached: saved and stopping", step)
                break
            if int(config.eval_every) > 0 and step % int(config.eval_every) == 0:
                last_eval = run_eval(step)
            if int(config.sample_every) > 0 and step % int(config.sample_every) == 0:
                run_samples(step)
    stopped = preempted or step == int(config.get("stop_at_step") or 0)
    if not stopped:
        if step > 0 and step not in mgr.all_steps():
            jax.block_until_ready(state)
            ckpt.save(mgr, step, state, frozen, data_state(), force=True)
        if step > start or latest is None:  # evaluate / sample the final weights unless just done
            if int(config.eval_every) >= 0 and not (int(config.eval_every) > 0 and step % int(config.eval_every) == 0):
                last_eval = run_eval(step)
            if int(config.sample_every) >= 0 and not (int(config.sample_every) > 0
                                                      and step % int(config.sample_every) == 0):
                run_samples(step)
        held_out = (lambda: list(evaluator.batches())) if evaluator is not None else (lambda: [prepared] if prepared is not None else [])
        task.finish(workdir, nnx.merge(step_fn.graphdef, state).model, held_out)
    mgr.wait_until_finished()
    mgr.close()
    writer.flush()
    elapsed = time.time() - t0
    log.info("stopped at step %d (%s) after %.1fs; data: %s", step, "preempted" if preempted else "done", elapsed,
             {k: loaders[k].metrics() for k in kinds})
    if getattr(task, "cache", None) is not None:
        log.info("latent cache: %s", task.cache.stats())
    return {"step": step, "start": start, "preempted": preempted, "eval": last_eval, "params": counts,
            "checkpoints": list(mgr.all_steps()), "graphdef": step_fn.graphdef, "state": state}
