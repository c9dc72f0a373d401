"""diffusers <-> NNX name mapping for the SDXL UNet and AutoencoderKL, and the folder loader.

NNX paths mirror diffusers keys; the differences the tables encode:

* conv ``*.weight`` (O, I, kh, kw) -> ``*.kernel`` (kh, kw, I, O) (CONV2D); linear ``*.weight`` -> ``*.kernel``
  transposed (LINEAR) — this includes SDXL's linear ``proj_in`` / ``proj_out`` and the VAE attention's
  ``to_q/to_k/to_v/to_out.0``;
* feed-forward ``ff.net.0.proj`` -> ``ff.geglu.proj``, ``ff.net.2`` -> ``ff.out``;
* norms keep ``weight`` / ``bias``.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from got_jax import sharding
from got_jax.checkpoint import CONV2D, IDENTITY, LINEAR, CheckpointError, MappingTable, Rule, load_into_abstract
from got_jax.checkpoint import open_tensor_folder
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions
from got_jax.models.sdxl.config import UNetConfig, VAEConfig
from got_jax.models.sdxl.unet import UNet2DConditionModel
from got_jax.models.sdxl.vae import AutoencoderKL


def _conv(p: str) -> list[Rule]:
    return [Rule(f"{p}.weight", f"{p}.kernel", CONV2D), Rule(f"{p}.bias", f"{p}.bias", IDENTITY)]


def _linear(t: str, j: str | None = None, bias: bool = True) -> list[Rule]:
    j = j or t
    return [Rule(f"{t}.weight", f"{j}.kernel", LINEAR)] + ([Rule(f"{t}.bias", f"{j}.bias", IDENTITY)] if bias else [])


def _norm(p: str) -> list[Rule]:
    return [Rule(f"{p}.weight", f"{p}.weight", IDENTITY), Rule(f"{p}.bias", f"{p}.bias", IDENTITY)]


def _resnet(p: str) -> list[Rule]:
    return (_norm(f"{p}.norm1") + _conv(f"{p}.conv1") + _linear(f"{p}.time_emb_proj") + _norm(f"{p}.norm2")
            + _conv(f"{p}.conv2") + _conv(f"{p}.conv_shortcut"))


def _attention(p: str, qkv_bias: bool) -> list[Rule]:
    return (_linear(f"{p}.to_q", bias=qkv_bias) + _linear(f"{p}.to_k", bias=qkv_bias)
            + _linear(f"{p}.to_v", bias=qkv_bias) + _linear(f"{p}.to_out.0"))


def _transformer(p: str) -> list[Rule]:
    b = f"{p}.transformer_blocks.{{k}}"
    rules = _norm(f"{p}.norm") + _linear(f"{p}.proj_in") + _linear(f"{p}.proj_out")
    for n in ("norm1", "norm2", "norm3"):
        rules += _norm(f"{b}.{n}")
    rules += _attention(f"{b}.attn1", False) + _attention(f"{b}.attn2", False)
    rules += _linear(f"{b}.ff.net.0.proj", f"{b}.ff.geglu.proj") + _linear(f"{b}.ff.net.2", f"{b}.ff.out")
    return rules


def unet_table() -> MappingTable:
    """Rules for every SDXL-shaped ``UNet2DConditionModel`` (block indices are placeholders)."""
    rules = _conv("conv_in") + _conv("conv_out") + _norm("conv_norm_out")
    for e in ("time_embedding", "add_embedding"):
        rules += _linear(f"{e}.linear_1") + _linear(f"{e}.linear_2")
    for side in ("down_blocks", "up_blocks"):
        rules += _resnet(f"{side}.{{i}}.resnets.{{j}}") + _transformer(f"{side}.{{i}}.attentions.{{j}}")
    rules += _conv("down_blocks.{i}.downsamplers.0.conv") + _conv("up_blocks.{i}.upsamplers.0.conv")
    rules += _resnet("mid_block.resnets.{j}") + _transformer("mid_block.attentions.{j}")
    return MappingTable(rules)


def vae_table() -> MappingTable:
    """Rules for diffusers ``AutoencoderKL``."""
    rules = _conv("quant_conv") + _conv("post_quant_conv")
    for part, side, rs in (("encoder", "down_blocks", "downsamplers"), ("decoder", "up_blocks", "upsamplers")):
        rules += _conv(f"{part}.conv_in") + _conv(f"{part}.conv_out") + _norm(f"{part}.conv_norm_out")
        rules += _resnet(f"{part}.{side}.{{i}}.resnets.{{j}}") + _conv(f"{part}.{side}.{{i}}.{rs}.0.conv")
        rules += _resnet(f"{part}.mid_block.resnets.{{j}}") + _norm(f"{part}.mid_block.attentions.{{j}}.group_norm")
        rules += _attention(f"{part}.mid_block.attentions.{{j}}", True)
    return MappingTable(rules)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def load_diffusers_checkpoint(folder: str | os.PathLike, kind: str = "unet", *, variant: str | None = None,
                              options: ModelOptions = DEFAULT_OPTIONS, mesh=None,
                              rules: sharding.Rules | None = None, progress: bool = False):
    """Builds a ``UNet2DConditionModel`` (``kind="unet"``) or ``AutoencoderKL`` (``kind="vae"``) abstractly
    and fills it from a diffusers folder (``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``,
    single or sharded), built with ``options``. Tensors are cast to ``options.param_dtype``; with ``mesh`` each one is placed by its logical
    axis names under ``rules`` (required with a mesh). Any missing / extra / mis-shaped tensor raises :class:`CheckpointError`.
    """
    sharding.require_rules("load_diffusers_checkpoint", mesh, rules)
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"not a checkpoint folder: {folder}")
    d = _read_config(folder)
    try:
        if kind == "unet":
            cfg = UNetConfig.from_diffusers(d)
            build = lambda: UNet2DConditionModel(cfg, options=options, rngs=nnx.Rngs(0))  # noqa: E731
            table = unet_table()
        elif kind == "vae":
            cfg = VAEConfig.from_diffusers(d)
            build = lambda: AutoencoderKL(cfg, options=options, rngs=nnx.Rngs(0))  # noqa: E731
            table = vae_table()
        else:
            raise CheckpointError(f"unknown checkpoint kind {kind!r}; use 'unet' or 'vae'")
    except (ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder}/config.json: {e}") from e
    source = open_tensor_folder(folder, stems=("diffusion_pytorch_model",), variant=variant)
    abstract = nnx.eval_shape(build)
    shardings = None
    if mesh is not None:
        def shardings(path, var):
            return sharding.variable_sharding(var, mesh, rules)
    return load_into_abstract(abstract, source, table, param_dtype=options.param_dtype, shardings=shardings,
                              progress=progress, desc=f"SDXL {kind}")
