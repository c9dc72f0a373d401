"""A tiny GoT in PyTorch and the same weights in JAX, plus real pipeline batches, for the training tests.

The torch parts (tests/train_reference.py) are transformers' Qwen2.5-VL (bundled GoT tokenizer's ids,
patch 14 so the data pipeline's reasoner view fits), optionally wrapped in a ``peft`` LoRA whose B
is drawn non-zero, two ``nn.Linear`` projectors, diffusers' 12-channel UNet and VAE and DDPMScheduler.
:func:`to_jax` copies every tensor into :class:`GoT` through the family mapping tables and returns the
map jax path -> (torch name, hook) that the tests use to compare gradients and updated parameters.
Batches come from the real Grain pipeline over the synthetic shapes data (32 px).
"""

from __future__ import annotations

import io

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from convert_helpers import tiny_unet, tiny_vae
from flax import nnx
from PIL import Image
from train_reference import TorchGoTParts, add_lora, set_trainable
from transformers import Qwen2_5_VLConfig as HFQwenConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen

from got_jax.checkpoint import Hook
from got_jax.checkpoint.got_layout import PROJECTOR_TABLE
from got_jax.checkpoint.mapping import path_str
from got_jax.data import pipeline as P
from got_jax.data import records, shapes
from got_jax.got.model import GoT
from got_jax.got.tokenizer import got_token_ids
from got_jax.models import sdxl
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl import checkpoint as qck
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.models.qwen2_5_vl.lora import materialize

HIDDEN = 32
SIZE = 32  # image side: latents 16 x 16 with the tiny VAE
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
             "timestep_spacing": "leading"}
PIPE = dict(buckets=((SIZE, SIZE),), max_boxes=3, reasoner_size=56, reasoner_max_patches=16)


