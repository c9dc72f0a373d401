r"""Train GoT: ``python train.py --config configs/<name>.py --workdir DIR [--config.<field>=...]``.

    python train.py --config configs/tiny_test.py --workdir /tmp/tiny \
        --config.data.sources="file:/tmp/shapes/annotations/generation.jsonl@shapes"        # CPU, seconds
    python train.py --config configs/got_6b.py --workdir gs://bucket/got6b \
        --config.init_from=/ckpt/got6b-init --config.stage=pretrain            # TPU pod, every host

Runs again in the same ``--workdir`` resume from the newest complete checkpoint. The run's logic lives in
``got_jax/train/run.py`` (importable, tested); this file parses flags, starts JAX's distributed runtime
(always: Orbax's SIGTERM handling needs it) and calls :func:`got_jax.train.run.train_and_evaluate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent))  # configs/ importable from anywhere

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics go here.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                             "outside a TPU pod; pods are detected automatically).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None, "CPU only: fake this many devices per process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax  # noqa: PLC0415

    from got_jax.cli import fewer_gc_passes  # noqa: PLC0415

    fewer_gc_passes()
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    from got_jax.train import run  # noqa: PLC0415
    from got_jax.train.setup import ConfigError  # noqa: PLC0415

    run.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    try:
        out = run.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        logging.error("%s", e)
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    logging.info("done: step %d%s", out["step"], " (preempted)" if out["preempted"] else "")
    return 0


if __name__ == "__main__":
    app.run(main)
