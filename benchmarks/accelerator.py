"""GoT sampling speed on one accelerator: our JAX path beside PyTorch, per phase, against the hardware floor.

Run:  python benchmarks/accelerator.py                  # full-size GoT-6B architecture, 1024x1024 (GPU / TPU)
      python benchmarks/accelerator.py --size small     # the demo GoT, 64x64, on CPU (< 2 minutes)
      [--batch 1 4 8 --steps 50 --tokens 256 --tokens-per-image 850 --phases reason unet vae --no-torch]

Both sides get random weights in bfloat16 (no download): ours built abstractly from ``configs/reference/``
(``--size full``; the demo config for ``small``) and initialised by one jitted program on the device; PyTorch
builds transformers' ``Qwen2_5_VLForConditionalGeneration`` (SDPA) and diffusers' ``UNet2DConditionModel`` /
``AutoencoderKL`` from the same configs directly on the device. Same work on the same device, in one run:

* ``reason``: greedy decoding of ``--tokens`` new tokens after a ``--prompt``-token prompt, batch B (no stop
  tokens); tokens/s = B * tokens / time (prefill included on both sides).
* ``unet``: one denoising step = the four-way CFG UNet call on 4B latents + the guidance combination + a DDPM
  step; ms per step.
* ``vae``: decoding B latents to images; ms.

Seconds per image = (reasoning of ``--tokens-per-image`` tokens at the measured rate + ``--steps`` x step +
decode) / B. The floor: UNet FLOP per forward (XLA's cost analysis of our jitted UNet) x 4 x steps at the
peak bf16 FLOP/s, the VAE decode's FLOP the same way, plus ``--tokens-per-image`` decode steps each reading
the reasoner's text weights once (bf16 bytes / peak memory bandwidth) shared by the B rows. Peaks default to
the device's datasheet figures where known (``--peak-tflops`` / ``--peak-gbps`` override). Each phase is timed
as the median of ``--repeats`` calls after a warm-up (compile) call; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # got_jax, and benchmarks/timing.py
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave half the device to PyTorch
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from timing import median_time  # noqa: E402

REF = os.path.join(ROOT, "configs", "reference")
# datasheet dense bf16 TFLOP/s and memory GB/s of one chip
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0), "L4": (121.0, 300.0),
         "TPU v5e": (197.0, 819.0), "TPU v5p": (459.0, 2765.0), "TPU v6": (918.0, 1640.0), "TPU v4": (275.0, 1200.0)}
PHASES = ("reason", "unet", "vae")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def got_config(size: str) -> dict:
    """The converted-folder GoT config: GoT-6B's parts from configs/reference (full) or the demo GoT (small)."""
    if size == "small":
        from got_jax.got.demo import demo_config  # noqa: PLC0415

        return demo_config()

    def load(name):
        with open(os.path.join(REF, name)) as f:
            return json.load(f)

    return {"reasoner": load("qwen2_5_vl_3b_config.json"),
            "unet": load("sdxl_base_unet_config.json") | {"in_channels": 12}, "vae": load("sdxl_vae_config.json"),
            "scheduler": load("sdxl_scheduler_config.json"),
            "projectors": {"projector": {"in_features": 2048, "out_features": 2048},
                           "pooled_projector": {"in_features": 2048, "out_features": 1280}}}


def random_got(config: dict, attention: str, seed: int = 0, on_host: bool = False):
    """GoT in bfloat16 with random weights drawn on the device parameter by parameter (never whole on the host)."""
    from got_jax.got.model import GoT  # noqa: PLC0415
    from got_jax.models.options import ModelOptions  # noqa: PLC0415

    opts = ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=attention)
    if on_host:  # small models: numpy draws, no compile per parameter shape
        from got_jax.got.demo import random_model  # noqa: PLC0415

        return random_model(config, seed, options=opts)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GoT(config, options=opts, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(abstract)
    key = jax.random.key(seed)
    count = [0]

    def make(path, x):  # one small jitted draw per parameter, made on the device (cached per shape)
        count[0] += 1
        name = str(getattr(path[-1], "key", path[-1]))
        kind = "zeros" if name == "bias" else "ones" if len(x.shape) == 1 else "normal"
        return _draw(jax.random.fold_in(key, count[0]), tuple(x.shape), np.dtype(x.dtype).name, kind)

    nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(make, pure))
    return nnx.merge(graphdef, abstract)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key, shape, dtype, kind):
    """Biases 0, vectors (norm scales) 1, other arrays normal with std 1/sqrt(fan-in)."""
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(np.prod(shape[:-1]))).astype(dtype)


