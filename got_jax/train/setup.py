"""Turning a training ``ConfigDict`` into the pieces of a run, and checking it before anything compiles.

* :func:`resolve` - the config with its ``stage`` preset applied (fields left at ``None`` take the stage's values).
* :func:`validate` - workdir, stage, ``init_from`` folder, mesh, batch sizes and every data source
  checked up front: one clear error naming the field / file, before any JAX program is compiled.
* :func:`got_config` / :func:`model_options` / :func:`initial_model` - the GoT model config (the demo sizes, the
  released GoT-6B sizes from ``configs/reference`` or an ``init_from`` folder), its
  :class:`~got_jax.models.options.ModelOptions`, and the initial weights placed on the mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from got_jax import sharding
from got_jax.models.options import ModelOptions
from got_jax.train import data as D

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "configs", "reference")
MAX_RANDOM_INIT = 1_000_000_000  # parameters; larger models start from init_from


class ConfigError(ValueError):
    """A training config that cannot run (message names the field)."""


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` where the preset ``config.stages[config.stage]`` (nested like the config) fills
    every field left at None (so ``--config.total_steps=...`` still wins over the stage)."""
    c = ml_collections.ConfigDict(config.to_dict())
    stages = c.get("stages") or {}
    if not stages:
        return c
    if c.stage not in stages:
        raise ConfigError(f"--config.stage={c.stage!r}: known stages {sorted(stages)}")

    def fill(node, preset, where):
        for k, v in preset.items():
            if k not in node:
                raise ConfigError(f"stage {c.stage!r} sets unknown field config.{where}{k}")
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                fill(node[k], v, f"{where}{k}.")
            elif node[k] is None:
                node[k] = v

    fill(c, stages[c.stage], "")
    return c


def reference_got_config() -> dict:
    """The released GoT-6B sizes: Qwen2.5-VL-3B + SDXL base (12-channel UNet) from ``configs/reference``."""
    def load(name):
        with open(os.path.join(REFERENCE_DIR, name)) as f:
            return json.load(f)

    return {"reasoner": load("qwen2_5_vl_3b_config.json"),
            "unet": load("sdxl_base_unet_config.json") | {"in_channels": 12},
            "vae": load("sdxl_vae_config.json"), "scheduler": load("sdxl_scheduler_config.json"),
            "projectors": {"projector": {"in_features": 2048, "out_features": 2048},
                           "pooled_projector": {"in_features": 2048, "out_features": 1280}}}


