"""Defaults of ``python sample.py`` without ``--ckpt``: the shipped demo GoT (``got_jax/assets/demo``, trained at 64 px
by ``configs/demo_shapes.py``) on CPU, with the settings its shapes-GenEval figures were measured with
(``python -m got_jax.eval.shapes`` defaults: DDPM 50 steps, g 7.5, c 4.0, greedy chains, float32). Also the defaults
of ``--random_weights`` (the tiny random-weight GoT of the tests)."""

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
    c.height = 64
    c.width = 64
    c.num_inference_steps = 50
    c.max_new_tokens = 256  # the longest shapes chain (an editing plan) is ~200 tokens
    c.max_boxes = 4  # the demo was trained with at most 4 boxes
    c.dtype = "float32"
    return c
