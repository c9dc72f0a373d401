r"""A training run's checkpoint -> converted got-jax folder -> PyTorch (GoT-6B ``.bin`` layout) + PEFT adapter.

    python -m got_jax.train.export --config configs/tiny_test.py --workdir W --out OUT [--step N] \
        [--config.<same overrides as the run>]
    python -m got_jax.train.export --demo --config configs/demo_shapes.py --workdir /tmp/demo_got \
        --config.model.vae_from=/tmp/demo_vae        # only the converted folder, into got_jax/assets/demo

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
    from got_jax.train import tasks  # noqa: PLC0415

    task = tasks.make_task(config, got_cfg, tok, options)
    if task.name != "got":
        raise ValueError(f"--config.stage={config.stage!r} trains {task.name}, not GoT: nothing to export as a GoT "
                         "(its workdir is a --config.model.vae_from source)")
    model = task.initial_model(mesh, rules)  # frozen weights: init_from / seeded random init / vae_from
    graphdef, state = nnx.split(TrainState(model, make_tx(optim_config(config)), task.trainable))
    shardings = sharding.state_shardings(state, mesh, rules)
    state = setup.place(state, shardings)
    mgr = ckpt.make_manager(workdir, save_every=1, keep=1, keep_every=0, async_save=False)
    try:
        step = mgr.latest_step() if step is None else int(step)
        if step is None or step not in mgr.all_steps():
            raise ValueError(f"{mgr.directory}: no checkpoint step {step if step is not None else ''} "
                             f"(have {list(mgr.all_steps())})")
        state, _ = ckpt.restore(mgr, step, state, shardings, task.frozen)
    finally:
        mgr.close()
    return nnx.merge(graphdef, state).model, got_cfg, tok, step


def export_folder(config, workdir: str, out: str, *, step: int | None = None, merge: bool = True,
                  overwrite: bool = False) -> str:
    """Writes the converted got-jax folder of a run's checkpoint (LoRA merged) to ``out``; returns ``out``.

    Its config.json records ``source`` (workdir, step), the run's ``ablation`` switches, the
    ``sampling_defaults`` a model trained under them must be sampled with (``no_chain`` / ``zero_layout``;
    :func:`got_jax.got.demo.load_demo` passes them on) and ``reasoner_source_size``, the reasoner's view of an
    editing source in training (``data.reasoner_size``), which :meth:`GoTPipeline.from_pretrained` samples with.
    Weights stay float32 (the demo is ~7 MB so).
    """
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder  # noqa: PLC0415
    from got_jax.models.qwen2_5_vl.lora import merge_lora  # noqa: PLC0415
    from got_jax.train import tasks  # noqa: PLC0415

    model, got_cfg, tok, step = restore_trained_model(config, workdir, step)
    merged = merge_lora(model) if model.options.lora_rank else model
    cfg = {k: v for k, v in got_cfg.items() if k not in ("format", "version", "parts")}
    cfg["param_dtype"] = str(model.options.param_dtype)
    cfg["source"] = {"train_workdir": os.path.abspath(workdir), "step": step}
    resolved = setup.resolve(config)
    cfg["ablation"] = tasks.ablation(resolved)
    cfg["sampling_defaults"] = tasks.sampling_defaults(resolved)
    # the reasoner's view of an editing source in training: sampling must use the same (GoTPipeline.from_pretrained)
    cfg["reasoner_source_size"] = int(resolved.data.reasoner_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {n: os.path.join(tmp, n) for n in os.listdir(tmp)}
        write_checkpoint_folder(out, cfg, pure_tree(merged), files, overwrite=overwrite)
    return out


def export_run(config, workdir: str, out: str, *, step: int | None = None, fmt: str = "got_bin") -> dict[str, str]:
    """Writes ``out/got-jax``, ``out/<fmt>`` and (LoRA) ``out/peft_adapter``; returns their paths."""
    from got_jax.models.qwen2_5_vl.lora import save_peft_adapter  # noqa: PLC0415

    paths = {"got-jax": os.path.join(out, "got-jax"), fmt: os.path.join(out, fmt)}
    export_folder(config, workdir, paths["got-jax"], step=step)
    export_pytorch.export(paths["got-jax"], paths[fmt], fmt=fmt)
    options = setup.model_options(setup.resolve(config))
    if options.lora_rank:
        model, _, _, _ = restore_trained_model(config, workdir, step)
        paths["peft_adapter"] = os.path.join(out, "peft_adapter")
        save_peft_adapter(model.reasoner, paths["peft_adapter"])
    return paths


def main(argv):
    from absl import flags  # noqa: PLC0415

    from got_jax.cli import fewer_gc_passes  # noqa: PLC0415

    fewer_gc_passes()

    f = flags.FLAGS
    if f.demo:
        from got_jax.got.demo import DEMO_DIR  # noqa: PLC0415

        print(f"demo: {export_folder(f.config, f.workdir, f.out or DEMO_DIR, step=f.step, overwrite=True)}")
        return
    if not f.out:
        raise app.UsageError("--out is required (or --demo)")
    paths = export_run(f.config, f.workdir, f.out, step=f.step, fmt=f.format)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    sys.path.insert(0, os.getcwd())
    config_flags.DEFINE_config_file("config", None, "The run's training config.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's --workdir.")
    flags.DEFINE_string("out", None, "Output folder (--demo: default got_jax/assets/demo).")
    flags.DEFINE_bool("demo", False, "Write only the converted folder (the shipped demo: sample.py's default model).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
    flags.DEFINE_enum("format", "got_bin", ["got_bin", "hf"], "PyTorch layout.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
