"""One GoT train step (forward + backward + AdamW) of a small GoT: our jitted step vs the PyTorch reference step.

Run:  python benchmarks/train_step.py [--batch 4 --size 128 --repeats 3]

Both sides: the same random small GoT (reasoner hidden 256, 4 layers, LoRA r=16 on the decoder
projections; UNet (64, 128, 256) with 12 input channels; VAE (64, 128, 128)), the same T2I batch from
the Grain pipeline over the synthetic shapes data, float32. Ours: :class:`got_jax.train.step.TrainStep`
(draws inside the jit); PyTorch: ``tests/train_reference.train_step`` (transformers + peft, diffusers,
torch AdamW). Each side runs in its own process (peak RSS per side; ours includes the torch weights it
converts from). Per part, fwd + bwd only: the reasoner (LM loss + query states), the UNet (epsilon MSE
given the guidance) and the frozen VAE encodes (forward only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

TEXT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2)
RANK = 16


def _parts(tok, size: int):
    import diffusers
    import torch
    import train_fixtures as fx

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size // 4, in_channels=12, out_channels=4, block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=256,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=256 + 6 * 32)
    vae = diffusers.AutoencoderKL(block_out_channels=(64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2,
                                  norm_num_groups=32, latent_channels=4)
    return fx.torch_got(tok, lora_rank=RANK, lora_alpha=RANK, seed=0, text=TEXT, vision=VISION, unet=unet, vae=vae)


def _draws(b: int, latent: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    return dict(timesteps=rng.integers(0, 1000, b).astype(np.int32),
                noise=rng.standard_normal((b, latent, latent, 4)).astype(np.float32),
                offset=rng.standard_normal((b, 4)).astype(np.float32), drop_text=np.zeros(b, bool),
                drop_layout=np.zeros(b, bool), drop_reference=np.zeros(b, bool))


def run_torch(a) -> dict:
    import numpy as np
    import torch
    import train_fixtures as fx
    import train_reference as ref
    from timing import median_time

    from got_jax.got.tokenizer import got_token_ids, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer()
    parts = _parts(tok, a.size)
    batch = fx.pipeline_batch(tok, "generation", batch_size=a.batch, size=a.size, max_text_len=a.text_len)
    draws = _draws(a.batch, a.size // 4)
    pad = got_token_ids(tok).image_pad
    out = {"step": median_time(lambda: ref.train_step(parts, batch, draws, lr=1e-4, image_token_id=pad), a.repeats)}

    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    am = torch.from_numpy(batch["attention_mask"].astype(np.int64))
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    qm = torch.from_numpy(batch["query_mask"])

    def reasoner():
        o = parts.mllm(input_ids=ids, attention_mask=am, output_hidden_states=True)
        lg = o.logits.float()
        ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1))
        (ce + o.hidden_states[-1][qm].sum() * 1e-3).backward()

    lat = a.size // 4
    x = torch.randn(a.batch, 12, lat, lat)
    ctx = torch.randn(a.batch, 64, 256)
    pooled = torch.randn(a.batch, 256)
    tid = torch.from_numpy(batch["time_ids"])
    t = torch.from_numpy(draws["timesteps"].astype(np.int64))

    def unet():
        e = parts.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        (e.square().mean()).backward()

    img = torch.from_numpy(batch["target_image"].transpose(0, 3, 1, 2).copy())
    canv = torch.from_numpy(batch["layout_canvases"].reshape((-1,) + batch["layout_canvases"].shape[2:])
                            .transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)

    def vae():
        with torch.no_grad():
            parts.vae.encode(img).latent_dist.mean
            parts.vae.encode(img).latent_dist.mode()
            for i in range(len(canv)):
                parts.vae.encode(canv[i:i + 1]).latent_dist.mode()

    out |= {"reasoner": median_time(reasoner, a.repeats), "unet": median_time(unet, a.repeats),
            "vae": median_time(vae, a.repeats)}
    return out


def run_jax(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import train_fixtures as fx
    from flax import nnx
    from timing import median_time

    from got_jax.diffusion.schedulers import TrainSchedule
    from got_jax.got.tokenizer import load_tokenizer
    from got_jax.models.options import ModelOptions
    from got_jax.train import losses
    from got_jax.train import step as S
    from got_jax.train.trainable import trainable_filter

    tok = load_tokenizer()
    parts = _parts(tok, a.size)
    options = ModelOptions(lora_rank=RANK, lora_alpha=RANK)
    model, _ = fx.to_jax(parts, options)
    del parts
    batch = fx.pipeline_batch(tok, "generation", batch_size=a.batch, size=a.size, max_text_len=a.text_len)
    optim = S.OptimConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000)
    loss_cfg = losses.LossConfig()
    schedule = TrainSchedule.from_config(fx.SCHEDULER)
    ts = S.TrainState(model, S.make_tx(optim), trainable_filter(options))
    step, state = S.TrainStep.create(ts, schedule=schedule, loss_cfg=loss_cfg, optim_cfg=optim)
    prepared = jax.device_put(S.prepare_batch(batch, model.config.reasoner))
    holder = {"state": state, "i": 0}

    def full():
        holder["state"], m = step(holder["state"], prepared, jax.random.key(holder["i"]))
        holder["i"] += 1
        jax.block_until_ready(m)

    out = {"step": median_time(full, a.repeats)}

    model = nnx.merge(step.graphdef, holder["state"]).model
    inputs = jax.tree.map(lambda x: x[0], prepared["inputs"])
    images = jax.tree.map(lambda x: x[0], prepared["images"])
    filt = trainable_filter(options)

    @nnx.jit
    def reasoner(m):
        def f(m):
            h = m.reasoner.forward(inputs.input_ids, inputs.positions, inputs.attention_mask, with_logits=False)
            h = h.hidden_states
            ce = losses.lm_cross_entropy(h, losses.lm_head_weight(m.reasoner), inputs.target_ids, inputs.target_mask)
            return ce + losses.query_hidden_states(h, inputs.query_index).sum() * 1e-3
        return nnx.grad(f, argnums=nnx.DiffState(0, nnx.All(filt, nnx.PathContains("reasoner"))))(m)

    lat = a.size // 4
    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((a.batch, lat, lat, 12)), jnp.float32)
    ctx = jnp.asarray(g.standard_normal((a.batch, 64, 256)), jnp.float32)
    pooled = jnp.asarray(g.standard_normal((a.batch, 256)), jnp.float32)
    t = jnp.asarray(_draws(a.batch, lat)["timesteps"])

    @nnx.jit
    def unet(m):
        def f(m):
            return jnp.mean(jnp.square(m.unet(x, t, ctx, pooled, images["time_ids"])))
        return nnx.grad(f, argnums=nnx.DiffState(0, nnx.All(filt, nnx.PathContains("unet"))))(m)

    vae = nnx.jit(lambda m: losses.conditioning_latents(m, images))
    out |= {"reasoner": median_time(lambda: jax.block_until_ready(reasoner(model)), a.repeats),
            "unet": median_time(lambda: jax.block_until_ready(unet(model)), a.repeats),
            "vae": median_time(lambda: jax.block_until_ready(vae(model)), a.repeats)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latents size / 4)")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        res = run_jax(a) if a.side == "jax" else run_torch(a)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return
    res = {}
    for side in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--batch", str(a.batch), "--size",
               str(a.size), "--text-len", str(a.text_len), "--repeats", str(a.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{side} side failed:\n{out.stderr[-3000:]}")
        res[side] = json.loads(line[-1][len("RESULT "):])
        print(f"{side}: {res[side]}", flush=True)
    j, t = res["jax"], res["torch"]
    print(f"GoT train step, T2I batch {a.batch}, {a.size}px images, text length {a.text_len}, float32, CPU")
    print(f"| {'part':28s} | {'ours (s)':>9s} | {'PyTorch (s)':>11s} | {'PyTorch / ours':>14s} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 13}|{'-' * 16}|")
    for k, name in (("step", "full step (fwd+bwd+AdamW)"), ("reasoner", "reasoner fwd+bwd"),
                    ("unet", "UNet fwd+bwd"), ("vae", "VAE encodes (no grad)")):
        print(f"| {name:28s} | {j[k]:9.3f} | {t[k]:11.3f} | {t[k] / j[k]:13.2f}x |")
    print(f"| {'peak RSS (MB)':28s} | {j['peak_rss_mb']:9.0f} | {t['peak_rss_mb']:11.0f} | {'':>14s} |")


if __name__ == "__main__":
    main()
