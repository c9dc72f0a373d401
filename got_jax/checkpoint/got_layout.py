"""GoT-6B's checkpoint layout as pure data: which torch prefix holds which part, and the splitting of its tensors.

GoT-6B's ``pytorch_model*.bin`` holds every part under one prefix each:

==================================  ==================  =========================================
torch keys                          part                becomes
==================================  ==================  =========================================
``mllm.*``                          ``reasoner``        Qwen2.5-VL keys (4.x layout) without
                                                        ``mllm.``; PEFT LoRA merged, the PEFT
                                                        wrapper prefix ``base_model.model.`` dropped
``output_projector.projector.*``    ``projector``       ``weight`` / ``bias`` of Linear 2048->2048
``output_projector_add.projector.*`` ``pooled_projector`` ``weight`` / ``bias`` of Linear 2048->1280
``unet.*``                          ``unet``            diffusers UNet keys (12-channel conv_in)
``vae.*`` (optional)                ``vae``             diffusers AutoencoderKL keys
==================================  ==================  =========================================

Only tensor sources, names and config dicts here (no model is built): building and filling the parts is
:mod:`got_jax.got.checkpoint`, beside the GoT model.
"""

from __future__ import annotations

from typing import Any, Mapping

from got_jax.checkpoint.errors import CheckpointError
from got_jax.checkpoint.lora import has_lora, merge_lora
from got_jax.checkpoint.mapping import LINEAR, MappingTable, Rule
from got_jax.checkpoint.tensor_io import TensorSource

# torch prefix in GoT-6B's state dict -> part name
GOT_PREFIXES = {
    "mllm.": "reasoner",
    "output_projector.projector.": "projector",
    "output_projector_add.projector.": "pooled_projector",
    "unet.": "unet",
    "vae.": "vae",
}
PART_PREFIX = {v: k for k, v in GOT_PREFIXES.items()}

PROJECTOR_TABLE = MappingTable([Rule("weight", "kernel", LINEAR), Rule("bias", "bias")])


def section_of(config: Mapping[str, Any], part: str):
    """The config section a part is built from (projectors store their sizes under ``projectors``)."""
    if part in ("projector", "pooled_projector"):
        return config["projectors"][part]
    if part not in config:
        raise CheckpointError(f"config has no {part!r} section (keys: {sorted(config)})")
    return config[part]


# ----------------------------------------------------------------------------------- splitting


def split_got(source: TensorSource, *, adapter_config: Mapping[str, Any] | None = None,
              lora_alpha: float | None = None) -> dict[str, TensorSource]:
    """Splits GoT-6B's tensors into per-part sources (keys relative to the part; see module doc).

    LoRA adapters in the reasoner are merged lazily (``alpha / r`` from ``adapter_config`` or
    ``lora_alpha``). Keys under no known prefix raise :class:`CheckpointError`.
    """
    parts = {}
    for prefix, name in GOT_PREFIXES.items():
        sub = source.with_prefix_stripped(prefix)
        if len(sub):
            parts[name] = sub
    for need in ("reasoner", "projector", "pooled_projector", "unet"):
        if need not in parts:
            raise CheckpointError(f"{source.description}: no {PART_PREFIX[need]}* tensors: not a GoT checkpoint "
                                  f"(holds {len(source)} tensors, e.g. {source.keys()[:3]})")
    stray = [k for k in source.keys() if not any(k.startswith(p) for p in GOT_PREFIXES)]
    if stray:
        raise CheckpointError(f"{source.description}: unexpected tensor {stray[0]!r} {source.shape(stray[0])} "
                              f"(not under {sorted(GOT_PREFIXES)}; {len(stray)} such tensors)")
    for name, sub in list(parts.items()):
        if has_lora(sub):
            if name != "reasoner":
                raise CheckpointError(f"{source.description}: LoRA tensors under {PART_PREFIX[name]}* are not supported")
            parts[name] = merge_lora(sub, adapter_config=adapter_config, alpha=lora_alpha)
    return parts


def embedding_rows(source: TensorSource) -> int:
    """Rows of the Qwen token embedding found in a reasoner source (either key layout)."""
    for key in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"):
        if key in source:
            return int(source.shape(key)[0])
    raise CheckpointError(f"{source.description}: no token embedding (model.embed_tokens.weight or "
                          f"model.language_model.embed_tokens.weight)")


def with_vocab_size(hf_config: Mapping[str, Any], rows: int) -> dict:
    """A copy of a Qwen HF config dict with ``vocab_size`` = ``rows`` (top level and ``text_config``)."""
    cfg = dict(hf_config)
    cfg["vocab_size"] = int(rows)
    if isinstance(cfg.get("text_config"), Mapping):
        cfg["text_config"] = {**cfg["text_config"], "vocab_size": int(rows)}
    return cfg


def projector_config(source: TensorSource) -> dict:
    """``{"in_features", "out_features"}`` of a projector source (torch Linear weight (out, in))."""
    if "weight" not in source:
        raise CheckpointError(f"{source.description}: projector has no 'weight' tensor")
    out_f, in_f = source.shape("weight")
    return {"in_features": int(in_f), "out_features": int(out_f)}
