"""``XLA_FLAGS`` for the CPU test environment (tests/conftest.py) and for the CLIs the tests start.

The flags are part of JAX's compilation-cache key: a CLI shares the session's compiled programs only with the
same flags (and its own device count), so build ``XLA_FLAGS`` with :func:`xla_flags`, never by hand.

Two flags make compiles cheaper on a 2-core CI machine, where the suite spends most of its time compiling:

* :data:`LLVM_O0` (``--xla_backend_optimization_level=0``): LLVM compiles the CPU kernels without its
  optimisation pipeline; the tiny train step compiles in 44-51 s instead of ~67 s (-O1: ~56 s). The test
  session uses it (tests/conftest.py), and so every CLI a test starts with the session's environment.
* :data:`NO_YNN` (``--xla_cpu_experimental_ynn_fusion_type=``, empty: no YNNPACK fusions): loading a cached
  program with YNN fusions spends most of its time looking HLO instructions up by id (perf); the tiny train
  step loads in ~8 s instead of ~18 s. Only for CLIs whose numbers no test compares with another process's at
  parity tolerance: without YNN, dots and convolutions round differently, and three parity tests went just
  over their tolerances (sharded vs single-device image 1.4e-4 > 1e-4; DDIM image 2e-4 > 1e-4; a LoRA factor
  after AdamW 1.5e-5 > 1e-5).

-O0 is deterministic: the same program gives the same bits run after run and in another process. What once
broke the kill -9 test at -O0 was ``jax.distributed``: a process that initialises it reduces across its
local devices with other collectives, and a train step's gradients differed in their last bits from the
same cached program in a plain process. Single-process ``train.py`` no longer initialises it.
"""

LLVM_O0 = "--xla_backend_optimization_level=0"
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="


def xla_flags(devices: int, *extra: str) -> str:
    """``XLA_FLAGS`` for ``devices`` fake CPU devices, plus ``extra`` (:data:`LLVM_O0`, :data:`NO_YNN`)."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *extra))
