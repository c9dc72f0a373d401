"""Peak memory (RSS) of the streaming converter vs. the checkpoint size and vs. PyTorch loading it.

    python benchmarks/convert_memory.py [--family qwen|sdxl] [--hidden 1024 --layers 12 --vocab 32000]

Builds a random checkpoint with ``save_pretrained`` (a few hundred MB): a wide Qwen2.5-VL-shaped model, or
an SDXL-shaped UNet (two levels, 320/640 channels, cross-attention 2048, 12-channel conv_in). Then in fresh
subprocesses it measures peak RSS of: importing everything (baseline), our converter (load one tensor
at a time into the abstract model, write one Orbax checkpoint) to float32 and to the checkpoint's own
dtype, and PyTorch's ``from_pretrained`` of the same folder in float32.
Streaming means peak ~= baseline + model in the output dtype + the largest tensor, not twice the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUILD = r"""
import sys, torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
h, layers, vocab, dtype, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
heads = h // 64
cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=vocab, hidden_size=h, intermediate_size=int(h * 2.75),
    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 8),
    rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
    vision_config=dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=h,
                       fullatt_block_indexes=[1]), tie_word_embeddings=True)
torch.manual_seed(0)
m = Qwen2_5_VLForConditionalGeneration(cfg).to(getattr(torch, dtype))
m.save_pretrained(out)
"""

BUILD_SDXL = r"""
import sys, os, json, torch, diffusers
dtype, out = sys.argv[4], sys.argv[5]
torch.manual_seed(0)
m = diffusers.UNet2DConditionModel(sample_size=32, in_channels=12, out_channels=4, block_out_channels=(320, 640),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, transformer_layers_per_block=(1, 4), attention_head_dim=(5, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816).to(getattr(torch, dtype))
m.save_pretrained(os.path.join(out, "unet"))
"""

IMPORTS = ("import jax, numpy, torch, orbax.checkpoint, transformers, diffusers; from flax import nnx; "
           "import convert.qwen2_5_vl, convert.sdxl\n")

CONVERT = IMPORTS + r"""
import sys
from convert.qwen2_5_vl import convert_qwen
convert_qwen(sys.argv[1], sys.argv[2], param_dtype=sys.argv[3], progress=False)
"""

CONVERT_SDXL = IMPORTS + r"""
import sys
from convert.sdxl import convert_sdxl
convert_sdxl(sys.argv[1], sys.argv[2], kinds=["unet"], param_dtype=sys.argv[3], progress=False)
"""

TORCH_LOAD_SDXL = IMPORTS + r"""
import sys, os, torch, diffusers
m = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(sys.argv[1], "unet"), torch_dtype=torch.float32)
"""

TORCH_LOAD = IMPORTS + r"""
import sys, torch
from transformers import Qwen2_5_VLForConditionalGeneration
m = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
"""


def peak_rss_mb(code: str, *args: str) -> float:
    """Peak RSS (MiB) of a fresh Python running ``code`` (ru_maxrss of the child)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    script = f"{code}\nimport resource, json\nprint('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    res = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS")][-1]
    return int(line.split()[1]) / 1024.0


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen", choices=("qwen", "sdxl"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        build, convert, torch_load = ((BUILD, CONVERT, TORCH_LOAD) if a.family == "qwen" else
                                      (BUILD_SDXL, CONVERT_SDXL, TORCH_LOAD_SDXL))
        res = subprocess.run([sys.executable, "-c", build, str(a.hidden), str(a.layers), str(a.vocab), a.dtype, src],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        ckpt = folder_mb(src)
        idx = os.path.join(src, "model.safetensors" if a.family == "qwen" else
                           "unet/diffusion_pytorch_model.safetensors")
        with open(idx, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        itemsize = {"BF16": 2, "F16": 2, "F32": 4}
        params = sum(int(__import__("math").prod(v["shape"])) for v in header.values())
        largest = max(int(__import__("math").prod(v["shape"])) * itemsize[v["dtype"]] for v in header.values()) / 2**20
        base = peak_rss_mb(IMPORTS)
        rows = [("baseline (imports only)", base, None)]
        for dt in ("float32", a.dtype):
            out = os.path.join(tmp, f"out-{dt}")
            rss = peak_rss_mb(convert, src, out, dt)
            model_mb = params * (4 if dt == "float32" else 2) / 2**20
            rows.append((f"got-jax convert -> {dt} (model {model_mb:.0f} MiB)", rss, model_mb))
        rows.append(("PyTorch from_pretrained float32", peak_rss_mb(torch_load, src), params * 4 / 2**20))
        print(f"checkpoint: {params / 1e6:.1f}M params, {ckpt:.0f} MiB on disk ({a.dtype}); largest tensor "
              f"{largest:.0f} MiB")
        print(f"| {'run':<48} | peak RSS MiB | above baseline | (above baseline) / model |")
        print(f"| {'-' * 48} | ------------ | -------------- | ------------------------ |")
        for name, rss, model_mb in rows:
            extra = rss - base
            ratio = f"{extra / model_mb:.2f}" if model_mb else "-"
            print(f"| {name:<48} | {rss:12.0f} | {extra:14.0f} | {ratio:>24} |")


if __name__ == "__main__":
    main()
