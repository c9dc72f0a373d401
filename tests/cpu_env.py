"""The XLA flags of the CPU test environment, for this process (tests/conftest.py) and the CLIs the tests start.

Besides the number of fake CPU devices, two flags make the suite's many one-off programs cheaper on a 2-core CI
machine without touching what is computed (every parity test keeps its tolerance; the programs are the same HLO):

* ``--xla_backend_optimization_level=0``: LLVM compiles the CPU kernels without its optimisation pipeline. The tiny
  train step compiles in ~45-50 s instead of ~65 s; test programs run for milliseconds, so slower kernels cost less
  than the compile saves.
* ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions, dots and convolutions stay XLA's own):
  loading a cached program with YNN fusions spends most of its time looking up HLO instructions by id (the tiny
  train step loads in ~8 s instead of ~18 s), and every CLI launch after the first loads its programs from the
  session's compilation cache.

The flags are part of JAX's cache key, so a CLI must get the same flags (with its own device count) to share
the session's compiled programs: use :func:`xla_flags` rather than writing ``XLA_FLAGS`` by hand.
"""

FAST_CPU_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_experimental_ynn_fusion_type=")


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for ``devices`` fake CPU devices with the test environment's compile flags."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *FAST_CPU_FLAGS))
