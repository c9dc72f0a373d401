"""Exports a converted got-jax folder back to PyTorch: Hugging Face / diffusers folders or GoT's ``.bin`` layout.

    python -m got_jax.convert.export_pytorch --ckpt /ckpt/got-jax --out /ckpt/got-export --format hf
    python -m got_jax.convert.export_pytorch --ckpt /ckpt/got-jax --out /ckpt/got-bin --format got_bin

``--format hf`` writes, for the parts present: ``reasoner/`` (config.json + model.safetensors + tokenizer
files; ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` loads it), ``unet/`` and ``vae/``
(config.json + diffusion_pytorch_model.safetensors; ``UNet2DConditionModel`` / ``AutoencoderKL``
``.from_pretrained(out, subfolder=...)``), ``scheduler/scheduler_config.json`` and
``projectors.safetensors`` (GoT's ``output_projector*.projector.{weight,bias}``).
``--format got_bin`` writes GoT-6B's layout: ``pytorch_model.bin`` (or ``pytorch_model-0000N-of-0000M.bin``
+ ``pytorch_model.bin.index.json`` with ``--max_shard_mb``) holding ``mllm.*`` (transformers 4.x names),
``output_projector*.projector.*``, ``unet.*``, ``vae.*``, plus the configs and tokenizer files beside.
Tensors are produced one at a time from the restored parameters (``export_state``), by the same mapping
tables that load them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from got_jax.convert import _common as common
from got_jax.checkpoint import CheckpointError, export_state, write_safetensors
from got_jax.checkpoint.got_layout import PART_PREFIX, PROJECTOR_TABLE, section_of
from got_jax.checkpoint.mapping import MappingTable
from got_jax.checkpoint.orbax_io import TOKENIZER_DIR, atomic_dir, read_config
from got_jax.got.checkpoint import Part, default_parts, load_checkpoint

_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
Tensors = Iterator[tuple[str, Callable[[], np.ndarray]]]


def export_table(part: str, section, layout: str = "5.x") -> MappingTable:
    """The mapping table of ``part`` used backwards (Qwen in the given key ``layout``)."""
    if part in ("projector", "pooled_projector"):
        return PROJECTOR_TABLE
    if part == "reasoner":
        from got_jax.models.qwen2_5_vl import checkpoint as qck  # noqa: PLC0415
        from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig  # noqa: PLC0415

        return qck.mapping_table(Qwen2_5_VLConfig.from_hf_config(section), layout)
    from got_jax.models import sdxl  # noqa: PLC0415

    if part not in ("unet", "vae"):
        raise CheckpointError(f"no export table for part {part!r}")
    return sdxl.unet_table() if part == "unet" else sdxl.vae_table()


def part_tensors(name: str, config: Mapping, pure: Mapping, *, parts: Mapping[str, Part] | None = None,
                 tables: Mapping[str, MappingTable] | None = None, dtype=None, layout: str = "5.x",
                 prefix: str = "", progress: bool = False) -> Tensors:
    """``(torch key, thunk)`` for every parameter of part ``name`` from its restored pure dict."""
    parts = parts or default_parts()
    section = section_of(config, name)
    state = nnx.state(parts[name].abstract(section, np.dtype(config.get("param_dtype", "float32"))))
    nnx.replace_by_pure_dict(state, pure)
    table = (tables or {}).get(name) or export_table(name, section, layout)
    items = export_state(state, table, dtype=dtype)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        items = tqdm(items, desc=f"export {name}", unit="tensor", total=len(jax.tree.leaves(pure)))
    for key, thunk in items:
        yield prefix + key, thunk


def _torch(arr: np.ndarray):
    import torch  # noqa: PLC0415

    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def write_bin(folder: str, tensors: Tensors, max_shard_bytes: int | None = None) -> None:
    """Writes GoT's ``pytorch_model.bin`` (one file, or shards + index when ``max_shard_bytes`` is set)."""
    import torch  # noqa: PLC0415

    shards: list[list[str]] = [[]]
    sizes = [0]
    tmp_names = []

    def flush(sd, i):
        name = f".shard-{i}.bin"
        torch.save(sd, os.path.join(folder, name))
        tmp_names.append(name)

    sd: dict = {}
    for key, thunk in tensors:
        shape, dt = thunk.meta
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if max_shard_bytes and sd and sizes[-1] + nbytes > max_shard_bytes:
            flush(sd, len(shards) - 1)
            sd = {}
            shards.append([])
            sizes.append(0)
        sd[key] = _torch(thunk())
        shards[-1].append(key)
        sizes[-1] += nbytes
    flush(sd, len(shards) - 1)
    del sd
    n = len(shards)
    if n == 1:
        os.rename(os.path.join(folder, tmp_names[0]), os.path.join(folder, "pytorch_model.bin"))
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        os.rename(os.path.join(folder, tmp_names[i]), os.path.join(folder, fname))
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}, f, indent=2)


