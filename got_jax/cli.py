"""Shared conventions of the command-line entry points (``sample.py``, ``got_jax.convert.*``).

* An error reaches the user as one line, ``<program>: error: <what and where>``, on stderr, and the exit
  status is :data:`USAGE_ERROR` (2, as for a bad flag); ``--verbosity=1`` (or higher) shows the traceback.
* Python's cyclic garbage collector runs less often (:func:`fewer_gc_passes`): tracing a model allocates
  millions of short-lived objects, and a launch spent ~10% of its time in the collector.
* The console keeps to what the user needs: library INFO logging (Orbax logs a dozen lines per
  checkpoint read or write) is off unless ``--verbosity`` asks for it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

USAGE_ERROR = 2
QUIET_LOGGERS = ("absl", "orbax", "jax._src.distributed", "jax._src.compilation_cache")


def fewer_gc_passes() -> None:
    """A young-generation collection every 100,000 net allocations instead of 700 (the older generations as
    before, relative to it). Tracing JAX programs makes and drops Python objects by the million; at the default
    (perf: ``gc_collect_main``) a warm launch of the tiny training run spent ~5 s of ~45 s in the collector and
    ``sample.py --demo`` 1-4 s of ~30 s. Memory held between collections stays small (100,000 small objects)."""
    gc.set_threshold(100_000, 50, 50)


def one_line(e: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with ' | ')."""
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (OSError, KeyError)) and not str(e).startswith(type(e).__name__):
        msg = f"{type(e).__name__}: {msg}"
    return " | ".join(ln.strip() for ln in msg.splitlines() if ln.strip())


def report(prog: str, e: BaseException) -> int:
    """Prints the one-line error for ``e`` and returns :data:`USAGE_ERROR`."""
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
    print(f"{prog}: (--verbosity=1 shows the traceback; --help lists the flags)", file=sys.stderr, flush=True)
    return USAGE_ERROR


def quiet_logging(verbosity: int) -> None:
    """Library INFO logs off at the default verbosity (0); all of them at 1 and above."""
    level = logging.INFO if verbosity >= 1 else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbosity < 1:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def absl_main(main, prog: str):
    """Wraps an absl ``main(argv)``: one-line errors with :data:`USAGE_ERROR` unless ``--verbosity >= 1``."""

    def wrapped(argv):
        from absl import flags  # noqa: PLC0415
        from absl import logging as absl_logging  # noqa: PLC0415

        fewer_gc_passes()
        verbosity = flags.FLAGS.verbosity
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        quiet_logging(verbosity)
        try:
            return main(argv)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the point: one line, not a traceback
            if verbosity >= 1:
                raise
            sys.exit(report(prog, e))

    return wrapped
