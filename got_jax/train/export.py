r"""A training run's checkpoint -> converted got-jax folder -> PyTorch (GoT-6B ``.bin`` layout) + PEFT adapter.

    python -m got_jax.train.export --config configs/tiny_test.py --workdir W --out OUT [--step N] \
        [--config.<same overrides as the run>]

writes ``OUT/got-jax`` (a converted folder with the LoRA merged into the projections: ``sample.py --ckpt``
and ``GoTPipeline.from_pretrained`` load it), ``OUT/got_bin`` (``got_jax.convert.export_pytorch --format got_bin``:
``pytorch_model.bin`` with ``mllm.*`` / ``output_projector*`` / ``unet.*`` / ``vae.*``, as GoT-6B ships) and,
with LoRA, ``OUT/peft_adapter`` (``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained`` on transformers' Qwen2.5-VL). The frozen weights come from the run's
``init_from`` (or its seeded random init), the trained ones from the checkpoint step.
"""

from __future__ import annotations

import os
import sys
import tempfile

import jax
from flax import nnx

from got_jax import sharding
from got_jax.convert import export_pytorch
from got_jax.train import checkpointing as ckpt
from got_jax.train import setup
from got_jax.train.step import TrainState, make_tx
from got_jax.train.trainable import frozen_filter, trainable_filter


def restore_trained_model(config, workdir: str, step: int | None = None):
    """(GoT with the trained weights of ``step`` (default: newest), GoT config dict, tokenizer, step), on one device."""
    from got_jax.got.tokenizer import load_tokenizer  # noqa: PLC0415
    from got_jax.train.run import optim_config  # noqa: PLC0415

    config = setup.resolve(config)
    tok_dir = os.path.join(config.init_from, "tokenizer") if config.init_from else None
    tok = load_tokenizer(tok_dir if tok_dir and os.path.isdir(tok_dir) else None)
    got_cfg = setup.got_config(config, tok)
    options = setup.model_options(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = setup.rules(config)
    model = setup.initial_model(config, got_cfg, options, mesh, rules)
    graphdef, state = nnx.split(TrainState(model, make_tx(optim_config(config)), trainable_filter(options)))
    shardings = sharding.state_shardings(state, mesh, rules)
    state = setup.place(state, shardings)
    mgr = ckpt.make_manager(workdir, save_every=1, keep=1, keep_every=0, async_save=False)
    try:
        step = mgr.latest_step() if step is None else int(step)
        if step is None or step not in mgr.all_steps():
            raise ValueError(f"{mgr.directory}: no checkpoint step {step if step is not None else ''} "
                             f"(have {list(mgr.all_steps())})")
        state, _ = ckpt.restore(mgr, step, state, shardings, frozen_filter(options))
    finally:
        mgr.close()
    return nnx.merge(graphdef, state).model, got_cfg, tok, step


def export_run(config, workdir: str, out: str, *, step: int | None = None, fmt: str = "got_bin") -> dict[str, str]:
    """Writes ``out/got-jax``, ``out/<fmt>`` and (LoRA) ``out/peft_adapter``; returns their paths."""
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder  # noqa: PLC0415
    from got_jax.models.qwen2_5_vl.lora import merge_lora, save_peft_adapter  # noqa: PLC0415

    model, got_cfg, tok, step = restore_trained_model(config, workdir, step)
    merged = merge_lora(model) if model.options.lora_rank else model
    paths = {"got-jax": os.path.join(out, "got-jax"), fmt: os.path.join(out, fmt)}
    cfg = {k: v for k, v in got_cfg.items() if k not in ("format", "version", "parts")}
    cfg["param_dtype"] = str(model.options.param_dtype)
    cfg["source"] = {"train_workdir": os.path.abspath(workdir), "step": step}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {n: os.path.join(tmp, n) for n in os.listdir(tmp)}
        write_checkpoint_folder(paths["got-jax"], cfg, pure_tree(merged), files)
    export_pytorch.export(paths["got-jax"], paths[fmt], fmt=fmt)
    if model.options.lora_rank:
        paths["peft_adapter"] = os.path.join(out, "peft_adapter")
        save_peft_adapter(model.reasoner, paths["peft_adapter"])
    return paths


def main(argv):
    from absl import flags  # noqa: PLC0415

    f = flags.FLAGS
    paths = export_run(f.config, f.workdir, f.out, step=f.step, fmt=f.format)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    sys.path.insert(0, os.getcwd())
    config_flags.DEFINE_config_file("config", None, "The run's training config.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's --workdir.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
    flags.DEFINE_enum("format", "got_bin", ["got_bin", "hf"], "PyTorch layout.")
    flags.mark_flags_as_required(["config", "workdir", "out"])
    app.run(main)
