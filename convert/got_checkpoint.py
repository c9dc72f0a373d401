"""Converts the released GoT-6B checkpoint -> one got-jax folder: a thin script over :mod:`got_jax.convert.got_checkpoint`.

Runs from any directory, as ``python path/to/convert/got_checkpoint.py --help`` or
``python -m got_jax.convert.got_checkpoint --help``; see that module for the options.
"""

import os
import sys

try:
    import got_jax  # noqa: F401  installed (pip install -e .)
except ImportError:  # a checkout that is not installed: its root holds got_jax/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from got_jax.convert.got_checkpoint import *  # noqa: E402,F401,F403  (convert.got_checkpoint keeps the module's API)
from got_jax.convert.got_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