def _copy_tokenizer(ckpt: str, dest: str) -> None:
    src = os.path.join(ckpt, TOKENIZER_DIR)
    if os.path.isdir(src):
        os.makedirs(dest, exist_ok=True)
        for name in os.listdir(src):
            shutil.copy2(os.path.join(src, name), os.path.join(dest, name))


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def export(ckpt: str, out: str, *, fmt: str = "hf", dtype: str | None = None, layout: str = "5.x",
           max_shard_mb: float | None = None, overwrite: bool = False, parts: Mapping[str, Part] | None = None,
           tables: Mapping[str, MappingTable] | None = None, progress: bool = False) -> None:
    """Exports the converted folder ``ckpt`` to ``out`` (``fmt`` "hf" or "got_bin"); see the module doc."""
    if fmt not in ("hf", "got_bin"):
        raise CheckpointError(f"--format must be 'hf' or 'got_bin', got {fmt!r}")
    out = common.check_out(out, overwrite)
    config = read_config(ckpt)
    np_dtype = _NP[dtype] if dtype else None
    builders = None
    if parts is not None:
        builders = {n: (lambda cfg, p=p: p.abstract(section_of(cfg, p.name),
                                                    np.dtype(cfg.get("param_dtype", "float32"))))
                    for n, p in parts.items()}
    tree, config = load_checkpoint(ckpt, parts=builders)
    stored = list(tree)

    def tensors(name, prefix="", lay=layout):
        return part_tensors(name, config, tree[name], parts=parts, tables=tables, dtype=np_dtype, layout=lay,
                            prefix=prefix, progress=progress)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if fmt == "hf":
            if "reasoner" in stored:
                d = os.path.join(tmp, "reasoner")
                os.makedirs(d)
                write_safetensors(os.path.join(d, "model.safetensors"), tensors("reasoner"), {"format": "pt"})
                _write_json(os.path.join(d, "config.json"), config["reasoner"])
                _copy_tokenizer(ckpt, d)
            for kind in ("unet", "vae"):
                if kind in stored:
                    d = os.path.join(tmp, kind)
                    os.makedirs(d)
                    write_safetensors(os.path.join(d, "diffusion_pytorch_model.safetensors"), tensors(kind),
                                      {"format": "pt"})
                    _write_json(os.path.join(d, "config.json"), config[kind])
            proj = [(k, t) for name in ("projector", "pooled_projector") if name in stored
                    for k, t in tensors(name, PART_PREFIX[name])]
            if proj:
                write_safetensors(os.path.join(tmp, "projectors.safetensors"), proj, {"format": "pt"})
        else:
            def all_tensors():
                for name in stored:
                    yield from tensors(name, PART_PREFIX[name], "4.x")

            write_bin(tmp, all_tensors(), int(max_shard_mb * 2**20) if max_shard_mb else None)
            for kind in ("unet", "vae"):
                if kind in config:
                    _write_json(os.path.join(tmp, kind, "config.json"), config[kind])
            if "reasoner" in config:
                _write_json(os.path.join(tmp, "mllm", "config.json"), config["reasoner"])
            _copy_tokenizer(ckpt, tmp)
        if "scheduler" in config:
            _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), config["scheduler"])


def build_parser():
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="converted got-jax folder (config.json + params/)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty; written atomically)")
    p.add_argument("--format", default="hf", choices=("hf", "got_bin"), help="output layout")
    p.add_argument("--dtype", default=None, choices=common.DTYPES, help="tensor dtype (default: as stored)")
    p.add_argument("--qwen_layout", default="5.x", choices=("4.x", "5.x"),
                   help="Qwen key layout for --format hf (got_bin always uses 4.x names)")
    p.add_argument("--max_shard_mb", type=float, default=None, help="shard the got_bin export at this size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (checked before exporting)")
    p.add_argument("--no_progress", action="store_true", help="no per-tensor progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def run(a):
        export(a.ckpt, a.out, fmt=a.format, dtype=a.dtype, layout=a.qwen_layout, max_shard_mb=a.max_shard_mb,
               overwrite=a.overwrite, progress=not a.no_progress)
        print(f"wrote {a.out}")

    p = build_parser()
    return common.run_main(run, argv, p)


if __name__ == "__main__":
    sys.exit(main())
