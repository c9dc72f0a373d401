"""Converts the released GoT-6B PyTorch checkpoint into one got-jax folder (Orbax params + configs + tokenizer).

    python -m got_jax.convert.got_checkpoint --got_dir /ckpt/GoT-6B --qwen_dir /ckpt/Qwen2.5-VL-3B-Instruct \\
        --sdxl_dir /ckpt/stable-diffusion-xl-base-1.0 --out /ckpt/got-jax

Reads ``pytorch_model.bin`` or ``pytorch_model-0000N-of-0000M.bin`` + index from ``--got_dir`` (memory-mapped,
``weights_only``), splits it into reasoner / projectors / UNet / VAE (see
:mod:`got_jax.checkpoint.got_layout`), merges PEFT LoRA adapters, and takes from ``--qwen_dir`` the Qwen
config and the processor files and from ``--sdxl_dir`` the UNet/VAE configs, the scheduler config
and the VAE weights whenever the GoT folder lacks them. The embedding row count found in the checkpoint
(Qwen's vocabulary plus GoT's added tokens) becomes ``vocab_size``. The tokenizer is GoT's own when
``--got_dir`` ships one, else Qwen2.5-VL's with GoT's 66 tokens added in the released order; every id
must land on an embedding row (:mod:`got_jax.convert.got_tokenizer`). ``--out`` is checked first: an
existing, non-empty folder is an error before any work unless ``--overwrite``. Parts are loaded one tensor at a time
into abstract models; the output (layout in :mod:`got_jax.checkpoint.orbax_io`) is written only when every
part loaded, so a bad input writes nothing to ``--out``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Mapping, Sequence

import jax.numpy as jnp

from got_jax.convert import _common as common
from got_jax.convert.got_tokenizer import stage_got_tokenizer
from got_jax.checkpoint import CheckpointError, open_tensor_folder
from got_jax.checkpoint.got_layout import embedding_rows, projector_config, split_got, with_vocab_size
from got_jax.got.checkpoint import Part, convert_parts
from got_jax.checkpoint.lora import has_lora, read_adapter_config

log = logging.getLogger(__name__)

# The paper's LoRA recipe (r=32, alpha=32): used when LoRA tensors come without an adapter config.
PAPER_LORA_ALPHA = 32.0


def _reasoner_config(got_dir: str, qwen_dir: str | None) -> dict:
    for folder in (qwen_dir, os.path.join(got_dir, "mllm"), got_dir):
        path = os.path.join(folder, "config.json") if folder else None
        if path and os.path.isfile(path):
            cfg = common.read_json(path, "Qwen2.5-VL config")
            if str(cfg.get("model_type", "")).startswith("qwen2_5_vl"):
                return cfg
    raise CheckpointError(f"no Qwen2.5-VL config.json found in --qwen_dir {qwen_dir!r} or {got_dir!r} "
                          f"(pass --qwen_dir with the Qwen2.5-VL-3B-Instruct folder)")


def _component_config(got_dir: str, sdxl_dir: str | None, kind: str) -> dict:
    path = os.path.join(got_dir, kind, "config.json")
    if os.path.isfile(path):
        return common.read_json(path, f"GoT {kind} config")
    if not sdxl_dir:
        raise CheckpointError(f"no {kind} config: {got_dir} has no {kind}/config.json and --sdxl_dir is not given")
    return common.sdxl_component(sdxl_dir, kind)[0]


def _check_projectors(projectors: dict, reasoner: dict, unet: dict, where: str) -> None:
    """Projectors read the reasoner's hidden states; the semantic one feeds the UNet's cross-attention."""
    hidden = (reasoner.get("text_config") or reasoner).get("hidden_size", reasoner.get("hidden_size"))
    for name, prefix in (("projector", "output_projector"), ("pooled_projector", "output_projector_add")):
        if hidden is not None and projectors[name]["in_features"] != int(hidden):
            raise CheckpointError(f"{where}: tensor '{prefix}.projector.weight' has {projectors[name]['in_features']} "
                                  f"input features, the reasoner's hidden size is {hidden}")
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, int) and projectors["projector"]["out_features"] != cross:
        raise CheckpointError(f"{where}: tensor 'output_projector.projector.weight' has "
                              f"{projectors['projector']['out_features']} outputs, the UNet's cross_attention_dim "
                              f"is {cross}")


def convert_got(got_dir: str, qwen_dir: str | None, sdxl_dir: str | None, out: str, *, param_dtype="float32",
                adapter_config: str | None = None, lora_alpha: float | None = None, progress: bool = True,
                overwrite: bool = False, parts: Mapping[str, Part] | None = None) -> dict:
    """Converts a GoT-6B folder; returns the written config. See the module docstring."""
    out = common.check_out(out, overwrite)
    got_dir = common.require_dir(got_dir, "--got_dir")
    for flag, d in (("--qwen_dir", qwen_dir), ("--sdxl_dir", sdxl_dir)):
        if d:
            common.require_dir(d, flag)
    source = open_tensor_folder(got_dir, stems=("pytorch_model", "model"))
    adapter = None
    if adapter_config:
        adapter = read_adapter_config(adapter_config)
    elif os.path.isfile(os.path.join(got_dir, "adapter_config.json")):
        adapter = read_adapter_config(got_dir)
    mllm = source.with_prefix_stripped("mllm.")
    if lora_alpha is None and adapter is None and len(mllm) and has_lora(mllm):
        log.warning("LoRA tensors without an adapter config: using the paper's alpha=%s (scaling alpha/r; "
                    "pass --lora_alpha or --adapter_config to override)", PAPER_LORA_ALPHA)
        lora_alpha = PAPER_LORA_ALPHA
    sources = split_got(source, adapter_config=adapter, lora_alpha=lora_alpha)

    rows = embedding_rows(sources["reasoner"])
    reasoner = with_vocab_size(_reasoner_config(got_dir, qwen_dir), rows)
    unet = dict(_component_config(got_dir, sdxl_dir, "unet"))
    if "conv_in.weight" in sources["unet"]:
        unet["in_channels"] = int(sources["unet"].shape("conv_in.weight")[1])
    vae = _component_config(got_dir, sdxl_dir, "vae")
    origin = {"reasoner": source.description, "projector": source.description,
              "pooled_projector": source.description, "unet": source.description}
    if "vae" in sources:
        origin["vae"] = source.description
    else:
        if not sdxl_dir:
            raise CheckpointError(f"{source.description} has no vae.* tensors; pass --sdxl_dir for the SDXL VAE")
        vae_src = common.open_diffusers_weights(common.sdxl_component(sdxl_dir, "vae")[1])
        sources["vae"] = vae_src
        origin["vae"] = vae_src.description
    scheduler = (common.scheduler_config(os.path.join(got_dir)) if os.path.isdir(os.path.join(got_dir, "scheduler"))
                 else common.scheduler_config(sdxl_dir))
    if scheduler is None:
        raise CheckpointError(f"no scheduler config: neither {got_dir} nor --sdxl_dir {sdxl_dir!r} has "
                              f"scheduler/scheduler_config.json")
    projectors = {"projector": projector_config(sources["projector"]),
                  "pooled_projector": projector_config(sources["pooled_projector"])}
    _check_projectors(projectors, reasoner, unet, source.description)
    config = {"reasoner": reasoner, "unet": unet, "vae": vae, "scheduler": scheduler, "projectors": projectors,
              "source": origin}
    with tempfile.TemporaryDirectory(prefix=".got-tokenizer-") as staged:
        tok = stage_got_tokenizer((os.path.join(got_dir, "tokenizer"), got_dir, qwen_dir), rows, staged,
                                  rows_from=f"mllm.model.embed_tokens.weight in {source.description}")
        return convert_parts(out, config, sources, parts=parts, tokenizer_files=tok,
                             param_dtype=jnp.dtype(param_dtype), progress=progress, overwrite=overwrite)


def build_parser():
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--got_dir", required=True, help="GoT-6B folder with pytorch_model.bin (or shards + index)")
    p.add_argument("--qwen_dir", default=None, help="Qwen2.5-VL-3B-Instruct folder (config, tokenizer, processor)")
    p.add_argument("--sdxl_dir", default=None,
                   help="stable-diffusion-xl-base-1.0 diffusers folder (unet/vae configs, VAE weights, scheduler)")
    p.add_argument("--adapter_config", default=None, help="PEFT adapter_config.json for LoRA scaling alpha/r")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help=f"LoRA alpha when no adapter config is found (default: paper value {PAPER_LORA_ALPHA})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def run(a):
        convert_got(a.got_dir, a.qwen_dir, a.sdxl_dir, a.out, param_dtype=a.param_dtype,
                    adapter_config=a.adapter_config, lora_alpha=a.lora_alpha, progress=not a.no_progress,
                    overwrite=a.overwrite)
        print(f"wrote {a.out}")

    return common.run_main(run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
