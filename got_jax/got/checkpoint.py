"""Building and filling the parts of a GoT checkpoint with the family models (the GoT side of the layout).

A :class:`Part` knows how to build the abstract module of a part from its section of the converted
``config.json`` and which :class:`~got_jax.checkpoint.MappingTable` maps its torch keys (the family tables live
beside the models: ``got_jax/models/*/checkpoint.py``; the projector table and GoT-6B's prefixes in
:mod:`got_jax.checkpoint.got_layout`). :func:`convert_parts` fills each part from its tensor source one tensor
at a time and writes the converted folder (:mod:`got_jax.checkpoint.orbax_io`); :func:`load_got_checkpoint`
restores one.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from got_jax.checkpoint.errors import CheckpointError
from got_jax.checkpoint.got_layout import PROJECTOR_TABLE, section_of
from got_jax.checkpoint.mapping import MappingTable, load_into_abstract
from got_jax.checkpoint.orbax_io import load_checkpoint as orbax_load_checkpoint
from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder
from got_jax.checkpoint.tensor_io import TensorSource
from got_jax.got.model import PARTS, make_projector
from got_jax.models import sdxl
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl import checkpoint as qwen_checkpoint
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from got_jax.sharding import require_rules

log = logging.getLogger(__name__)


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
        return make_projector(int(section["in_features"]), int(section["out_features"]),
                              options=ModelOptions(param_dtype=param_dtype), rngs=nnx.Rngs(0))

    return Part(name, build, lambda section, source: PROJECTOR_TABLE)


def _reasoner_part() -> Part:
    def build(section, param_dtype):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_hf_config(section),
                                                  options=ModelOptions(param_dtype=param_dtype), rngs=nnx.Rngs(0))

    def table(section, source):
        return qwen_checkpoint.mapping_table(Qwen2_5_VLConfig.from_hf_config(section),
                                             qwen_checkpoint.detect_layout(source.keys()))

    return Part("reasoner", build, table)


def _sdxl_part(kind: str) -> Part:
    def build(section, param_dtype):
        opts = ModelOptions(param_dtype=param_dtype)
        if kind == "unet":
            return sdxl.UNet2DConditionModel(sdxl.UNetConfig.from_diffusers(dict(section)), options=opts,
                                             rngs=nnx.Rngs(0))
        return sdxl.AutoencoderKL(sdxl.VAEConfig.from_diffusers(dict(section)), options=opts, rngs=nnx.Rngs(0))

    def table(section, source):
        return sdxl.unet_table() if kind == "unet" else sdxl.vae_table()

    return Part(kind, build, table)


def default_parts() -> dict[str, Part]:
    return {"reasoner": _reasoner_part(), "projector": _projector_part("projector"),
            "pooled_projector": _projector_part("pooled_projector"), "unet": _sdxl_part("unet"),
            "vae": _sdxl_part("vae")}


def part_builders() -> dict[str, Callable[[Mapping[str, Any]], nnx.Module]]:
    """Builders of abstract modules from a converted folder's whole config (for restoring)."""
    return {name: (lambda cfg, p=p: p.abstract(section_of(cfg, p.name), jnp.dtype(cfg.get("param_dtype") or
                                                                                   "float32")))
            for name, p in default_parts().items()}


def load_checkpoint(folder: str, *, parts: Mapping[str, Callable] | None = None, **kwargs) -> tuple[dict, dict]:
    """:func:`got_jax.checkpoint.orbax_io.load_checkpoint` with GoT's :func:`part_builders` unless ``parts``."""
    return orbax_load_checkpoint(folder, parts=parts if parts is not None else part_builders(), **kwargs)


def load_got_checkpoint(folder: str, mesh=None, rules=None, *, dtype=None,
                        only: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """Restores a converted GoT (or part) folder with the family model classes.

    Returns ``(params, config)``: ``params`` is the pure tree ``{"reasoner": ..., "projector": ...,
    "pooled_projector": ..., "unet": ..., "vae": ...}`` (the parts stored, or ``only``), each array
    placed by its logical axis names under ``rules`` on ``mesh`` (one device when None) and cast to
    ``dtype`` if given; ``config`` is the folder's ``config.json``. Load it into a model with
    ``state = nnx.state(model); nnx.replace_by_pure_dict(state, params); nnx.update(model, state)``.
    """
    require_rules("load_got_checkpoint", mesh, rules)
    return orbax_load_checkpoint(folder, parts=part_builders(), mesh=mesh, rules=rules, dtype=dtype, only=only)


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
