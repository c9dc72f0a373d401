"""``XLA_FLAGS`` for the CPU test environment (tests/conftest.py) and for the CLIs the tests start.

The flags are part of JAX's compilation-cache key: a CLI shares the session's compiled programs only with the
same flags (and its own device count), so build ``XLA_FLAGS`` with :func:`xla_flags`, never by hand.

Two optional flags make a CLI's one-off programs cheaper on a 2-core CI machine. They are for CLIs whose
numbers no test compares bit for bit or at parity tolerance with another process's:

* :data:`LLVM_O0` (``--xla_backend_optimization_level=0``): LLVM compiles the CPU kernels without its
  optimisation pipeline; the tiny train step compiles in 44-51 s instead of ~67 s (-O1: ~56 s).
* :data:`NO_YNN` (``--xla_cpu_experimental_ynn_fusion_type=``, empty: no YNNPACK fusions): loading a cached
  program with YNN fusions spends most of its time looking HLO instructions up by id (perf); the tiny train
  step loads in ~8 s instead of ~18 s.

Why not everywhere (measured with both in the whole suite, 28 min instead of 39): without YNN, dots and
convolutions round differently, and three parity tests went just over their tolerances (sharded vs single-device
image 1.4e-4 > 1e-4; DDIM image 2e-4 > 1e-4; a LoRA factor after AdamW 1.5e-5 > 1e-5). At -O0 and at -O1 the
kill -9 resume of tests/test_train_run.py was no longer bit-identical to the uninterrupted run (one loss
differed in its last bits, at step 3 or 4, and in either direction between runs); at XLA's default (-O2) it is.
"""

LLVM_O0 = "--xla_backend_optimization_level=0"
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="


def xla_flags(devices: int, *extra: str) -> str:
    """``XLA_FLAGS`` for ``devices`` fake CPU devices, plus ``extra`` (:data:`LLVM_O0`, :data:`NO_YNN`)."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *extra))
