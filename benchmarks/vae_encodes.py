r"""Memory of the train step's frozen-VAE encodes at pod scale, by ``loss.vae_encode_passes``.

    python benchmarks/vae_encodes.py                       # 8 examples (v5e-16's share of batch 128), 1024 px
    python benchmarks/vae_encodes.py --batch 2 --passes 1,2  # v5e-64's share

Every GoT training example sends its target image, its reference image (black for T2I) and ``data.max_boxes``
layout canvases through the frozen SDXL VAE encoder (``got_jax.train.losses.conditioning_latents``). The canvases
go one at a time (``lax.map``); target and reference go through in ``loss.vae_encode_passes`` passes
(``got_jax.train.losses.in_passes``; 0 or 1: the whole batch at once). This builds ``configs/got_6b.py``'s GoT
abstractly (``nnx.eval_shape``: no weights), compiles only those encodes for one device's examples in the
config's compute dtype, and prints per pass count what XLA:CPU's ``memory_analysis()`` says (temporaries,
arguments, outputs) and the compile time. XLA:CPU's counts are not the TPU compiler's (see
``benchmarks/train_scale.py``), but both keep one iteration's buffers of a loop, which is what passes buy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="examples on one device")
    p.add_argument("--image", type=int, default=1024)
    p.add_argument("--passes", default="1,2,4,8", help="comma-separated vae_encode_passes to compile")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import configs.got_6b as got_6b
    from got_jax.got.model import GoT
    from got_jax.train import losses, setup

    c = setup.resolve(got_6b.get_config())
    got_cfg = setup.got_config(c)
    options = setup.model_options(c)
    model = nnx.eval_shape(lambda: GoT(got_cfg, options=options, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    b, h, k = a.batch, a.image, int(c.data.max_boxes)
    batch = {"target_image": jax.ShapeDtypeStruct((b, h, h, 3), jnp.float32),
             "reference_image": jax.ShapeDtypeStruct((b, h, h, 3), jnp.float32),
             "layout_canvases": jax.ShapeDtypeStruct((b, k, h, h, 3), jnp.uint8),
             "layout_mask": jax.ShapeDtypeStruct((b, k), jnp.bool_)}
    gib = 2.0 ** 30
    print(f"frozen-VAE encodes of {b} examples (target + reference + {k} layout canvases each) at {h} px, "
          f"compute {options.dtype}, XLA:CPU")
    print("| vae_encode_passes | images per pass | temp GiB | args GiB | out GiB | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for passes in (int(x) for x in a.passes.split(",")):
        def encodes(st, bt, passes=passes):
            return losses.conditioning_latents(nnx.merge(graphdef, st), bt, passes)

        t0 = time.time()
        compiled = jax.jit(encodes).lower(state, batch).compile()
        mem = compiled.memory_analysis()
        per = b // passes if passes > 1 else b
        print(f"| {passes} | {per} | {mem.temp_size_in_bytes / gib:.2f} | {mem.argument_size_in_bytes / gib:.2f} | "
              f"{mem.output_size_in_bytes / gib:.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
