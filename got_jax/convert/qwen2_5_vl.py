"""Converts a Hugging Face Qwen2.5-VL folder (transformers 4.x or 5.x key layout) into a got-jax folder.

    python -m got_jax.convert.qwen2_5_vl --qwen_dir /ckpt/Qwen2.5-VL-3B-Instruct --out /ckpt/qwen-jax

The output has the layout of :mod:`got_jax.checkpoint.orbax_io` with the single part ``reasoner``
(``config.json`` with the HF config, ``tokenizer/`` with tokenizer and processor files, ``params/``).
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

import jax.numpy as jnp

from got_jax.convert import _common as common
from got_jax.checkpoint import CheckpointError, open_tensor_folder
from got_jax.checkpoint.got_layout import embedding_rows, with_vocab_size
from got_jax.got.checkpoint import Part, convert_parts
from got_jax.checkpoint.lora import has_lora, merge_lora, read_adapter_config


def convert_qwen(qwen_dir: str, out: str, *, param_dtype="float32", progress: bool = True, overwrite: bool = False,
                 adapter_config: str | None = None, lora_alpha: float | None = None,
                 parts: Mapping[str, Part] | None = None) -> dict:
    """Converts ``qwen_dir`` to ``out``; returns the written config."""
    out = common.check_out(out, overwrite)
    qwen_dir = common.require_dir(qwen_dir, "--qwen_dir")
    cfg = common.read_json(f"{qwen_dir}/config.json", "Qwen2.5-VL config")
    if not str(cfg.get("model_type", "")).startswith("qwen2_5_vl"):
        raise CheckpointError(f"{qwen_dir}/config.json: model_type {cfg.get('model_type')!r} is not qwen2_5_vl")
    source = open_tensor_folder(qwen_dir)
    if has_lora(source):
        adapter = read_adapter_config(adapter_config) if adapter_config else None
        source = merge_lora(source, adapter_config=adapter, alpha=lora_alpha)
    config = {"reasoner": with_vocab_size(cfg, embedding_rows(source)), "source": {"reasoner": source.description}}
    return convert_parts(out, config, {"reasoner": source}, parts=parts,
                         tokenizer_files=common.tokenizer_files(qwen_dir), param_dtype=jnp.dtype(param_dtype),
                         progress=progress, overwrite=overwrite)


def build_parser():
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--qwen_dir", required=True, help="Hugging Face Qwen2.5-VL folder (config.json + safetensors)")
    p.add_argument("--adapter_config", default=None, help="PEFT adapter_config.json when the weights hold LoRA")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha when no adapter config is given")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def run(a):
        convert_qwen(a.qwen_dir, a.out, param_dtype=a.param_dtype, progress=not a.no_progress,
                     overwrite=a.overwrite, adapter_config=a.adapter_config, lora_alpha=a.lora_alpha)
        print(f"wrote {a.out}")

    return common.run_main(run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
