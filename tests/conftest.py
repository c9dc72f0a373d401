"""Test-wide setup: 8 fake CPU devices for sharding tests, float32 at highest matmul precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # keep torch from fighting JAX for the two CI cores
    import torch  # noqa: E402

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover
    pass
