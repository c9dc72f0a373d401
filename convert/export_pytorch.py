"""Converts a got-jax folder -> PyTorch (Hugging Face / diffusers folders or GoT's .bin layout): a thin script over :mod:`got_jax.convert.export_pytorch`.

Runs from any directory, as ``python path/to/convert/export_pytorch.py --help`` or
``python -m got_jax.convert.export_pytorch --help``; see that module for the options.
"""

import os
import sys

try:
    import got_jax  # noqa: F401  installed (pip install -e .)
except ImportError:  # a checkout that is not installed: its root holds got_jax/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from got_jax.convert.export_pytorch import *  # noqa: E402,F401,F403  (convert.export_pytorch keeps the module's API)
from got_jax.convert.export_pytorch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