def got_config(config, tokenizer=None) -> dict:
    """GoT config dict: from ``init_from``'s config.json, else ``config.model.source`` (demo | reference)."""
    if config.init_from:
        from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415

        return read_config(config.init_from)
    if config.model.source == "reference":
        return reference_got_config()
    if config.model.source == "demo":
        from got_jax.got.demo import demo_config  # noqa: PLC0415

        cfg = demo_config(tokenizer, hidden=int(config.model.demo_hidden))
        cfg["vae"]["sample_size"] = int(config.data.image_size)
        text = cfg["reasoner"]["text_config"]
        overrides = config.model.get("demo_reasoner")  # text_config keys replacing the demo reasoner's
        if overrides:
            allowed = set(text) - {"hidden_size", "vocab_size", "rope_parameters"}
            unknown = sorted(set(overrides) - allowed)
            if unknown:
                raise ConfigError(f"config.model.demo_reasoner: unknown or fixed reasoner text_config key(s) "
                                  f"{unknown}; known: {sorted(allowed)} (the width is config.model.demo_hidden)")
            text.update(overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides))
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        text["rope_parameters"]["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]
        # the data pipeline's reasoner view uses Qwen2.5-VL's 14-px patches
        cfg["reasoner"]["vision_config"].update(patch_size=14, window_size=28)
        if config.model.get("demo_vae_blocks"):  # fewer VAE levels: a smaller program to compile (tests)
            n = int(config.model.demo_vae_blocks)
            cfg["vae"].update(block_out_channels=cfg["vae"]["block_out_channels"][:n],
                              down_block_types=cfg["vae"]["down_block_types"][:n],
                              up_block_types=cfg["vae"]["up_block_types"][:n])
        overrides = config.model.get("demo_unet")  # diffusers UNet config keys replacing the demo's
        if overrides:
            unknown = sorted(set(overrides) - set(cfg["unet"]))
            if unknown:
                raise ConfigError(f"config.model.demo_unet: unknown UNet config key(s) {unknown}; "
                                  f"known: {sorted(cfg['unet'])}")
            cfg["unet"].update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
        if config.model.get("vae_from") and config.stage != "vae":  # the VAE stage's VAE (and its scaling factor)
            from got_jax.train import vae as V  # noqa: PLC0415

            stored = V.read_vae_config(config.model.vae_from)
            V.check_vae_config(stored, cfg["vae"], config.model.vae_from)
            cfg["vae"]["scaling_factor"] = float(stored["scaling_factor"])
        return cfg
    raise ConfigError(f"config.model.source={config.model.source!r}: use 'demo', 'reference' or set init_from")


def model_options(config) -> ModelOptions:
    m = config.model
    return ModelOptions(dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=m.attention_impl, remat=m.remat,
                        lora_rank=int(m.lora_rank), lora_alpha=float(m.lora_alpha), lora_dropout=float(m.lora_dropout),
                        use_rslora=bool(m.use_rslora))


def mesh_devices(config, devices=None):
    devices = list(devices if devices is not None else jax.devices())
    n = int(config.get("num_devices") or 0)
    if n:
        if n > len(devices):
            raise ConfigError(f"config.num_devices={n} but only {len(devices)} devices are visible")
        devices = devices[:n]
    return devices


def make_mesh(config, devices=None):
    devices = mesh_devices(config, devices)
    try:
        return sharding.make_mesh(tuple(config.mesh_shape) or None, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh_shape={tuple(config.mesh_shape)}: {e}") from None


def rules(config):
    """The config's logical-axis rules (configs/sharding_rules.py's RULES in the shipped configs)."""
    if not config.get("rules"):
        raise ConfigError("config.rules is empty: set it to the logical-axis rules (configs.sharding_rules.RULES)")
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.rules)


def kind_sources(config) -> dict[str, list[D.SourceSpec]]:
    """The stage's data sources grouped by record kind (generation / editing)."""
    from configs import data_mixtures  # noqa: PLC0415

    if config.data.get("shapes_dir") and not config.data.sources:
        text = data_mixtures.shapes_files(config.data.shapes_dir, float(config.data.get("generation_weight", 3.0)),
                                          float(config.data.get("editing_weight", 1.0)))
    else:
        text = config.data.sources or data_mixtures.mixture(config.data.mixture)
    by_kind: dict[str, list[D.SourceSpec]] = {}
    for spec in D.parse_sources(text):
        by_kind.setdefault(data_mixtures.source_kind(spec), []).append(spec)
    return by_kind


def validate(config, workdir: str | None, devices=None) -> dict[str, Any]:
    """Every check that needs no compile; returns the opened data ``{kind: (train, eval)}``."""
    if not workdir:
        raise ConfigError("--workdir is required (checkpoints, TensorBoard events and logs go there)")
    if config.init_from:
        from got_jax.checkpoint.errors import CheckpointError  # noqa: PLC0415
        from got_jax.checkpoint.orbax_io import PARAMS_DIR, read_config  # noqa: PLC0415

        if not os.path.isdir(config.init_from):
            raise ConfigError(f"--config.init_from={config.init_from!r}: no such folder")
        try:
            raw = read_config(config.init_from)
        except CheckpointError as e:
            raise ConfigError(f"--config.init_from: {e} (convert weights with convert/got_checkpoint.py)") from None
        missing = [p for p in ("reasoner", "projector", "pooled_projector", "unet", "vae") if p not in raw.get("parts", ())]
        if missing or not os.path.isdir(os.path.join(config.init_from, PARAMS_DIR)):
            raise ConfigError(f"--config.init_from={config.init_from!r} is not a converted GoT checkpoint (parts "
                              f"missing: {missing or 'none'}, params/ present: "
                              f"{os.path.isdir(os.path.join(config.init_from, PARAMS_DIR))})")
    mesh = make_mesh(config, devices)
    n_dev = mesh.devices.size
    gb = int(config.global_batch_size)
    accum = int(config.optim.grad_accum)
    if gb % accum or (gb // accum) % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(f"global_batch_size={gb} / grad_accum={accum} must split over data x fsdp = "
                          f"{mesh.shape['data'] * mesh.shape['fsdp']} devices of the {n_dev}-device mesh")
    for name in ("total_steps", "optim.learning_rate", "optim.warmup_steps"):
        node = config
        for p in name.split("."):
            node = node[p]
        if node is None:
            raise ConfigError(f"config.{name} is not set (and stage {config.stage!r} does not set it)")
    try:
        by_kind = kind_sources(config)
        opened = {kind: D.split_sources(specs, config.data.data_dir, kind, int(config.eval_examples))
                  for kind, specs in by_kind.items()}
    except (D.DataConfigError, KeyError) as e:
        raise ConfigError(str(e).strip('"')) from None
    return opened


def _random_model(got_cfg: dict, options: ModelOptions, seed: int):
    from got_jax.got.demo import random_model  # noqa: PLC0415
    from got_jax.models.qwen2_5_vl.lora import add_lora  # noqa: PLC0415

    model = random_model(got_cfg, seed, options=options.without_lora())
    if options.lora_rank:
        model = add_lora(model, options, jax.random.key(seed + 1))
    return model


def initial_model(config, got_cfg: dict, options: ModelOptions, mesh, rules_):
    """The starting GoT: ``init_from`` restored into its shardings, else host-drawn random weights (small models)."""
    if config.init_from:
        from got_jax.got.model import GoT  # noqa: PLC0415

        return GoT.from_checkpoint(config.init_from, mesh=mesh, rules=rules_, options=options,
                                   lora_seed=int(config.seed))
    from flax import nnx  # noqa: PLC0415

    from got_jax.got.model import GoT  # noqa: PLC0415

    abstract = nnx.eval_shape(lambda: GoT(got_cfg, options=options, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    if n > MAX_RANDOM_INIT:
        raise ConfigError(f"a {n:,}-parameter GoT from random weights is not the recipe: set --config.init_from to a "
                          "converted checkpoint (convert/got_checkpoint.py)")
    return _random_model(got_cfg, options, int(config.seed))


def place(state, shardings):
    """Host / single-device values -> global arrays with ``shardings`` (works on every process of a pod)."""
    from flax import nnx  # noqa: PLC0415

    def put(var, s):
        x = var.get_value() if isinstance(var, nnx.Variable) else var
        if (isinstance(x, jax.Array) and not x.is_fully_addressable) or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            y = jax.device_put(x, s)
        else:
            host = np.asarray(jax.device_get(x))
            y = jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
        return var.replace(y) if isinstance(var, nnx.Variable) else y

    return jax.tree.map(put, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def pipeline_config(config, kind: str):
    """The Grain pipeline settings of ``kind`` (configs/data_got.py) with the run's ``config.data`` overrides."""
    from configs import data_got  # noqa: PLC0415

    d = config.data
    over = {"seed": int(config.seed), "worker_count": int(d.worker_count)}
    for field in ("max_boxes", "reasoner_size", "reasoner_max_patches", "worker_buffer_size"):
        if d.get(field) is not None:
            over[field] = d[field]
    if d.get("buckets"):
        over["buckets"] = tuple(tuple(int(x) for x in b) for b in d.buckets)
    length = d.get("max_text_len_edit" if kind == "editing" else "max_text_len")
    if length:
        over["max_text_len"] = int(length)
    make = data_got.editing_config if kind == "editing" else data_got.generation_config
    return make(**over)