def text_weight_bytes(model) -> int:
    """Bytes of the reasoner's text weights (what one decode step reads; tied LM head = the embedding)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.reasoner.language_model))))


# --------------------------------------------------------------------------------------------------
# JAX side
# --------------------------------------------------------------------------------------------------


class JaxGoT:
    def __init__(self, a, config):
        from got_jax.diffusion.schedulers import make_scheduler  # noqa: PLC0415

        self.model = random_got(config, a.attention, on_host=a.size == "small")
        self.sched = make_scheduler("ddpm", config["scheduler"], a.steps)
        self.a = a
        self.graphdef, self.state = nnx.split(self.model)
        self._step = jax.jit(self._step_fn)
        self._decode = jax.jit(lambda st, z: nnx.merge(self.graphdef, st).decode(z))
        self._compiled = {}

    def reason(self, ids, tokens):
        from got_jax.models.qwen2_5_vl.generate import generate  # noqa: PLC0415

        out = generate(self.model.reasoner, ids, max_new_tokens=tokens, stop_token_ids=())
        return jax.block_until_ready(out.tokens)

    def _step_fn(self, state, x, i, ctx, null, pooled, ref, lay, tids, scales):
        m = nnx.merge(self.graphdef, state)
        e = m.guided_noise(self.sched.scale_model_input(x, i), jnp.asarray(self.sched.timesteps)[i], ctx, null,
                           pooled, ref, lay, tids, scales)
        return self.sched.step(e, i, x, noise=jnp.zeros_like(x))

    def step_inputs(self, b, hw):
        cfg = self.model.config
        r = jax.random.split(jax.random.key(1), 4)
        lat = (b, hw, hw, self.model.latent_channels)
        ctx = jax.random.normal(r[0], (b, 64, cfg.context_dim), jnp.bfloat16)
        return (jax.random.normal(r[1], lat, jnp.float32), jnp.int32(0), ctx, jnp.zeros_like(ctx),
                jax.random.normal(r[2], (b, cfg.pooled_dim), jnp.bfloat16), jax.random.normal(r[3], lat, jnp.float32),
                jnp.zeros(lat, jnp.float32), jnp.ones((b, 6), jnp.float32) * hw * 8,
                jnp.asarray([[7.5, 4.0, 1.0]] * b, jnp.float32))

    def step(self, inputs):
        b = inputs[0].shape[0]
        if ("step", b) not in self._compiled:  # compile once; its cost analysis gives the UNet FLOP
            self._compiled[("step", b)] = self._step.lower(self.state, *inputs).compile()
        return jax.block_until_ready(self._compiled[("step", b)](self.state, *inputs))

    def decode(self, z):
        b = z.shape[0]
        if ("vae", b) not in self._compiled:
            self._compiled[("vae", b)] = self._decode.lower(self.state, z).compile()
        return jax.block_until_ready(self._compiled[("vae", b)](self.state, z))

    def flops(self) -> tuple[float, float]:
        """(UNet FLOP per forward of one latent, VAE decode FLOP per image) from XLA's cost analysis of the
        compiled step (4 B UNet forwards + guidance + scheduler: the extra is negligible) and decode; 0 when
        the backend reports none."""
        out = []
        for phase, per in (("step", 4), ("vae", 1)):
            got = [(b, c) for (p, b), c in self._compiled.items() if p == phase]
            if not got:
                out.append(0.0)
                continue
            b, c = got[0]
            ca = c.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            out.append(float((ca or {}).get("flops", 0.0)) / (per * b))
        return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------------------


class TorchGoT:
    def __init__(self, a, config, device):
        import diffusers  # noqa: PLC0415
        import torch  # noqa: PLC0415
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

        self.torch, self.device = torch, device
        torch.manual_seed(0)
        dt = torch.bfloat16
        with torch.device(device):
            self.reasoner = Qwen2_5_VLForConditionalGeneration._from_config(
                Qwen2_5_VLConfig(**config["reasoner"]), torch_dtype=dt, attn_implementation="sdpa").eval()
            self.unet = diffusers.UNet2DConditionModel.from_config(config["unet"]).to(device, dt).eval()
            self.vae = diffusers.AutoencoderKL.from_config(config["vae"]).to(device, dt).eval()
        self.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
        self.sched = diffusers.DDPMScheduler.from_config(config["scheduler"])
        self.sched.set_timesteps(a.steps)
        self.scaling = config["vae"].get("scaling_factor", 0.13025)

    def sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def reason(self, ids, tokens):
        with self.torch.no_grad():
            out = self.reasoner.generate(input_ids=self.torch.tensor(ids, device=self.device), max_new_tokens=tokens,
                                         min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        self.sync()
        return out

    def step_inputs(self, b, hw, ctx_dim, pooled_dim, lc):
        t = self.torch
        g = t.Generator(device=self.device).manual_seed(1)
        r = lambda *s: t.randn(*s, generator=g, device=self.device, dtype=t.bfloat16)  # noqa: E731
        return (t.randn(b, lc, hw, hw, generator=g, device=self.device), r(b, 64, ctx_dim), r(b, pooled_dim),
                r(b, lc, hw, hw), t.full((b, 6), hw * 8.0, device=self.device, dtype=t.bfloat16))

    def step(self, inputs):
        t = self.torch
        x, ctx, pooled, ref, tids = inputs
        z = t.zeros_like(ref)
        tstep = self.sched.timesteps[0]
        with t.no_grad():
            xin = t.cat([x.to(t.bfloat16)] * 4)
            inp = t.cat([xin, t.cat([ref, ref, ref, z]), t.cat([ref, z, z, z])], dim=1)
            e = self.unet(inp, tstep, encoder_hidden_states=t.cat([ctx, ctx, t.zeros_like(ctx), t.zeros_like(ctx)]),
                          added_cond_kwargs={"text_embeds": t.cat([pooled] * 4), "time_ids": t.cat([tids] * 4)}).sample
            e1, e2, e3, e4 = e.float().chunk(4)
            e = e4 + 7.5 * (e2 - e3) + 4.0 * (e1 - e2) + 1.0 * (e3 - e4)
            out = self.sched.step(e, tstep, x).prev_sample
        self.sync()
        return out

    def decode(self, z):
        with self.torch.no_grad():
            img = self.vae.decode((z / self.scaling).to(self.torch.bfloat16)).sample
        self.sync()
        return img


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--resolution", type=int, default=None, help="image side in px (full: 1024, small: 64)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (full: 64, small: 16)")
    p.add_argument("--tokens", type=int, default=None, help="decoded tokens timed (full: 256, small: 8)")
    p.add_argument("--tokens-per-image", type=int, default=850, help="reasoning tokens of one GoT chain")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per phase (full: 3, small: 1)")
    p.add_argument("--attention", default="auto", help="ModelOptions.attention_impl (auto | xla | cudnn | pallas)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--peak-gbps", type=float, default=None)
    a = p.parse_args(argv)
    small = a.size == "small"
    a.resolution = a.resolution or (64 if small else 1024)
    a.prompt = a.prompt or (16 if small else 64)
    a.tokens = a.tokens or (8 if small else 256)
    a.repeats = a.repeats or (1 if small else 3)

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    log(f"{a.size} GoT on {kind} ({dev.platform}); batches {a.batch}; {a.resolution}px; phases {a.phases}")
    config = got_config(a.size)
    t0 = time.perf_counter()
    ours = JaxGoT(a, config)
    log(f"JAX model initialised in {time.perf_counter() - t0:.1f} s")
    m = ours.model
    hw = a.resolution // m.vae_scale
    theirs = None
    if not a.no_torch:
        import torch  # noqa: PLC0415

        device = "cuda" if dev.platform == "gpu" and torch.cuda.is_available() else "cpu"
        if dev.platform not in ("gpu", "cpu"):
            log(f"PyTorch has no {dev.platform} backend here: its column runs on {device}")
        t0 = time.perf_counter()
        theirs = TorchGoT(a, config, device)
        log(f"PyTorch model initialised on {device} in {time.perf_counter() - t0:.1f} s")

    wbytes = text_weight_bytes(m)
    peak = next((v for k, v in PEAKS.items() if k.lower() in str(kind).lower()), (None, None))
    tflops = a.peak_tflops or peak[0]
    gbps = a.peak_gbps or peak[1]
    rc = m.config.reasoner
    top = min(rc.text.vocab_size, rc.image_token_id, rc.video_token_id, rc.vision_start_token_id,
              rc.vision_end_token_id)  # plain text tokens only
    rows = []
    for b in a.batch:
        ids = np.random.RandomState(b).randint(0, top, (b, a.prompt))
        res = {}
        for side, impl in (("jax", ours), ("torch", theirs)):
            if impl is None:
                continue
            r = {}
            if "reason" in a.phases:
                log(f"batch {b}: {side} reasoning ({a.tokens} tokens)")
                r["reason"] = median_time(lambda: impl.reason(ids, a.tokens), a.repeats)
            if "unet" in a.phases:
                log(f"batch {b}: {side} UNet step")
                inputs = (ours.step_inputs(b, hw) if side == "jax" else
                          theirs.step_inputs(b, hw, m.config.context_dim, m.config.pooled_dim, m.latent_channels))
                r["unet"] = median_time(lambda: impl.step(inputs), a.repeats)
            if "vae" in a.phases:
                log(f"batch {b}: {side} VAE decode")
                if side == "jax":
                    z = jnp.zeros((b, hw, hw, m.latent_channels), jnp.float32)
                else:
                    z = theirs.torch.zeros(b, m.latent_channels, hw, hw, device=theirs.device)
                r["vae"] = median_time(lambda: impl.decode(z), a.repeats)
            res[side] = r
        rows.append((b, res))
        unet_flop, vae_flop = ours.flops()
        _print_rows(a, rows, unet_flop, vae_flop, wbytes, tflops, gbps, kind)
    return dict(args=a, rows=rows, unet_flop=unet_flop, vae_flop=vae_flop, weight_bytes=wbytes, peak_tflops=tflops,
                peak_gbps=gbps)


def per_image(a, b, r) -> float | None:
    """Seconds per image from the phase times of one side (None when a phase was not run)."""
    if not all(k in r for k in PHASES):
        return None
    return (r["reason"] * a.tokens_per_image / a.tokens + a.steps * r["unet"] + r["vae"]) / b


def floor_per_image(a, b, unet_flop, vae_flop, wbytes, tflops, gbps) -> float | None:
    if not tflops or not gbps:
        return None
    return (a.tokens_per_image * wbytes / (gbps * 1e9) / b
            + (4 * a.steps * unet_flop + vae_flop) / (tflops * 1e12))


def _print_rows(a, rows, unet_flop, vae_flop, wbytes, tflops, gbps, kind):
    print(f"\nGoT ({a.size}) on {kind}, {a.resolution}x{a.resolution}, {a.steps} DDPM steps, bf16, attention "
          f"{a.attention!r}, jax {jax.__version__}; UNet {unet_flop / 1e9:.4g} GFLOP/forward, VAE decode "
          f"{vae_flop / 1e9:.4g} GFLOP/image, reasoner text weights {wbytes / 1e9:.3g} GB; peaks "
          f"{tflops or '?'} TFLOP/s, {gbps or '?'} GB/s; {a.tokens_per_image} reasoning tokens per image", flush=True)
    print(f"{'batch':>5} {'side':>6} | {'reason tok/s':>12} {'UNet step ms':>12} {'VAE ms':>9} | {'s/image':>8} "
          f"{'images/s':>8} | {'floor s':>8} {'of floor':>8}", flush=True)
    for b, res in rows:
        fl = floor_per_image(a, b, unet_flop, vae_flop, wbytes, tflops, gbps)
        for side, r in res.items():
            s = per_image(a, b, r)
            tok = f"{b * a.tokens / r['reason']:.0f}" if "reason" in r else "-"
            us = f"{r['unet'] * 1e3:.1f}" if "unet" in r else "-"
            vs = f"{r['vae'] * 1e3:.1f}" if "vae" in r else "-"
            print(f"{b:>5} {side:>6} | {tok:>12} {us:>12} {vs:>9} | "
                  f"{'-' if s is None else f'{s:.3f}':>8} {'-' if s is None else f'{1 / s:.3f}':>8} | "
                  f"{'-' if fl is None else f'{fl:.3f}':>8} {'-' if fl is None or s is None else f'{fl / s:.0%}':>8}",
                  flush=True)
        if "jax" in res and "torch" in res:
            sj, st = per_image(a, b, res["jax"]), per_image(a, b, res["torch"])
            if sj and st:
                print(f"{b:>5} {'ratio':>6} | PyTorch s/image / ours = {st / sj:.2f}x", flush=True)


if __name__ == "__main__":
    main()
