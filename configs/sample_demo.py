"""Defaults of ``python sample.py --demo``: the tiny random-weight GoT (got_jax/got/demo.py) on CPU."""

from configs import sample


def get_config():
    c = sample.get_config()
    c.height = 128
    c.width = 128
    c.num_inference_steps = 20
    c.max_new_tokens = 48
    c.dtype = "float32"
    return c
