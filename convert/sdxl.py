"""Converts a diffusers SDXL folder -> a got-jax folder: a thin script over :mod:`got_jax.convert.sdxl`.

Runs from any directory, as ``python path/to/convert/sdxl.py --help`` or
``python -m got_jax.convert.sdxl --help``; see that module for the options.
"""

import os
import sys

try:
    import got_jax  # noqa: F401  installed (pip install -e .)
except ImportError:  # a checkout that is not installed: its root holds got_jax/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from got_jax.convert.sdxl import *  # noqa: E402,F401,F403  (convert.sdxl keeps the module's API)
from got_jax.convert.sdxl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
