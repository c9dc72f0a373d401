"""What differs between the models ``train.py`` trains: one small :class:`Task` per model, one run loop.

:func:`got_jax.train.run.train_and_evaluate` is model-agnostic; a task supplies the five things that differ:

* ``initial_model(mesh, rules)`` plus the ``trainable`` / ``frozen`` filters;
* ``make_step(optim_cfg, mesh, rules)`` -> ``(TrainStep, state)`` (its loss and random draws);
* ``prepare(batch, grad_accum)`` -> the step's stacked microbatches (host, numpy);
* ``eval_metrics(model, prepared, key)`` -> the evaluation metrics of one held-out batch (jit-able);
* ``summaries(model, step, writer, batch)`` -> image summaries.

:class:`GoTTask` (stages ``tiny``/``demo``/``got``/``pretrain``/...) is GoT's recipe (:mod:`got_jax.train.losses`),
with the ablation switches of ``config.ablation`` (``no_layout``: layout latents zeroed in every training
example; ``no_chain``: the chain cut out of every row by :func:`got_jax.train.batch.drop_chain`); with
``config.loss.cache_latents`` the frozen-VAE encodes are done once per example on the host
(:mod:`got_jax.train.latent_cache`).
:class:`VAETask` (``config.stage="vae"``) trains GoT's AutoencoderKL alone (:mod:`got_jax.train.vae`). Both read
the same Grain batches, so data, checkpoints, resume, metrics and evals are the run loop's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

from got_jax.got.pipeline import GUIDANCE_SCALES
from got_jax.train import losses
from got_jax.train import vae as V
from got_jax.train.step import OptimConfig, TrainState, TrainStep, draws_for, make_tx, prepare_batch
from got_jax.train.trainable import frozen_filter, trainable_filter

log = logging.getLogger(__name__)

GoTMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"), lm_loss=clu_metrics.Average.from_output("lm_loss"),
    diffusion_loss=clu_metrics.Average.from_output("diffusion_loss"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"))

VAEMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"), rec_loss=clu_metrics.Average.from_output("rec_loss"),
    kl=clu_metrics.Average.from_output("kl"), grad_norm=clu_metrics.Average.from_output("grad_norm"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"))


def eval_mode(model) -> None:
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Dropout):
            m.deterministic = True


def ablation(config) -> dict[str, bool]:
    a = config.get("ablation") or {}
    return {"no_layout": bool(a.get("no_layout", False)), "no_chain": bool(a.get("no_chain", False))}


def loss_config(config) -> losses.LossConfig:
    lc = config.loss
    return losses.LossConfig(lm_weight=float(lc.lm_weight), diffusion_weight=float(lc.diffusion_weight),
                             noise_offset=float(lc.noise_offset), cond_dropout_prob=float(lc.cond_dropout_prob),
                             vocab_chunk=lc.vocab_chunk or None, vae_encode_passes=int(lc.get("vae_encode_passes", 0) or 0))


class GoTTask:
    """GoT's recipe: one reasoner forward -> LM loss + diffusion loss (see :mod:`got_jax.train.losses`)."""

    name = "got"
    metrics = GoTMetrics

    def __init__(self, config, got_cfg: dict, tokenizer, options):
        from got_jax.got.model import GoTConfig  # noqa: PLC0415

        self.config, self.got_cfg, self.tok, self.options = config, got_cfg, tokenizer, options
        self.reasoner_cfg = GoTConfig.from_dict(got_cfg).reasoner
        self.trainable, self.frozen = trainable_filter(options), frozen_filter(options)
        self.ablation = ablation(config)
        self.loss_cfg = loss_config(config)
        self.cache = None  # loss.cache_latents: a LatentCache, made with the step

    def initial_model(self, mesh, rules):
        from got_jax.train import setup  # noqa: PLC0415

        model = setup.initial_model(self.config, self.got_cfg, self.options, mesh, rules)
        if self.config.model.get("vae_from"):
            V.load_vae_into(model, self.config.model.vae_from, self.got_cfg["vae"])
        return model

    def draws(self, key, prepared, model, schedule, cfg):
        d = draws_for(key, prepared, model, schedule, cfg)
        if self.ablation["no_layout"]:  # every example trains with zero layout latents (sampling: zero_layout)
            d = d.replace(drop_layout=jax.numpy.ones_like(d.drop_layout))
        return d

    def make_step(self, model, optim_cfg: OptimConfig, mesh, rules):
        from got_jax.diffusion.schedulers import TrainSchedule  # noqa: PLC0415

        lc = self.config.loss
        if lc.get("cache_latents"):  # before the state is donated: the cache keeps its own copy of the VAE
            from got_jax.train.latent_cache import LatentCache  # noqa: PLC0415

            self.cache = LatentCache(model, max_bytes=int(float(lc.get("cache_latents_max_gib", 4.0)) * 2**30),
                                     encode_passes=int(lc.get("vae_encode_passes", 0) or 0))
        return TrainStep.create(TrainState(model, make_tx(optim_cfg), self.trainable),
                                schedule=TrainSchedule.from_config(self.got_cfg["scheduler"]), loss_cfg=self.loss_cfg,
                                optim_cfg=optim_cfg, mesh=mesh, rules=rules, draws_fn=self.draws)

    def prepare(self, batch, grad_accum: int):
        if self.ablation["no_chain"]:
            from got_jax.train.batch import drop_chain  # noqa: PLC0415

            batch = drop_chain(batch)
        if self.cache is not None:
            batch = self.cache.attach(batch)
        return prepare_batch(batch, self.reasoner_cfg, grad_accum)

    def eval_metrics(self, step_fn: TrainStep, model, prepared, key):
        cfg = dataclasses.replace(self.loss_cfg, cond_dropout_prob=0.0)
        first = jax.tree.map(lambda x: x[0], prepared)
        d = jax.tree.map(lambda x: x[0], self.draws(key, prepared, model, step_fn.schedule, cfg))
        _, m = losses.got_loss(model, first["inputs"], first["images"], d, step_fn.schedule, cfg)
        return m

    def summaries(self, model, step: int, writer, batch, mesh, rules):
        """Prompt, sampled GoT text, plan overlay and image per ``config.sample.prompts`` (current weights)."""
        from got_jax.train import summaries  # noqa: PLC0415

        c = self.config
        prompts = list(c.sample.prompts)
        if not prompts:
            return None
        kw = dict(height=int(c.sample.size), width=int(c.sample.size), num_inference_steps=int(c.sample.num_inference_steps),
                  max_new_tokens=int(c.sample.max_new_tokens), **sampling_defaults(c))
        return summaries.sample_summaries(model, self.tok, prompts, step=step, writer=writer, mesh=mesh, rules=rules,
                                          sample_kw=kw, scale=int(c.sample.get("scale", 1)))

    def finish(self, workdir: str, model, held_out) -> None:
        pass

    def export_extras(self) -> dict:
        return {"ablation": self.ablation, "sampling_defaults": sampling_defaults(self.config)}


