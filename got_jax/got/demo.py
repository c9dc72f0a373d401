"""A tiny random-weight GoT for demos and smoke runs (no weights, no torch, no downloads).

:func:`demo_config` is a converted-folder-style config (Qwen2.5-VL reasoner in the transformers
5.x form, diffusers UNet / VAE dicts, SDXL's scheduler) at toy sizes whose special-token ids come
from the bundled tokenizer; :func:`demo_pipeline` builds the model with random weights and returns a
ready :class:`~got_jax.got.pipeline.GoTPipeline`. Its chains and images are noise: it exercises every
stage of sampling (reasoning, guidance, the jitted diffusion loop, decode, layout pictures) until
converted GoT-6B weights are given with ``sample.py --ckpt``.

:func:`load_demo` loads the *trained* demo GoT shipped in ``got_jax/assets/demo`` (``configs/demo_shapes.py``,
exported with ``python -m got_jax.train.export --demo ...``): a pipeline plus the sampling keywords it was
trained for.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax import sharding
from got_jax.got.model import GoT
from got_jax.got.pipeline import GoTPipeline
from got_jax.got.tokenizer import got_token_ids, load_tokenizer
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions
from got_jax.models.qwen2_5_vl.processing import make_image_processor

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
# SDXL base's scheduler/scheduler_config.json, every key (configs/reference/sdxl_scheduler_config.json; a test
# keeps them equal). "clip_sample": false matters: DDPM / DDIM built from a config without it clip the x0
# estimate to [-1, 1] (diffusers' default), and SDXL-style latents (scaled to unit std) reach +-5.
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}
DEMO_PROCESSOR = dict(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=4, merge_size=2, temporal_patch_size=2)


def demo_config(tokenizer=None, hidden: int = 64) -> dict[str, Any]:
    """The converted-folder config of the demo GoT (see the module docstring)."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    ids = got_token_ids(tok)
    reasoner = {
        "model_type": "qwen2_5_vl", "tie_word_embeddings": True, "image_token_id": ids.image_pad,
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"), "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end, "eos_token_id": ids.endoftext,
        "text_config": {"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "type": "mrope",
                                                                  "mrope_section": [2, 3, 3], "rope_theta": 1e4}},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                          "out_hidden_size": hidden, "fullatt_block_indexes": [1], "window_size": 32, "patch_size": 4,
                          "temporal_patch_size": 2, "spatial_merge_size": 2},
    }
    unet = {"in_channels": 12, "out_channels": 4, "block_out_channels": [32, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
            "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4], "cross_attention_dim": hidden,
            "norm_num_groups": 8, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 16}
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 16, 32, 32],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 128, "scaling_factor": 0.13025}
    return {"format": "got-jax", "reasoner": reasoner, "unet": unet, "vae": vae, "scheduler": dict(SDXL_SCHEDULER),
            "projectors": {"projector": {"in_features": hidden, "out_features": hidden},
                           "pooled_projector": {"in_features": hidden, "out_features": 32}}}


def host_random_init(build, seed: int = 0):
    """``build()`` (an NNX module constructor) with host-drawn random weights: biases 0, vectors (norm scales)
    1, other arrays normal with std 1/sqrt(fan-in). Built abstractly and filled from numpy, so no initialiser
    is compiled (an eager ``GoT(..., rngs=...)`` compiles one small program per parameter shape: ~40 s even
    for the demo)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if str(getattr(path[-1], "key", path[-1])) == "bias":
            return jnp.zeros(x.shape, x.dtype)
        if len(x.shape) == 1:
            return jnp.ones(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1]))
        return jnp.asarray(rng.standard_normal(x.shape, np.float32) / np.sqrt(fan_in), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def random_model(config, seed: int = 0, *, options: ModelOptions = DEFAULT_OPTIONS) -> GoT:
    """A GoT with host-drawn random weights (:func:`host_random_init`)."""
    return host_random_init(lambda: GoT(config, options=options, rngs=nnx.Rngs(0)), seed)


def demo_pipeline(seed: int = 0, *, options: ModelOptions = DEFAULT_OPTIONS, mesh=None, rules=None) -> GoTPipeline:
    """A :class:`GoTPipeline` on a tiny GoT with random weights from ``seed``; with ``mesh`` (and its
    ``rules``, from the config) the weights are placed on it."""
    sharding.require_rules("demo_pipeline", mesh, rules)
    tok = load_tokenizer()
    model = random_model(demo_config(tok), seed, options=options)
    if mesh is not None:
        model = sharding.shard_model(model, mesh, rules)
    return GoTPipeline(model, tok, make_image_processor(**DEMO_PROCESSOR), mesh=mesh, rules=rules)


def load_demo(folder: str | None = None, *, mesh=None, rules=None, options: ModelOptions | None = None,
              **pipeline_kw) -> tuple[GoTPipeline, dict[str, Any]]:
    """The shipped demo GoT: ``(pipeline, sample_kwargs)`` with ``pipe(prompt, **sample_kwargs)`` ready to call.

    ``folder`` defaults to ``got_jax/assets/demo`` (installed with the package; no download). ``sample_kwargs``
    holds the size it was trained at (``height`` / ``width``) and the ``sampling_defaults`` of its
    config.json (an ablation model's ``no_chain`` / ``zero_layout``). ``options`` / ``pipeline_kw`` go to
    :meth:`GoTPipeline.from_pretrained` (e.g. ``max_boxes``). Raises FileNotFoundError naming the
    folder and the commands that produce it when the weights are not there.
    """
    from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415

    folder = os.fspath(folder or DEMO_DIR)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"no demo GoT weights in {folder} yet (config.json missing): train them with configs/demo_shapes.py "
            "(its docstring has the commands) and export with `python -m got_jax.train.export --demo ...`, or "
            "sample converted GoT-6B weights with --ckpt")
    sharding.require_rules("load_demo", mesh, rules)
    cfg = read_config(folder)
    pipe = GoTPipeline.from_pretrained(folder, mesh=mesh, rules=rules, options=options, **pipeline_kw)
    size = int(cfg["vae"].get("sample_size") or 64)
    return pipe, {"height": size, "width": size, **dict(cfg.get("sampling_defaults") or {})}
