"""Test-wide setup: 8 fake CPU devices for sharding tests, CPU kernels built at LLVM -O0 (XLA_FLAGS from
tests/cpu_env.py: the suite is mostly compiling),
float32 at highest matmul precision, and one persistent XLA compilation cache for the session (this process
and the CLIs the tests start inherit it through the environment: the same tiny programs compile once per run
instead of once per subprocess). Every program is cached, however short its compile: a CLI launch compiles
~130 small eager programs (~7 s on a CI core) that the next launch of the same model then loads."""

import os
import tempfile

from cpu_env import LLVM_O0, xla_flags  # tests/ is on sys.path (rootdir conftest)

os.environ.setdefault("XLA_FLAGS", xla_flags(8, LLVM_O0))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="got_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # keep torch from fighting JAX for the two CI cores
    import torch  # noqa: E402

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover
    pass


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