def sampling_defaults(config) -> dict[str, Any]:
    """The :class:`~got_jax.got.pipeline.GoTPipeline` keywords a model trained under ``config`` is sampled with
    (stored in an exported model's config.json: ``sampling_defaults``): the flags of ``config.ablation`` and the
    guidance scales of ``config.sample`` that are set (``sample.guidance_scale`` / ``layout_guidance_scale`` /
    ``image_guidance_scale``; None: the paper's)."""
    a = ablation(config)
    out: dict[str, Any] = {}
    s = config.get("sample") or {}
    for k in GUIDANCE_SCALES:
        if s.get(k) is not None:
            out[k] = float(s[k])
    if a["no_chain"]:
        out["no_chain"] = True
    if a["no_layout"]:
        out["zero_layout"] = True
    return out


class VAETask:
    """The VAE stage: GoT's AutoencoderKL from random init on the target images (and editing sources)."""

    name = "vae"
    metrics = VAEMetrics

    def __init__(self, config, got_cfg: dict, tokenizer, options):
        self.config, self.got_cfg, self.options = config, got_cfg, options
        self.vae_cfg = dict(got_cfg["vae"])
        self.trainable, self.frozen = nnx.Param, nnx.Nothing
        v = config.get("vae") or {}
        self.loss_cfg = V.VAELossConfig(reconstruction=str(v.get("reconstruction", "l1")),
                                        kl_weight=float(v.get("kl_weight", 1e-6)),
                                        foreground_weight=float(v.get("foreground_weight", 0.0)))
        self.num_summary_images = int(v.get("num_summary_images", 4))
        self.layout_canvases = bool(v.get("layout_canvases", False))

    def initial_model(self, mesh, rules):
        return V.random_vae(self.vae_cfg, int(self.config.seed), self.options)

    def make_step(self, model, optim_cfg: OptimConfig, mesh, rules):
        return TrainStep.create(TrainState(model, make_tx(optim_cfg), self.trainable), schedule=None,
                                loss_cfg=self.loss_cfg, optim_cfg=optim_cfg, mesh=mesh, rules=rules,
                                loss_fn=V.train_loss, draws_fn=V.draws_for)

    def prepare(self, batch, grad_accum: int):
        return V.prepare_images(batch, grad_accum, self.layout_canvases)

    def eval_metrics(self, step_fn: TrainStep, model, prepared, key):
        first = jax.tree.map(lambda x: x[0], prepared)
        d = jax.tree.map(lambda x: x[0], V.draws_for(key, prepared, model, None, self.loss_cfg))
        _, m = V.train_loss(model, first["inputs"], first["images"], d, None, self.loss_cfg)
        return m

    def summaries(self, model, step: int, writer, batch, mesh, rules):
        """``vae/<i>``: input | reconstruction (posterior mean decoded) of held-out images."""
        if batch is None:
            return None
        every = np.asarray(batch["images"]["image"][0])  # targets, then sources, then layout canvases
        x = every[np.unique(np.linspace(0, len(every) - 1, self.num_summary_images).astype(int))]
        rec = np.asarray(jax.jit(lambda m, x: m.decode(m.encode(x).mean))(model, x))
        to8 = lambda a: np.clip((a + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)  # noqa: E731
        cards = [np.concatenate([to8(x[i]), to8(rec[i])], axis=1) for i in range(len(x))]
        if writer is not None and jax.process_index() == 0:
            scale = int(self.config.sample.get("scale", 1))
            writer.write_images(step, {f"vae/{i}": np.kron(c, np.ones((scale, scale, 1), np.uint8))[None]
                                       for i, c in enumerate(cards)})
        return cards

    def finish(self, workdir: str, model, held_out) -> None:
        self.write_model_config(workdir, model, held_out())

    def write_model_config(self, workdir: str, model, batches) -> dict:
        """``<workdir>/vae_config.json``: the diffusers VAE config with ``scaling_factor`` = 1 / std of the
        posterior means over ``batches`` (SD's rule: unit-variance diffusion latents), read by ``vae_from``."""
        cfg = dict(self.vae_cfg)
        if batches:
            enc = jax.jit(lambda m, x: m.encode(x).mean)
            means = np.concatenate([np.asarray(enc(model, b["images"]["image"][0])).ravel() for b in batches])
            cfg["scaling_factor"] = float(1.0 / max(float(np.std(means)), 1e-6))
        if jax.process_index() == 0:
            with open(os.path.join(workdir, V.VAE_CONFIG), "w") as f:
                json.dump(cfg, f, indent=1)
        return cfg

    def export_extras(self) -> dict:
        return {}


def make_task(config, got_cfg: dict, tokenizer, options) -> Any:
    """The :class:`Task` of ``config.stage`` (``vae`` -> :class:`VAETask`, anything else GoT)."""
    return (VAETask if config.stage == "vae" else GoTTask)(config, got_cfg, tokenizer, options)
