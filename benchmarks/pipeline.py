"""End-to-end GoT T2I sample (reason + diffuse + decode): our JAX pipeline vs the PyTorch reference.

Run:  python benchmarks/pipeline.py [--hidden 256 --layers 4 --size 128 --steps 20 --max-new 64 --repeats 3]

A small random GoT is built in PyTorch the way tests/test_got_pipeline.py builds its tiny one
(transformers' Qwen2.5-VL with the bundled tokenizer's ids, diffusers' 12-channel SDXL-shaped UNet
and VAE, two ``nn.Linear`` projectors), only larger (sizes are flags). As in the test,
``<|im_gen_start|>``'s LM-head row is boosted along the mean final-hidden direction (smallest
``alpha`` on a grid for which greedy decoding stops at it after >= 3 free tokens), so both pipelines
sample the same short chain; the weights stay random otherwise. The model is written as a
GoT-6B-style ``pytorch_model.bin``, converted with ``convert/got_checkpoint.py`` and loaded by
:class:`GoTPipeline`. The reference is ``tests/got_reference.py``'s ``TorchGoT.generate`` (the
released generate on torch modules); its recorded Gaussian draws are fed to ours (``noise=``).

Timed (median of ``--repeats`` after a warm-up call; float32; torch and XLA on all CPU cores):
``reasoning`` = ``only_return_got=True`` (prompt -> GoT chain), ``total`` = one full sample
(prompt -> image), ``diffusion + decode`` = total - reasoning (query forward, layout / reference
VAE encodes, the CFG denoising loop and the VAE decode). The first call (JAX compile) is reported
separately. A sanity line checks that the token ids match and prints the max image difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402
import torch  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def build(a, tmp: str):
    """Torch reference + converted JAX pipeline of one random GoT (the test fixture, sized by flags)."""
    import diffusers
    import test_got_pipeline as T
    from convert_helpers import qwen_state_4x
    from got_reference import TorchGoT

    from convert import got_checkpoint
    from got_jax.got import pipeline as gp
    from got_jax.got.tokenizer import load_tokenizer
    from got_jax.models.qwen2_5_vl.processing import make_image_processor

    tok = load_tokenizer()
    proc = make_image_processor(**T.PROC)
    hf = T._hf_qwen(tok, a.seed, hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=a.heads,
                    kv_heads=a.kv_heads, mrope_section=_mrope_section(a.hidden // a.heads))
    torch.manual_seed(a.seed + 3)
    proj, pooled = torch.nn.Linear(a.hidden, a.hidden), torch.nn.Linear(a.hidden, a.pooled)
    ch = tuple(a.unet_channels)
    unet = diffusers.UNet2DConditionModel(
        sample_size=a.size // 8, in_channels=12, out_channels=4, block_out_channels=ch,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",), layers_per_block=2,
        transformer_layers_per_block=(1,) * (len(ch) - 1) + (a.unet_transformer_layers,),
        attention_head_dim=tuple(max(1, c // 32) for c in ch), cross_attention_dim=a.hidden,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=a.time_embed, projection_class_embeddings_input_dim=a.pooled + 6 * a.time_embed).eval()
    vc = tuple(a.vae_channels)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vc, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * len(vc),
                                  up_block_types=("UpDecoderBlock2D",) * len(vc), latent_channels=4,
                                  norm_num_groups=min(32, min(vc)), sample_size=a.size).eval()
    with torch.no_grad():  # diffusers zero-inits some layers: make every tensor random
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    sched = diffusers.DDPMScheduler.from_config(T.SCHEDULER)
    ref = TorchGoT(hf, proj, pooled, sched, vae, unet, T.ProcessorShim(tok, proc))
    alpha = T._plant_image_start(hf, ref, tok, cases=((a.prompt, None, "t2i"),), max_new=a.max_new, grid=(2.0, 24.0))
    r = ref.generate(a.prompt, None, max_new_tokens=a.max_new, prompt_type="t2i", only_return_got=True)
    n_new = r.input_ids.shape[1] - r.prompt_len

    qdir, sdir, gdir, out = (os.path.join(tmp, d) for d in ("qwen", "sdxl", "got", "out"))
    hf.config.save_pretrained(qdir)
    tok.save_pretrained(qdir)
    with open(os.path.join(qdir, "preprocessor_config.json"), "w") as f:
        json.dump(T.PROC, f)
    unet.save_pretrained(os.path.join(sdir, "unet"))
    vae.save_pretrained(os.path.join(sdir, "vae"))
    os.makedirs(os.path.join(sdir, "scheduler"))
    with open(os.path.join(sdir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(T.SCHEDULER, f)
    sd = {"mllm." + k: v for k, v in qwen_state_4x(hf).items()}
    for name, mod in (("output_projector.projector", proj), ("output_projector_add.projector", pooled)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = mod.weight.detach().clone(), mod.bias.detach().clone()
    sd |= {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    os.makedirs(gdir)
    torch.save(sd, os.path.join(gdir, "pytorch_model.bin"))
    got_checkpoint.convert_got(gdir, qdir, sdir, out, progress=False)
    pipe = gp.GoTPipeline.from_pretrained(out)
    n_params = sum(p.numel() for m in (hf.model.language_model, hf.lm_head, proj, pooled, unet, vae)
                   for p in m.parameters())
    return ref, pipe, alpha, n_new, n_params


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="reasoner hidden size (also UNet cross-attention dim)")
    p.add_argument("--layers", type=int, default=4, help="reasoner decoder layers")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--pooled", type=int, default=64, help="pooled projector output (SDXL text_embeds) dim")
    p.add_argument("--time-embed", type=int, default=16, help="UNet addition_time_embed_dim")
    p.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128], help="UNet block_out_channels")
    p.add_argument("--unet-transformer-layers", type=int, default=2, help="transformer layers in the last UNet level")
    p.add_argument("--vae-channels", type=int, nargs="+", default=[32, 32, 64, 64],
                   help="VAE block_out_channels (4 levels = factor 8)")
    p.add_argument("--size", type=int, default=128, help="output height = width in pixels")
    p.add_argument("--steps", type=int, default=20, help="DDPM inference steps")
    p.add_argument("--max-new", type=int, default=64, help="max new reasoning tokens")
    p.add_argument("--prompt", default="two red circles to the left of a blue square")
    p.add_argument("--seed", type=int, default=1, help="torch seed of the reasoner weights")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if len(a.vae_channels) != 4:
        p.error("--vae-channels needs 4 values (the pipeline's noise shapes assume a factor-8 VAE)")

    ncpu = os.cpu_count() or 1
    torch.set_num_threads(ncpu)
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 on both sides (a no-op on CPU)

    import test_got_pipeline as T

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref, pipe, alpha, n_new, n_params = build(a, tmp)
        t_build = time.perf_counter() - t0

    gen_kw = dict(max_new_tokens=a.max_new, num_inference_steps=a.steps, height=a.size, width=a.size)

    def ref_full():
        return ref.generate(a.prompt, None, prompt_type="t2i", **gen_kw)

    def ref_reason():
        return ref.generate(a.prompt, None, prompt_type="t2i", max_new_tokens=a.max_new, only_return_got=True)

    r, ref_first = _timed(ref_full)
    noise = (T.nchw_to_nhwc(r.initial_latents[0]), np.stack([T.nchw_to_nhwc(z) for z in r.step_noises[0]]))

    def ours_full():
        return pipe(a.prompt, noise=noise, return_intermediates=True, **gen_kw)

    def ours_reason():
        return pipe(a.prompt, max_new_tokens=a.max_new, only_return_got=True)

    out, ours_first = _timed(ours_full)

    ids_match = np.array_equal(np.asarray(out.token_ids[0]), r.input_ids[0].numpy())
    img_err = float(np.abs(out.intermediates[0][0]["image"] - r.image_arrays[0]).max())

    rep = a.repeats
    ours_total, ref_total = median_time(ours_full, rep), median_time(ref_full, rep)
    ours_r, ref_r = median_time(ours_reason, rep), median_time(ref_reason, rep)

    print(f"\nGoT T2I sample, {a.size}x{a.size}, {a.steps} DDPM steps (4-way CFG), reasoner {a.layers} layers "
          f"hidden {a.hidden} heads {a.heads}/{a.kv_heads} vocab {len(ref.processor.tokenizer)}, "
          f"UNet {tuple(a.unet_channels)} ({a.unet_transformer_layers} transformer layers), "
          f"VAE {tuple(a.vae_channels)}, {n_params / 1e6:.1f}M params, float32")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {ncpu} CPUs; median of {rep} after a warm-up; "
          f"build + convert + load {t_build:.1f} s")
    print(f"sanity: planted alpha {alpha:g}, chain of {n_new} new tokens, token ids match: {ids_match}, "
          f"max image difference {img_err:.2e} (0..1 scale)")
    rows = [
        (f"reasoning ({n_new} tokens)", ours_r, ref_r),
        (f"diffusion + decode ({a.steps} steps)", ours_total - ours_r, ref_total - ref_r),
        ("total (prompt -> image)", ours_total, ref_total),
        ("first call (total, incl. JAX compile)", ours_first, ref_first),
    ]
    print(f"{'stage':38s} {'ours s':>9s} {'PyTorch s':>10s} {'PyTorch/ours':>13s}")
    for name, to, tt in rows:
        print(f"{name:38s} {to:9.3f} {tt:10.3f} {tt / to:13.2f}")
    print(f"overall (total) PyTorch / ours: {ref_total / ours_total:.2f}x")


if __name__ == "__main__":
    main()
