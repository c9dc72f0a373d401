"""Qwen2.5-VL checkpoint mapping (transformers 4.x and 5.x key layouts) and the folder loader.

Torch key (5.x; 4.x drops ``language_model.`` and writes ``visual.`` for ``model.visual.``) -> NNX path:

* ``model.language_model.embed_tokens.weight`` (V, D) -> ``language_model.embed_tokens.embedding``
* ``...layers.{i}.self_attn.{q,k,v}_proj.weight`` (N*H, D) -> ``...{q,k,v}_proj.kernel`` (D, N, H);
  their biases (N*H,) -> (N, H); ``o_proj.weight`` (D, N*H) -> ``o_proj.kernel`` (N, H, D)
* ``...layers.{i}.mlp.{gate,up,down}_proj.weight`` -> ``.kernel`` (transposed)
* norms ``.weight`` -> ``.weight``; ``lm_head.weight`` (V, D) -> ``lm_head.kernel`` (D, V), ignored when tied
* ``model.visual.*`` -> ``visual.*`` through :data:`VISION_TABLE` (also :func:`load_vision_weights` for the tower alone)
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
from flax import nnx

from got_jax import sharding
from got_jax.checkpoint import IDENTITY, LINEAR, CheckpointError, Hook, MappingTable, Rule, load_into_abstract
from got_jax.checkpoint import open_tensor_folder
from got_jax.models.options import DEFAULT_OPTIONS, ModelOptions
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from got_jax.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer, VisionConfig

# --------------------------------------------------------------------------------------------------
# The vision tower's checkpoint mapping
# --------------------------------------------------------------------------------------------------

# torch Conv3d (O, I, t, p, p) <-> ours (I, t, p, p, O)
CONV3D_MATMUL = Hook("conv3d_matmul", lambda x: x.transpose(1, 2, 3, 4, 0), lambda x: x.transpose(4, 0, 1, 2, 3))
# torch fused qkv Linear (3*D, D) <-> ours (D, 3, D); bias (3*D,) <-> (3, D)
QKV_KERNEL = Hook("qkv_kernel", lambda x: x.T.reshape(x.shape[1], 3, -1), lambda x: x.reshape(x.shape[0], -1).T)
QKV_BIAS = Hook("qkv_bias", lambda x: x.reshape(3, -1), lambda x: x.reshape(-1))

# Torch keys relative to the ``visual`` module (transformers 4.x ``visual.``, 5.x ``model.visual.``).
VISION_TABLE = MappingTable([
    Rule("patch_embed.proj.weight", "patch_embed.proj.kernel", CONV3D_MATMUL),
    Rule("blocks.{i}.norm1.weight", "blocks.{i}.norm1.weight", IDENTITY),
    Rule("blocks.{i}.norm2.weight", "blocks.{i}.norm2.weight", IDENTITY),
    Rule("blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.kernel", QKV_KERNEL),
    Rule("blocks.{i}.attn.qkv.bias", "blocks.{i}.attn.qkv.bias", QKV_BIAS),
    Rule("blocks.{i}.attn.proj.weight", "blocks.{i}.attn.proj.kernel", LINEAR),
    Rule("blocks.{i}.attn.proj.bias", "blocks.{i}.attn.proj.bias", IDENTITY),
    *[Rule(f"blocks.{{i}}.mlp.{n}.weight", f"blocks.{{i}}.mlp.{n}.kernel", LINEAR)
      for n in ("gate_proj", "up_proj", "down_proj")],
    *[Rule(f"blocks.{{i}}.mlp.{n}.bias", f"blocks.{{i}}.mlp.{n}.bias", IDENTITY)
      for n in ("gate_proj", "up_proj", "down_proj")],
    Rule("merger.ln_q.weight", "merger.ln_q.weight", IDENTITY),
    Rule("merger.mlp.0.weight", "merger.mlp_0.kernel", LINEAR),
    Rule("merger.mlp.0.bias", "merger.mlp_0.bias", IDENTITY),
    Rule("merger.mlp.2.weight", "merger.mlp_2.kernel", LINEAR),
    Rule("merger.mlp.2.bias", "merger.mlp_2.bias", IDENTITY),
])


def load_vision_weights(cfg: VisionConfig, source, *, torch_prefix: str = "", options: ModelOptions = DEFAULT_OPTIONS,
                        **load_kwargs) -> Qwen2_5_VisionTransformer:
    """Builds the tower abstractly and fills it from ``source`` (a TensorSource).

    With ``torch_prefix`` (``"visual."`` for transformers 4.x folders, ``"model.visual."`` for 5.x) keys
    outside the prefix are skipped, so a whole Qwen2.5-VL checkpoint can be read for its tower.
    """
    abstract = nnx.eval_shape(lambda: Qwen2_5_VisionTransformer(cfg, options=options, rngs=nnx.Rngs(0)))
    table = VISION_TABLE
    if torch_prefix:
        table = MappingTable(VISION_TABLE.prefixed(torch_prefix, "").rules, ignore=[f"^(?!{re.escape(torch_prefix)})"])
    return load_into_abstract(abstract, source, table, **load_kwargs)


LAYOUTS = {"5.x": ("model.language_model.", "model.visual."), "4.x": ("model.", "visual.")}


def _heads_hooks(head_dim: int) -> tuple[Hook, Hook, Hook]:
    proj = Hook("heads_in", lambda x: x.T.reshape(x.shape[1], -1, head_dim), lambda x: x.reshape(x.shape[0], -1).T)
    bias = Hook("heads_bias", lambda x: x.reshape(-1, head_dim), lambda x: x.reshape(-1))
    out = Hook("heads_out", lambda x: x.T.reshape(-1, head_dim, x.shape[0]), lambda x: x.reshape(-1, x.shape[-1]).T)
    return proj, bias, out


def text_table(cfg: Qwen2_5_VLConfig) -> MappingTable:
    """Rules for the language model, torch keys relative to ``language_model`` (no prefix)."""
    proj, bias, out = _heads_hooks(cfg.text.head_dim)
    rules = [Rule("embed_tokens.weight", "embed_tokens.embedding", IDENTITY),
             Rule("norm.weight", "norm.weight", IDENTITY)]
    for n in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"layers.{{i}}.{n}.weight", f"layers.{{i}}.{n}.weight", IDENTITY))
    for n in ("q_proj", "k_proj", "v_proj"):
        rules.append(Rule(f"layers.{{i}}.self_attn.{n}.weight", f"layers.{{i}}.self_attn.{n}.kernel", proj))
        rules.append(Rule(f"layers.{{i}}.self_attn.{n}.bias", f"layers.{{i}}.self_attn.{n}.bias", bias))
    rules.append(Rule("layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attn.o_proj.kernel", out))
    for n in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"layers.{{i}}.mlp.{n}.weight", f"layers.{{i}}.mlp.{n}.kernel", LINEAR))
    return MappingTable(rules)


def mapping_table(cfg: Qwen2_5_VLConfig, layout: str = "5.x") -> MappingTable:
    """The full table for a ``layout`` ("5.x": ``model.language_model.*``; "4.x": ``model.layers.*``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known {sorted(LAYOUTS)}")
    text_prefix, vision_prefix = LAYOUTS[layout]
    table = text_table(cfg).prefixed(text_prefix, "language_model.")
    if cfg.vision is not None:
        table = table + VISION_TABLE.prefixed(vision_prefix, "visual.")
    if cfg.text.tie_word_embeddings:
        table = table + MappingTable([], ignore=[r"^lm_head\.weight$"])
    else:
        table = table + MappingTable([Rule("lm_head.weight", "lm_head.kernel", LINEAR)])
    return table


def detect_layout(keys) -> str:
    """"5.x" when keys use ``model.language_model.``, "4.x" for ``model.layers.`` / ``model.embed_tokens.``."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return "5.x"
    if any(k.startswith(("model.layers.", "model.embed_tokens.")) for k in keys):
        return "4.x"
    raise CheckpointError(f"not a Qwen2.5-VL checkpoint: no 'model.language_model.*' (5.x) or 'model.layers.*' "
                          f"(4.x) keys among {len(keys)} tensors, e.g. {keys[:5]}")


def load_hf_checkpoint(folder: str | os.PathLike, *, options: ModelOptions = DEFAULT_OPTIONS, mesh=None,
                       rules: sharding.Rules | None = None, cfg: Qwen2_5_VLConfig | None = None,
                       progress: bool = False) -> Qwen2_5_VLForConditionalGeneration:
    """Builds the model abstractly and fills it from a Hugging Face Qwen2.5-VL folder.

    Reads ``config.json`` (4.x or 5.x form; or pass ``cfg``) and ``*.safetensors`` (single or sharded
    with an index; fp32/bf16/fp16, cast to ``options.param_dtype``; ``options`` must have no LoRA: add
    adapters with :func:`got_jax.models.qwen2_5_vl.lora.add_lora`). The embedding row count is taken from
    the checkpoint (GoT checkpoints add tokens beyond ``vocab_size``). With ``mesh`` every tensor is placed
    with the sharding its logical axis names get under ``rules`` (required with a mesh). Any missing, extra or mis-shaped
    tensor raises :class:`CheckpointError` naming the key and both shapes.
    """
    sharding.require_rules("load_hf_checkpoint", mesh, rules)
    folder = os.fspath(folder)
    if options.lora_rank:
        raise ValueError("load_hf_checkpoint loads base weights: pass options without LoRA, then add adapters "
                         "with got_jax.models.qwen2_5_vl.lora.add_lora")
    if not os.path.isdir(folder):
        raise CheckpointError(f"not a checkpoint folder: {folder}")
    if cfg is None:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{folder}: no config.json")
        cfg = Qwen2_5_VLConfig.from_hf_config(folder)
    source = open_tensor_folder(folder)
    layout = detect_layout(source.keys())
    embed_key = LAYOUTS[layout][0] + "embed_tokens.weight"
    if embed_key in source:
        shape = source.shape(embed_key)
        if len(shape) != 2 or shape[1] != cfg.text.hidden_size:
            raise CheckpointError(f"tensor {embed_key!r}: checkpoint shape {shape} != model shape "
                                  f"(vocab, {cfg.text.hidden_size}) (source {source.where(embed_key)})")
        cfg = cfg.with_vocab_size(shape[0])
    abstract = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, options=options, rngs=nnx.Rngs(0)))
    shardings = None
    if mesh is not None:
        def shardings(path, var):
            return sharding.variable_sharding(var, mesh, rules)
    return load_into_abstract(abstract, source, mapping_table(cfg, layout), param_dtype=options.param_dtype,
                              shardings=shardings, progress=progress, desc="Qwen2.5-VL")
