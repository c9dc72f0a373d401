"""The parts of a GoT checkpoint: splitting GoT-6B's state dict, and building / converting each part.

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

A :class:`Part` knows how to build the abstract module of a part from its config section of the
converted ``config.json`` and which :class:`MappingTable` maps its torch keys; the family tables live
beside the models (``got_jax/models/*/checkpoint.py``), the projector table is here.
:func:`convert_parts` fills each part from its :class:`TensorSource` one tensor at a time and writes the
converted folder (see :mod:`got_jax.checkpoint.orbax_io`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from got_jax import sharding
from got_jax.checkpoint.errors import CheckpointError
from got_jax.checkpoint.lora import has_lora, merge_lora
from got_jax.checkpoint.mapping import LINEAR, MappingTable, Rule, load_into_abstract
from got_jax.checkpoint.orbax_io import PARTS, pure_tree, write_checkpoint_folder
from got_jax.checkpoint.tensor_io import TensorSource

log = logging.getLogger(__name__)

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


def make_projector(in_features: int, out_features: int, *, options=None, rngs: nnx.Rngs) -> nnx.Linear:
    """The GoT projector: ``nnx.Linear`` with logical names (embed, mlp) on the kernel."""
    from got_jax.models.options import ModelOptions  # noqa: PLC0415

    options = options or ModelOptions()
    return nnx.Linear(in_features, out_features, dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs,
                      kernel_init=sharding.param_init(nnx.initializers.lecun_normal(), "embed", "mlp"),
                      bias_init=sharding.param_init(nnx.initializers.zeros_init(), "mlp"))


@dataclasses.dataclass(frozen=True)
class Part:
    """How to build (abstractly) and fill one part of a converted checkpoint.

    ``build(config_section, param_dtype)`` returns a concrete module (called under ``nnx.eval_shape``);
    ``table(config_section, source)`` returns the mapping table for the torch keys in ``source``.
    """

    name: str
    build: Callable[[Any, Any], nnx.Module]
    table: Callable[[Any, TensorSource], MappingTable]

    def abstract(self, config_section, param_dtype=jnp.float32) -> nnx.Module:
        return nnx.eval_shape(lambda: self.build(config_section, param_dtype))


def _projector_part(name: str) -> Part:
    def build(section, param_dtype):
        from got_jax.models.options import ModelOptions  # noqa: PLC0415

        return make_projector(int(section["in_features"]), int(section["out_features"]),
                              options=ModelOptions(param_dtype=param_dtype), rngs=nnx.Rngs(0))

    return Part(name, build, lambda section, source: PROJECTOR_TABLE)


def _reasoner_part() -> Part:
    def build(section, param_dtype):
        from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig  # noqa: PLC0415
        from got_jax.models.options import ModelOptions  # noqa: PLC0415
        from got_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_hf_config(section),
                                                  options=ModelOptions(param_dtype=param_dtype), rngs=nnx.Rngs(0))

    def table(section, source):
        from got_jax.models.qwen2_5_vl import checkpoint as qck  # noqa: PLC0415
        from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig  # noqa: PLC0415

        return qck.mapping_table(Qwen2_5_VLConfig.from_hf_config(section), qck.detect_layout(source.keys()))

    return Part("reasoner", build, table)


def _sdxl_part(kind: str) -> Part:
    def build(section, param_dtype):
        from got_jax.models import sdxl  # noqa: PLC0415
        from got_jax.models.options import ModelOptions  # noqa: PLC0415

        opts = ModelOptions(param_dtype=param_dtype)
        if kind == "unet":
            return sdxl.UNet2DConditionModel(sdxl.UNetConfig.from_diffusers(dict(section)), options=opts,
                                             rngs=nnx.Rngs(0))
        return sdxl.AutoencoderKL(sdxl.VAEConfig.from_diffusers(dict(section)), options=opts, rngs=nnx.Rngs(0))

    def table(section, source):
        from got_jax.models import sdxl  # noqa: PLC0415

        return sdxl.unet_table() if kind == "unet" else sdxl.vae_table()

    return Part(kind, build, table)


def part_builders() -> dict[str, Callable[[Mapping[str, Any]], nnx.Module]]:
    """Builders of abstract modules from a converted folder's whole config (for restoring)."""
    parts = default_parts()
    return {name: (lambda cfg, p=p: p.abstract(section_of(cfg, p.name), _dtype(cfg.get("param_dtype"))))
            for name, p in parts.items()}


def default_parts() -> dict[str, Part]:
    return {"reasoner": _reasoner_part(), "projector": _projector_part("projector"),
            "pooled_projector": _projector_part("pooled_projector"), "unet": _sdxl_part("unet"),
            "vae": _sdxl_part("vae")}


def _dtype(name):
    return jnp.dtype(name or "float32")


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


# ---------------------------------------------------------------------------------- converting


def load_part(part: Part, section, source: TensorSource, *, param_dtype=jnp.float32, progress: bool = True):
    """Fills the abstract module of ``part`` from ``source`` (one tensor at a time); returns the module."""
    abstract = part.abstract(section, param_dtype)
    return load_into_abstract(abstract, source, part.table(section, source), param_dtype=param_dtype,
                              progress=progress, desc=part.name)


def convert_parts(out: str, config: Mapping[str, Any], sources: Mapping[str, TensorSource], *,
                  parts: Mapping[str, Part] | None = None, tokenizer_files: Mapping[str, str] | None = None,
                  param_dtype=jnp.float32, progress: bool = True, overwrite: bool = False) -> dict:
    """Loads every part in ``sources`` and writes the converted folder ``out`` (atomically).

    ``config`` holds the per-part sections (``reasoner``, ``unet``, ``vae``, ``scheduler``,
    ``projectors``). Parts are loaded smallest-risk first and the whole folder is written only when
    all loaded, so a bad tensor anywhere leaves ``out`` untouched. Returns the written config.
    """
    parts = dict(parts or default_parts())
    order = [p for p in ("projector", "pooled_projector", "vae", "unet", "reasoner") if p in sources]
    order += [p for p in sources if p not in order]
    params: dict[str, Any] = {}
    for name in order:
        if name not in parts:
            raise CheckpointError(f"no converter for part {name!r}")
        log.info("converting %s (%d tensors from %s)", name, len(sources[name]), sources[name].description)
        module = load_part(parts[name], section_of(config, name), sources[name], param_dtype=param_dtype,
                           progress=progress)
        params[name] = pure_tree(module)
        del module
        gc.collect()
    ordered = {p: params[p] for p in PARTS if p in params}
    ordered.update({p: v for p, v in params.items() if p not in ordered})
    cfg = {**dict(config), "param_dtype": jnp.dtype(param_dtype).name}
    return write_checkpoint_folder(out, cfg, ordered, tokenizer_files, overwrite=overwrite)
