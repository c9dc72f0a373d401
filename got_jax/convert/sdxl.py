"""Converts a diffusers SDXL folder (UNet + VAE + scheduler config) into a got-jax folder.

    python -m got_jax.convert.sdxl --sdxl_dir /ckpt/stable-diffusion-xl-base-1.0 --out /ckpt/sdxl-jax

Reads ``unet/`` and ``vae/`` (``diffusion_pytorch_model.safetensors``, or the ``.fp16`` variant, single or
sharded) and ``scheduler/scheduler_config.json``. The output has the layout of
:mod:`got_jax.checkpoint.orbax_io` with the parts ``unet`` and ``vae`` (``--parts`` selects fewer).
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

import jax.numpy as jnp

from got_jax.convert import _common as common
from got_jax.checkpoint import CheckpointError
from got_jax.got.checkpoint import Part, convert_parts


def convert_sdxl(sdxl_dir: str, out: str, *, kinds: Sequence[str] = ("unet", "vae"), param_dtype="float32",
                 progress: bool = True, overwrite: bool = False, parts: Mapping[str, Part] | None = None) -> dict:
    """Converts the ``kinds`` components of ``sdxl_dir`` to ``out``; returns the written config."""
    out = common.check_out(out, overwrite)
    sdxl_dir = common.require_dir(sdxl_dir, "--sdxl_dir")
    bad = [k for k in kinds if k not in ("unet", "vae")]
    if bad or not kinds:
        raise CheckpointError(f"--parts must name unet and/or vae, got {list(kinds)}")
    config: dict = {"source": {}}
    sources = {}
    for kind in kinds:
        cfg, folder = common.sdxl_component(sdxl_dir, kind)
        sources[kind] = common.open_diffusers_weights(folder)
        config[kind] = cfg
        config["source"][kind] = sources[kind].description
    sched = common.scheduler_config(sdxl_dir)
    if sched is not None:
        config["scheduler"] = sched
    return convert_parts(out, config, sources, parts=parts, param_dtype=jnp.dtype(param_dtype), progress=progress,
                         overwrite=overwrite)


def build_parser():
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sdxl_dir", required=True, help="diffusers SDXL folder with unet/, vae/, scheduler/")
    p.add_argument("--parts", default="unet,vae", help="comma-separated components to convert (unet, vae)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def run(a):
        convert_sdxl(a.sdxl_dir, a.out, kinds=[k for k in a.parts.split(",") if k], param_dtype=a.param_dtype,
                     progress=not a.no_progress, overwrite=a.overwrite)
        print(f"wrote {a.out}")

    return common.run_main(run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
