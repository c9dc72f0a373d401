"""Converts a Hugging Face Qwen2.5-VL folder -> a got-jax folder: a thin script over :mod:`got_jax.convert.qwen2_5_vl`.

Runs from any directory, as ``python path/to/convert/qwen2_5_vl.py --help`` or
``python -m got_jax.convert.qwen2_5_vl --help``; see that module for the options.
"""

import os
import sys

try:
    import got_jax  # noqa: F401  installed (pip install -e .)
except ImportError:  # a checkout that is not installed: its root holds got_jax/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from got_jax.convert.qwen2_5_vl import *  # noqa: E402,F401,F403  (convert.qwen2_5_vl keeps the module's API)
from got_jax.convert.qwen2_5_vl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
