r"""Sample GoT: prompts (and source images) -> reasoning chains, layouts and images.

Converted GoT-6B weights (see README, "Convert the released weights"):

    python sample.py --ckpt /ckpt/got6b-jax --prompt "two red circles to the left of a blue square" --outdir out
    python sample.py --ckpt /ckpt/got6b-jax --prompt "make the sky purple" --image photo.jpg --outdir out \
        --config.guidance_scale=4.0 --config.layout_guidance_scale=3.0 --config.image_guidance_scale=1.5
    python sample.py --ckpt /ckpt/got6b-jax --prompts_file prompts.jsonl --outdir out --config.mesh_shape="(-1,1,1)"

Interactive generation: ``--got_text`` (or ``--got_text_file``, one file per prompt) paints your own plan instead of a
sampled one; ``--only_return_got`` writes the chains without painting (edit them, pass them back).

Batch runs (got_jax/sampling): ``--prompts_file`` is plain text (one prompt per line) or JSONL (``prompt``, optional
``image``, ``got_text``, ``seed``, ``id``). Outputs are named by id (default: the row number ``NNNNN``) and written
atomically; one record per item goes to ``records.jsonl``; a rerun skips complete items (``--overwrite`` samples all
again) and refuses other settings in the same folder. A bad row is recorded as failed and skipped. The batch is split
over the mesh's data axes; with several processes (``--distributed``) each samples its own share of the rows.

Without ``--ckpt`` it samples the demo GoT shipped in the package (``got_jax/assets/demo``: a small GoT trained by
``train.py --config configs/demo_shapes.py`` on the synthetic shapes world; defaults ``configs/sample_demo.py``):

    python sample.py --prompt "two red circles to the left of a blue square" --outdir out

``--random_weights`` (tests, smoke runs) samples a tiny random-weight GoT instead: its chains and images are noise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from got_jax.cli import absl_main  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "sample.py"), "Sampling config file.")
_CKPT = flags.DEFINE_string("ckpt", None, "Converted GoT folder (convert/got_checkpoint.py output); without it, the "
                            "demo GoT shipped in the package (got_jax/assets/demo).")
_RANDOM = flags.DEFINE_bool("random_weights", False, "Tests / smoke runs: a tiny random-weight GoT instead of the "
                            "shipped demo (its chains and images are noise).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption (T2I) or instruction (with --image); repeatable.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts: *.jsonl (one JSON object per line: prompt, "
                                    "image, got_text, seed, id) or plain text (one prompt per line; output NNNNN is "
                                    "line NNNNN+1; blank lines are an error).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Source image per --prompt for editing (repeat in prompt order); the "
                                   "edited image is resized back to the source's aspect ratio.")
_GOT_TEXT = flags.DEFINE_multi_string("got_text", [], "Interactive: a GoT plan per prompt to paint instead of sampling.")
_GOT_TEXT_FILE = flags.DEFINE_multi_string("got_text_file", [], "Interactive: a file holding one prompt's GoT plan "
                                           "(e.g. an edited NNNNN_got.txt); repeat in prompt order.")
_ONLY_GOT = flags.DEFINE_bool("only_return_got", False, "Write the reasoning chains only (no diffusion).")
_OUTDIR = flags.DEFINE_string("outdir", "out", "Output folder.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Sample every item again (complete ones are skipped otherwise) "
                               "and allow other settings than the folder's run.json.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (TPU pods: automatic); each "
                                 "process samples its own share of the prompts on its local devices.")
_COORD = flags.DEFINE_string("coordinator_address", None, "With --distributed off a pod: host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "With --coordinator_address: the number of processes.")
_PROC_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().rstrip("\n")
    except OSError as e:
        raise app.UsageError(f"--got_text_file {path}: cannot read ({e.strerror or e})") from None


def _check_config(cfg, paint: bool) -> None:
    """Cheap checks of the sampling config, before the model loads or any chain is generated."""
    from got_jax.diffusion.schedulers import make_scheduler  # noqa: PLC0415
    from got_jax.got.demo import SDXL_SCHEDULER  # noqa: PLC0415

    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise app.UsageError(f"--config.dtype={cfg.dtype!r}: expected float32, bfloat16 or float16")
    if not paint:  # --only_return_got: no diffusion settings are used
        return
    if int(cfg.num_inference_steps) < 1:
        raise app.UsageError(f"--config.num_inference_steps={cfg.num_inference_steps}: must be >= 1")
    try:
        make_scheduler(cfg.scheduler, dict(SDXL_SCHEDULER), int(cfg.num_inference_steps))
    except ValueError as e:
        raise app.UsageError(f"--config.scheduler={cfg.scheduler!r}: {e}") from None
    for name in ("height", "width"):
        v = int(getattr(cfg, name))
        if v <= 0 or v % 32:
            raise app.UsageError(f"--config.{name}={v}: must be a positive multiple of 32 (VAE factor 8 x "
                                 f"UNet down-sampling 4)")


def _config():
    cfg = _CONFIG.value
    if not _CKPT.value and not flags.FLAGS["config"].present:  # the shipped demo or random weights
        from configs import sample_demo  # noqa: PLC0415

        cfg = sample_demo.get_config()
        for name in flags.FLAGS:  # keep --config.<field>=... overrides on top of the demo defaults
            if name.startswith("config.") and flags.FLAGS[name].present:
                field = name[len("config."):]
                setattr(cfg, field, getattr(_CONFIG.value, field))
    return cfg


def _items(cfg):
    """The run's items: --prompt flags (checked strictly: a bad flag is a usage error), then the file's rows."""
    from got_jax.sampling import items as it  # noqa: PLC0415

    prompts, images = list(_PROMPT.value), list(_IMAGE.value)
    plans = list(_GOT_TEXT.value) + [_read(p) for p in _GOT_TEXT_FILE.value]
    jsonl = bool(_PROMPTS_FILE.value) and _PROMPTS_FILE.value.endswith(".jsonl")
    if jsonl and (images or plans):
        raise app.UsageError("--image / --got_text go with --prompt; in a JSONL prompts file give each row its "
                             "'image' / 'got_text'")
    out = it.flag_items(prompts, [], [], int(cfg.seed))
    if _PROMPTS_FILE.value:
        try:
            out += it.read_prompts_file(_PROMPTS_FILE.value, first_index=len(out), base_seed=int(cfg.seed))
        except it.PromptsFileError as e:
            raise app.UsageError(str(e)) from None
    if not out:
        raise app.UsageError("no prompts: pass --prompt (repeatable) or --prompts_file")
    for name, given in (("--image", images), ("GoT texts (--got_text / --got_text_file)", plans)):
        if given and len(given) != len(out):
            raise app.UsageError(f"{len(given)} {name} for {len(out)} prompts: give one per prompt")
    for k, item in enumerate(out):
        if images:
            item.image = images[k]
            try:
                it.load_image(images[k])  # a bad path fails in seconds, not after loading the model
            except ValueError as e:
                raise app.UsageError(f"--image {images[k]}: {e}") from None
        if plans:
            item.got_text = plans[k]
        if item.where.startswith("--prompt"):
            err = it.check_item(item, int(cfg.max_boxes))
            if err:
                raise app.UsageError(err)
    it.find_duplicates(out)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _RANDOM.value and _CKPT.value:
        raise app.UsageError("give at most one of --ckpt DIR (converted GoT weights) or --random_weights")
    if not _CKPT.value and not _RANDOM.value:
        from got_jax.got.demo import DEMO_DIR  # noqa: PLC0415

        if not os.path.isfile(os.path.join(DEMO_DIR, "config.json")):
            raise app.UsageError(f"no --ckpt and no demo GoT weights in {DEMO_DIR} (config.json missing): pass "
                                 "--ckpt DIR (converted weights), or train and export the demo (configs/demo_shapes.py)")
    import jax  # noqa: PLC0415

    if _DISTRIBUTED.value or _COORD.value:
        jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value,
                                   process_id=_PROC_ID.value)
    cfg = _config()
    if cfg.get("compilation_cache_dir"):  # reruns load their compiled programs instead of compiling again
        jax.config.update("jax_compilation_cache_dir", str(cfg.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    items = _items(cfg)
    _check_config(cfg, paint=not _ONLY_GOT.value)
    import jax.numpy as jnp  # noqa: PLC0415

    from got_jax import sharding  # noqa: PLC0415
    from got_jax.models.options import ModelOptions  # noqa: PLC0415
    from got_jax.sampling import items as it  # noqa: PLC0415
    from got_jax.sampling import runner  # noqa: PLC0415

    pi, pc = jax.process_index(), jax.process_count()
    if _RANDOM.value:
        checkpoint = "random weights (tiny GoT)"
    elif _CKPT.value:
        checkpoint = os.path.abspath(_CKPT.value)
    else:
        checkpoint = "demo (got_jax/assets/demo)"
    param_dtype = None
    if _CKPT.value:
        from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415

        param_dtype = read_config(_CKPT.value).get("param_dtype") or "float32"  # a wrong --ckpt fails here
    kw = dict(only_return_got=_ONLY_GOT.value, max_new_tokens=int(cfg.max_new_tokens),
              temperature=float(cfg.temperature), max_rounds=int(cfg.max_rounds))
    if not _ONLY_GOT.value:
        kw.update(height=int(cfg.height), width=int(cfg.width), num_inference_steps=int(cfg.num_inference_steps),
                  guidance_scale=float(cfg.guidance_scale), layout_guidance_scale=float(cfg.layout_guidance_scale),
                  image_guidance_scale=float(cfg.image_guidance_scale), scheduler=str(cfg.scheduler))
    settings = dict(kw, dtype=str(cfg.dtype), max_boxes=int(cfg.max_boxes), checkpoint=checkpoint)
    out = runner.check_outdir(_OUTDIR.value)  # before any model work
    runner.prepare_outdir(out, settings, overwrite=_OVERWRITE.value, writer=pi == 0)
    if pc > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("got_jax_sample_outdir_ready")  # run.json / old records settled
    mine = it.shard(items, pi, pc)
    where = f"process {pi}/{pc}: " if pc > 1 else ""
    done = set() if _OVERWRITE.value else runner.completed_ids(out, mine, _ONLY_GOT.value)
    pending = [x for x in mine if x.error or x.id not in done]
    if not pending:
        print(f"{where}all {len(mine)} item(s) already complete in {out}/ (--overwrite samples them again)")
        return

    # the shardings are built once, here, from the config: mesh shape (over this process's devices) and rules
    mesh = sharding.make_mesh(tuple(cfg.mesh_shape), devices=jax.local_devices()) if len(cfg.mesh_shape) else None
    rules = tuple(tuple(r) for r in cfg.rules) if mesh is not None else None
    data_size = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
    dtype = jnp.dtype(cfg.dtype)
    attention = cfg.get("attention", "auto")  # configs/sample.py: auto | xla | cudnn | pallas
    if _RANDOM.value:
        from got_jax.got.demo import demo_pipeline  # noqa: PLC0415

        print("random weights: a tiny random-weight GoT; its chains and images are noise")
        pipe = demo_pipeline(options=ModelOptions(dtype=dtype, attention_impl=attention), mesh=mesh, rules=rules)
        pipe.max_boxes = cfg.max_boxes
    elif not _CKPT.value:
        from got_jax.got.demo import load_demo  # noqa: PLC0415
        from got_jax.got.pipeline import GUIDANCE_SCALES  # noqa: PLC0415

        pipe, demo_kw = load_demo(mesh=mesh, rules=rules, options=ModelOptions(dtype=dtype, attention_impl=attention),
                                  max_boxes=cfg.max_boxes)
        if not _ONLY_GOT.value:  # the ablation flags a demo folder records (its guidance scales: configs/sample_demo.py)
            kw.update({k: v for k, v in demo_kw.items() if k not in ("height", "width", *GUIDANCE_SCALES)})
        else:
            kw.update({k: v for k, v in demo_kw.items() if k == "no_chain"})
        print("demo: the small GoT trained on the synthetic shapes world (got_jax/assets/demo; see its README.md); "
              "it knows circles, squares and triangles in 6 colours, not the open world")
    else:
        from got_jax.got.pipeline import GoTPipeline  # noqa: PLC0415

        opts = ModelOptions(dtype=dtype, attention_impl=attention, param_dtype=param_dtype)  # params as stored
        pipe = GoTPipeline.from_pretrained(_CKPT.value, mesh=mesh, rules=rules, options=opts, max_boxes=cfg.max_boxes)

    devices = f"{len(jax.local_devices())} {jax.default_backend()} device(s)"
    banner = f"{where}{len(mine)} prompt(s) on {devices}, {cfg.dtype} compute"
    if _ONLY_GOT.value:
        print(f"{banner}; reasoning chains only (--only_return_got: nothing is painted)")
    else:
        print(f"{banner}; {cfg.height}x{cfg.width}, {cfg.num_inference_steps} {cfg.scheduler} steps"
              + ("; edited images are resized back to each source's aspect ratio" if any(x.image for x in mine) else ""))
    if cfg.dtype != "float32":
        print(f"note: {cfg.dtype} compute; --config.dtype=float32 reproduces the released PyTorch numbers "
              f"(chains in {cfg.dtype} can differ)")
    run = runner.Runner(pipe, out, call_kwargs=kw, settings=settings, checkpoint=checkpoint,
                        batch_size=int(cfg.batch_size), data_size=data_size, max_boxes=int(cfg.max_boxes),
                        process_index=pi, process_count=pc, progress=pc == 1)
    if run.batch != int(cfg.batch_size):
        print(f"note: batch of {run.batch} (--config.batch_size={cfg.batch_size} rounded up to a multiple of the "
              f"{data_size} devices on the mesh's data axes)")
    summary = run.run(mine, overwrite=_OVERWRITE.value)
    if summary.finals:
        name = "grid.png" if pc == 1 else f"grid-{pi:05d}-of-{pc:05d}.png"
        runner.atomic_write(out / name, lambda p: runner.grid_image([im for _, im in summary.finals]).save(
            p, format="PNG"))
    print(f"{where}{summary.line()}; records in {out / runner.records_name(pi, pc)}")
    print(f"{where}{summary.throughput()}")
    print(f"wrote {out}/ ({summary.images} image(s))")
    if summary.done + summary.skipped == 0:
        sys.exit(1)  # nothing could be done: every item failed (see the records)


if __name__ == "__main__":
    app.run(absl_main(main, "sample.py"))
