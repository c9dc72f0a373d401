"""Sampling defaults of the released GoT ``generate`` (``python sample.py --ckpt DIR``).

Override any field on the command line, e.g. ``--config.height=768 --config.guidance_scale=4.0``.
Paper values for editing: guidance_scale 4.0, layout_guidance_scale 3.0, image_guidance_scale 1.5.
"""

import ml_collections

try:
    from configs import sharding_rules  # installed (pip install -e .) or run from the repository root
except ImportError:  # loaded by path (--config=/path/to/configs/sample.py) from elsewhere
    import importlib.util
    import os

    _spec = importlib.util.spec_from_file_location(
        "_got_jax_sharding_rules", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_rules.py"))
    sharding_rules = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sharding_rules)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.height = 1024
    c.width = 1024
    c.num_inference_steps = 50
    c.guidance_scale = 7.5  # g: text
    c.layout_guidance_scale = 4.0  # c: layout
    c.image_guidance_scale = 1.0  # i: reference image
    c.seed = 42
    c.scheduler = "ddpm"  # ddpm | ddim | euler | dpmpp_2m | dpmpp_2m_karras
    c.max_new_tokens = 1024
    c.temperature = 0.0  # 0 = greedy chains
    c.max_rounds = 1  # > 1: multi-turn (the reasoner may feed its image back)
    c.batch_size = 4  # prompts per call (one UNet batch of 4 x batch_size per step)
    # compute dtype; parameters keep the checkpoint's dtype. float32 reproduces the released PyTorch GoT-6B
    # numbers; bfloat16 (the default: half the memory traffic) can give chains that differ from them.
    c.dtype = "bfloat16"
    # attention kernel (got_jax/models/attention.py): auto = cuDNN fused attention on GPU, Pallas flash attention
    # on TPU, the exact XLA path elsewhere; or force one of xla | cudnn | pallas
    c.attention = "auto"
    # sharding: (data, fsdp, tensor) mesh shape, e.g. sharding_rules.MESH_SHAPE = (1, -1, 1) (all devices on
    # fsdp); () = one device, no mesh. ``rules`` map logical axis names to mesh axes (configs/sharding_rules.py).
    c.mesh_shape = ()
    c.rules = sharding_rules.RULES
    c.max_boxes = 32
    # a folder for JAX's persistent compilation cache ("" = off): reruns load compiled programs instead of
    # compiling them again (sample.py sets jax_compilation_cache_dir)
    c.compilation_cache_dir = ""
    return c
