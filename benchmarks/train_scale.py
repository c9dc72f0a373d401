r"""AOT compile of the full ``got_6b`` train step on simulated pods: per-device memory, FLOPs, implied step time.

    python benchmarks/train_scale.py --devices 16,64                 # the full recipe (hours of CPU compile)
    python benchmarks/train_scale.py --devices 16 --reasoner_layers 2        # a cut for small hosts
    pip install libtpu==0.0.42.1   # the TPU compiler of jax 0.10.2's [tpu] extra; no TPU needed
    python benchmarks/train_scale.py --topology v5e:4x4              # compiled by the TPU compiler (AOT)
    python benchmarks/train_scale.py --topology v5e:4x4 --cached_latents   # the step on pre-encoded latents

Builds the ``configs/got_6b.py`` state abstractly (``nnx.eval_shape``: no weights), lowers the jitted train step
(``jit(step, in/out_shardings from the logical-axis rules, donate state).lower(...).compile()``) for a global
batch of 128 T2I examples (1024 px, 1024 tokens) on a ``(1, N, 1)`` FSDP mesh of N fake CPU devices
(``--xla_force_host_platform_device_count``), and prints per device: argument / output / temporary bytes from
``memory_analysis()``, FLOPs from ``cost_analysis()``, and the step time the FLOPs imply at the bf16 peak of a
v5e (197 TFLOP/s) and a v5p (459 TFLOP/s) chip, with the MFU a measured step time would give
(``--step_time_s``). ``--reasoner_layers`` cuts the reasoner's decoder depth (36) to fit small hosts: memory and
FLOPs of the missing layers are then extrapolated linearly from two depths (say so when reporting).
XLA:CPU's memory numbers are for the CPU compile of the same SPMD program, and they do not show what remat saves
(XLA:CPU schedules without regard to memory: a 20-layer toy needs 656 MiB of temporaries without remat and 960 MiB
with it). ``--topology v5e:4x4`` (``v5e:8x8``, ``v5p:...``) compiles for that TPU slice instead, on this host,
with the TPU compiler of ``libtpu`` (``jax.experimental.topologies``; no TPU is needed: the same toy needs 563 MiB
without remat and 135 MiB with it): those are the numbers to judge the 16 GiB goal by.
Progress (build, lower, compile per device count, with their wall times) goes to stderr as it happens: the
compile of one device count takes tens of CPU-minutes, single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PEAK = {"v5e": 197e12, "v5p": 459e12}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="16,64", help="comma-separated device counts (fake CPU devices)")
    p.add_argument("--topology", default="", help="compile for this TPU slice instead (e.g. v5e:4x4, v5e:8x8) "
                   "with libtpu's compiler; --devices is then the slice's chip count")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--reasoner_layers", type=int, default=0, help="0 = all (36)")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--image", type=int, default=1024)
    p.add_argument("--text_len", type=int, default=1024)
    p.add_argument("--step_time_s", type=float, default=0.0, help="a measured step time, for MFU")
    p.add_argument("--cached_latents", action="store_true", help="the step on pre-encoded latents "
                   "(loss.cache_latents' batch: target, reference and layout latents instead of the images), so the "
                   "frozen VAE's encodes are out of the step")
    p.add_argument("--json", default="", help="append results here")
    return p.parse_args()


def _phase(msg: str, t0: float) -> None:
    print(f"[train_scale {time.time() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def main():
    a = parse()
    start = time.time()
    counts = [int(x) for x in a.devices.split(",")]
    if not a.topology:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(counts)}"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    import configs.got_6b as got_6b
    from got_jax import sharding
    from got_jax.diffusion.schedulers import TrainSchedule
    from got_jax.got.model import GoT, GoTConfig
    from got_jax.train import run, setup
    from got_jax.train.step import TrainState, TrainStep, make_tx, prepare_batch
    from got_jax.train.trainable import trainable_filter

    _phase("building the abstract got_6b train state", start)
    c = setup.resolve(got_6b.get_config())
    c.model.remat = a.remat
    got_cfg = setup.got_config(c)
    if a.reasoner_layers:
        r = got_cfg["reasoner"]
        (r["text_config"] if "text_config" in r else r)["num_hidden_layers"] = a.reasoner_layers
    options = setup.model_options(c)
    optim = run.optim_config(c)
    ts = nnx.eval_shape(lambda: TrainState(GoT(got_cfg, options=options, rngs=nnx.Rngs(0)), make_tx(optim),
                                           trainable_filter(options)))
    graphdef, abstract = nnx.split(ts)
    rcfg = GoTConfig.from_dict(got_cfg).reasoner
    # one example on the host, then its shapes scaled to the global batch
    L, H, K = a.text_len, a.image, int(c.data.max_boxes)
    ex = {"input_ids": np.zeros((1, L), np.int32), "attention_mask": np.ones((1, L), np.int32),
          "loss_mask": np.arange(L)[None] < L - 64, "query_mask": np.arange(L)[None] >= L - 64,
          "image_grid_thw": np.zeros((1, 3), np.int32), "target_image": np.zeros((1, H, H, 3), np.float32),
          "reference_image": np.zeros((1, H, H, 3), np.float32), "layout_canvases": np.zeros((1, K, 8, 8, 3), np.uint8),
          "layout_mask": np.ones((1, K), bool), "time_ids": np.zeros((1, 6), np.float32)}
    ex["loss_mask"][:, :200] = False
    if a.cached_latents:  # what loss.cache_latents attaches in place of the image fields
        from got_jax.train.losses import IMAGE_FIELDS, LATENT_FIELDS

        f = 2 ** (len(got_cfg["vae"]["block_out_channels"]) - 1)
        for k in IMAGE_FIELDS:
            ex.pop(k)
        for k in LATENT_FIELDS:
            ex[k] = np.zeros((1, H // f, H // f, int(got_cfg["vae"]["latent_channels"])), np.float32)
    one = prepare_batch(ex, rcfg, 1)

    def scaled(path, x):
        names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        shape = list(x.shape)
        shape[2 if "positions" in names else 1] *= a.batch
        if "layout_canvases" in names:
            shape[3:5] = [H, H]
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    prepared = jax.tree_util.tree_map_with_path(scaled, one)
    if a.topology:
        from jax.experimental import topologies

        try:
            pool = list(topologies.get_topology_desc(topology_name=a.topology, platform="tpu").devices)
        except Exception as e:  # noqa: BLE001 -- no libtpu, or a topology name it does not know
            sys.exit(f"train_scale: --topology {a.topology}: {str(e).splitlines()[0]} (needs `pip install "
                     f"libtpu==0.0.42.1` and a name such as v5e:4x4)")
        counts = [len(pool)]
        _phase(f"TPU topology {a.topology}: {len(pool)} chips ({pool[0].device_kind})", start)
    else:
        pool = jax.devices()
    rows = []
    for n in counts:
        mesh = sharding.make_mesh((1, n, 1), pool[:n])
        rules = setup.rules(c)
        step = TrainStep(graphdef, abstract, schedule=TrainSchedule.from_config(got_cfg["scheduler"]),
                         loss_cfg=run.loss_config(c), optim_cfg=optim, mesh=mesh, rules=rules)
        rep = NamedSharding(mesh, PartitionSpec())
        bsh = step.batch_shardings(prepared)
        fn = jax.jit(step._step, in_shardings=(step.state_shardings, bsh, rep, None),
                     out_shardings=(step.state_shardings, rep), donate_argnums=(0,))
        state_in = jax.tree.map(
            lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
            abstract, step.state_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
        _phase(f"{n} devices: lowering the train step (global batch {a.batch})", start)
        t0 = time.time()
        with sharding.use_mesh(mesh, rules):
            lowered = fn.lower(state_in, prepared, key, None)
        t1 = time.time()
        _phase(f"{n} devices: lowered in {t1 - t0:.0f} s; compiling ({'TPU compiler' if a.topology else 'XLA:CPU'}, "
               "the long part)", start)
        row = {"devices": n, "compiler": f"tpu {a.topology}" if a.topology else "xla:cpu",
               "reasoner_layers": a.reasoner_layers or rcfg.text.num_hidden_layers,
               "inputs": "latents" if a.cached_latents else "images"}
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a step that does not fit the chip's HBM
            row["error"] = str(e).splitlines()[0]
            _phase(f"{n} devices: does not compile: {row['error']}", start)
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        t2 = time.time()
        _phase(f"{n} devices: compiled in {t2 - t1:.0f} s", start)
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
        row.update({"remat": a.remat, "batch": a.batch, "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
                    "argument_GiB": mem.argument_size_in_bytes / 2**30, "output_GiB": mem.output_size_in_bytes / 2**30,
                    "temp_GiB": mem.temp_size_in_bytes / 2**30, "flops_per_device": flops})
        for chip, peak in PEAK.items():
            row[f"{chip}_s_at_peak"] = flops / peak
            if a.step_time_s:
                row[f"{chip}_mfu"] = flops / peak / a.step_time_s
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("| devices | compiler | reasoner layers | inputs | args GiB | temp GiB | out GiB | TFLOP/device | v5e s @peak "
          "| v5p s @peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['devices']} | {r['compiler']} | {r['reasoner_layers']} | {r['inputs']} | {r['error']} |")
            continue
        print(f"| {r['devices']} | {r['compiler']} | {r['reasoner_layers']} | {r['inputs']} | {r['argument_GiB']:.2f} | "
              f"{r['temp_GiB']:.2f} | "
              f"{r['output_GiB']:.2f} | {r['flops_per_device'] / 1e12:.1f} | {r['v5e_s_at_peak']:.2f} | "
              f"{r['v5p_s_at_peak']:.2f} |")


if __name__ == "__main__":
    main()
