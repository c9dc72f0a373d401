"""SDXL-shaped UNet denoise step and VAE decode: our JAX (jit) models vs diffusers (torch, no_grad).

Run:  python benchmarks/unet.py [--batch 4 --latent 64 --repeats 3]

Same small-but-not-tiny random config on both sides (UNet: block_out_channels (64, 128, 256),
layers_per_block 2, transformer layers (1, 1, 2), 12 input channels, cross_attention_dim 256, 64 context
tokens, text_time conditions; VAE: block_out_channels (64, 128, 128), decoding 32x32 latents to 128x128 pixels),
weights saved by diffusers and loaded with our loader. Prints median seconds per call and torch/JAX ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--vae-latent", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import diffusers

    from got_jax.models.sdxl import load_diffusers_checkpoint

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=a.latent, in_channels=12, out_channels=4, block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=256,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=256 + 6 * 32).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2,
                                  norm_num_groups=32, latent_channels=4).eval()
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(os.path.join(d, "unet"))
        vae.save_pretrained(os.path.join(d, "vae"))
        junet = load_diffusers_checkpoint(os.path.join(d, "unet"), "unet")
        jvae = load_diffusers_checkpoint(os.path.join(d, "vae"), "vae")

    g = np.random.default_rng(0)
    B, L = a.batch, a.latent
    x = g.standard_normal((B, L, L, 12)).astype(np.float32)
    t = np.full((B,), 500, np.int64)
    ctx = g.standard_normal((B, 64, 256)).astype(np.float32)
    text = g.standard_normal((B, 256)).astype(np.float32)
    tid = np.tile(np.array([512., 512., 0., 0., 512., 512.], np.float32), (B, 1))
    z = g.standard_normal((1, a.vae_latent, a.vae_latent, 4)).astype(np.float32)

    step = nnx.jit(lambda m, *args: m(*args))
    dec = nnx.jit(lambda m, z: m.decode(z))
    tx = [torch.from_numpy(v) for v in (x.transpose(0, 3, 1, 2), t, ctx, text, tid)]
    tz = torch.from_numpy(z.transpose(0, 3, 1, 2))

    def torch_step():
        with torch.no_grad():
            return unet(tx[0], tx[1], tx[2], added_cond_kwargs=dict(text_embeds=tx[3], time_ids=tx[4])).sample

    def torch_dec():
        with torch.no_grad():
            return vae.decode(tz).sample

    rows = [
        (f"UNet step B={B} {L}x{L}", median_time(lambda: step(junet, x, t, ctx, text, tid).block_until_ready(), a.repeats),
         median_time(torch_step, a.repeats)),
        (f"VAE decode {a.vae_latent}->{a.vae_latent * 4}px", median_time(lambda: dec(jvae, z).block_until_ready(), a.repeats),
         median_time(torch_dec, a.repeats)),
    ]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'case':32s} {'jax s':>9s} {'torch s':>9s} {'torch/jax':>10s}")
    for name, tj, tt in rows:
        print(f"{name:32s} {tj:9.4f} {tt:9.4f} {tt / tj:10.2f}")


if __name__ == "__main__":
    main()
