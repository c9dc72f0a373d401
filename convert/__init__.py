"""Thin command-line scripts over :mod:`got_jax.convert` (``python convert/got_checkpoint.py --help``).

The converter code lives in ``got_jax/convert/`` so that it is installed by ``pip install -e .`` and runs
from any directory as ``python -m got_jax.convert.<name>``.
"""
