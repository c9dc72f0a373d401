"""Defaults of ``python sample.py --demo``: the tiny random-weight GoT (got_jax/got/demo.py) on CPU."""

try:
    from configs import sample  # installed (pip install -e .) or run from the repository root
except ImportError:  # loaded by path (--config=/path/to/configs/sample_demo.py) from elsewhere
    import importlib.util
    import os

    _spec = importlib.util.spec_from_file_location(
        "_got_jax_sample_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py"))
    sample = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sample)


def get_config():
    c = sample.get_config()
    c.height = 128
    c.width = 128
    c.num_inference_steps = 20
    c.max_new_tokens = 48
    c.dtype = "float32"
    return c