def hf_reasoner(tok, *, tied: bool, seed: int, text: dict | None = None, vision: dict | None = None) -> HFQwen:
    """A random Qwen2.5-VL over ``tok``'s vocabulary; ``text`` / ``vision`` override the tiny sizes."""
    ids = got_token_ids(tok)
    torch.manual_seed(seed)
    text = dict(dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                     rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, eos_token_id=ids.endoftext,
                     pad_token_id=ids.endoftext), **(text or {}))
    vision = dict(dict(depth=2, hidden_size=16, intermediate_size=12, num_heads=2, out_hidden_size=text["hidden_size"],
                       fullatt_block_indexes=[1], window_size=28, patch_size=14, temporal_patch_size=2,
                       spatial_merge_size=2), **(vision or {}))
    hf = HFQwen(HFQwenConfig(text_config=text, vision_config=vision, image_token_id=ids.image_pad,
                             video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                             vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
                             tie_word_embeddings=tied)).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 1.0 if ("embed_tokens" in name or "lm_head" in name) else 0.2
            p.copy_(scale * torch.randn_like(p) + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return hf


def torch_got(tok, *, tied: bool = False, lora_rank: int = 0, lora_alpha: float = 8.0, seed: int = 0,
              rslora: bool = False, text: dict | None = None, vision: dict | None = None, unet=None,
              vae=None) -> TorchGoTParts:
    """The tiny torch GoT (train mode, float32) with the recipe's trainable set (benchmarks pass bigger parts)."""
    hf = hf_reasoner(tok, tied=tied, seed=seed, text=text, vision=vision)
    hidden = hf.config.text_config.hidden_size
    mllm = add_lora(hf, lora_rank, lora_alpha, use_rslora=rslora, init_b_scale=0.2, seed=seed + 1) if lora_rank else hf
    torch.manual_seed(seed + 2)
    unet = unet if unet is not None else tiny_unet(12, seed=seed + 3)
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    torch.manual_seed(seed + 4)
    parts = TorchGoTParts(mllm=mllm, projector=torch.nn.Linear(hidden, cross),
                          pooled_projector=torch.nn.Linear(hidden, pooled), unet=unet,
                          vae=vae if vae is not None else tiny_vae(seed=seed + 5),
                          scheduler=diffusers.DDPMScheduler.from_config(SCHEDULER))
    for m in (parts.mllm, parts.projector, parts.pooled_projector, parts.unet, parts.vae):
        m.train()
    set_trainable(parts, lora=bool(lora_rank))
    return parts


def got_config(parts: TorchGoTParts) -> dict:
    hf = parts.mllm.get_base_model() if hasattr(parts.mllm, "get_base_model") else parts.mllm
    proj = {n: {"in_features": m.in_features, "out_features": m.out_features}
            for n, m in (("projector", parts.projector), ("pooled_projector", parts.pooled_projector))}
    return {"reasoner": hf.config.to_dict(), "unet": dict(parts.unet.config), "vae": dict(parts.vae.config),
            "scheduler": dict(SCHEDULER), "projectors": proj}


def _lora_hook(kind: str, shape) -> Hook:
    """torch lora_A (r, in_flat) -> ours (*in, r); lora_B (out_flat, r) -> ours (r, *out)."""
    if kind == "a":
        return Hook("lora_a", lambda x: x.T.reshape(*shape), lambda x: x.reshape(-1, x.shape[-1]).T)
    return Hook("lora_b", lambda x: x.T.reshape(*shape), lambda x: x.reshape(x.shape[0], -1).T)


def to_jax(parts: TorchGoTParts, options: ModelOptions) -> tuple[GoT, dict[str, tuple[str, Hook]]]:
    """Our GoT with the torch weights, and {jax path: (torch name as in ``named_trainable``/state, hook)}."""
    cfg = got_config(parts)
    abstract = nnx.eval_shape(lambda: GoT(cfg, options=options, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    targets = {path_str(p): v for p, v in flat}
    rcfg = Qwen2_5_VLConfig.from_hf_config(cfg["reasoner"])
    tables = {"reasoner": qck.mapping_table(rcfg, "5.x"), "projector": PROJECTOR_TABLE,
              "pooled_projector": PROJECTOR_TABLE, "unet": sdxl.unet_table(), "vae": sdxl.vae_table()}
    mods = {"reasoner": parts.mllm, "projector": parts.projector, "pooled_projector": parts.pooled_projector,
            "unet": parts.unet, "vae": parts.vae}
    mapping: dict[str, tuple[str, Hook]] = {}
    values: dict[str, np.ndarray] = {}
    for part, mod in mods.items():
        for name, t in mod.state_dict(keep_vars=False).items():
            key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            key = key.replace(".base_layer.", ".")
            if ".lora_" in key:
                module, ab = key.split(".lora_")
                path = f"{part}.{module.replace('model.language_model.', 'language_model.')}.lora_{ab[0].lower()}"
                hook = _lora_hook(ab[0].lower(), tuple(targets[path].get_value().shape))
            else:
                hit = tables[part].to_jax(key)
                if hit is None:
                    assert tables[part].is_ignored(key), f"no mapping for torch tensor {part}.{name}"
                    continue
                path, hook = f"{part}.{hit[0]}", hit[1]
            assert path in targets, f"{part}.{name} -> {path}: not a parameter of our GoT"
            mapping[path] = (f"{part}.{name}", hook)
            values[path] = np.array(hook.to_jax(t.detach().numpy()), np.float32, copy=True)  # torch updates in place
    for p, var in flat:
        key = path_str(p)
        if key in values:
            var.set_value(jnp.asarray(values[key], var.get_value().dtype))
    missing = [k for k, v in targets.items() if isinstance(v, nnx.Param) and k not in values]
    assert not missing, f"parameters without a torch tensor: {missing[:10]}"
    model = materialize(nnx.merge(graphdef, nnx.from_flat_state(flat)), jax.random.key(0))
    return model, mapping


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def generation_record(index: int, seed: int = 0) -> records.GenerationRecord:
    ex = shapes.generation_example(seed, index, SIZE)
    return records.GenerationRecord(ex["id"], ex["caption"], ex["got"], _png(ex["image"]))


def pipeline_batch(tok, kind: str, batch_size: int = 2, seed: int = 0, max_text_len: int = 256,
                   size: int = SIZE) -> dict:
    """One batch of the real Grain pipeline over synthetic shapes examples (``size`` px images)."""
    recs = []
    for i in range(4 * batch_size):
        if kind == "generation":
            ex = shapes.generation_example(seed, i, size)
            recs.append(records.GenerationRecord(ex["id"], ex["caption"], ex["got"], _png(ex["image"])))
        else:
            ex = shapes.editing_example(seed, i, size)
            recs.append(records.EditingRecord(ex["id"], ex["instruction"], ex["got"], _png(ex["source_image"]),
                                              _png(ex["target_image"])))
    cfg = P.PipelineConfig(kind=kind, batch_size=batch_size, max_text_len=max_text_len, seed=seed,
                           cond_dropout_prob=0.0, **dict(PIPE, buckets=((size, size),)))
    return next(iter(P.make_dataset(P.records_source(recs), cfg, tok)))
