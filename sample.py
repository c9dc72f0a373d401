r"""Sample GoT: prompts (and source images) -> reasoning chains, layouts and images.

Converted GoT-6B weights (see README, "Convert the released weights"):

    python sample.py --ckpt /ckpt/got6b-jax --prompt "two red circles to the left of a blue square" --outdir out
    python sample.py --ckpt /ckpt/got6b-jax --prompt "make the sky purple" --image photo.jpg --outdir out \
        --config.guidance_scale=4.0 --config.layout_guidance_scale=3.0 --config.image_guidance_scale=1.5
    python sample.py --ckpt /ckpt/got6b-jax --prompts_file prompts.txt --outdir out --config.mesh_shape="(1,-1,1)"

Interactive generation: ``--got_text`` (or ``--got_text_file``, one file per prompt) paints your own plan instead of a
sampled one; ``--only_return_got`` writes the chains without painting (edit them, pass them back).

Without weights, ``--demo`` runs a tiny random-weight GoT end to end (chains and images are noise).

Per prompt ``i`` the output folder gets ``{i:05d}.png`` (the image), ``{i:05d}_got.txt`` (the chain),
``{i:05d}_layout.png`` (the image with the plan's boxes, then one canvas per painted box) and, for
all prompts, ``grid.png``. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "sample.py"), "Sampling config file.")
_CKPT = flags.DEFINE_string("ckpt", None, "Converted GoT folder (convert/got_checkpoint.py output).")
_DEMO = flags.DEFINE_bool("demo", False, "Use a tiny random-weight GoT (no weights needed; output is noise).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption (T2I) or instruction (with --image); repeatable.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file with one prompt per line (output NNNNN is line "
                                    "NNNNN+1; blank lines are an error).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Source image per prompt for editing (repeat in prompt order); the "
                                   "edited image is resized back to the source's aspect ratio.")
_GOT_TEXT = flags.DEFINE_multi_string("got_text", [], "Interactive: a GoT plan per prompt to paint instead of sampling.")
_GOT_TEXT_FILE = flags.DEFINE_multi_string("got_text_file", [], "Interactive: a file holding one prompt's GoT plan "
                                           "(e.g. an edited NNNNN_got.txt); repeat in prompt order.")
_ONLY_GOT = flags.DEFINE_bool("only_return_got", False, "Write the reasoning chains only (no diffusion).")
_OUTDIR = flags.DEFINE_string("outdir", "out", "Output folder.")


def _lines(path: str) -> list[str]:
    """One prompt per line; output ``NNNNN`` is line ``NNNNN + 1``, so blank lines inside are an error."""
    try:
        with open(path) as f:
            lines = [ln.rstrip("\r\n") for ln in f]
    except OSError as e:
        raise app.UsageError(f"cannot read {path}: {e}") from None
    while lines and not lines[-1].strip():  # trailing blank lines end the file
        lines.pop()
    blank = [n + 1 for n, ln in enumerate(lines) if not ln.strip()]
    if blank:
        raise app.UsageError(f"{path}: line(s) {blank[:5]} are blank; outputs are numbered by line, so remove the "
                             f"blank lines (or put a prompt on them)")
    return lines


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().rstrip("\n")
    except OSError as e:
        raise app.UsageError(f"cannot read {path}: {e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode of a new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _open_images(paths: list[str]):
    """Reads every --image before any model is loaded (a bad path fails in seconds, not after loading)."""
    from PIL import Image  # noqa: PLC0415

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--image {p}: cannot read image file ({type(e).__name__}: {e})") from None
    return out


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


def _grid(images):
    from PIL import Image  # noqa: PLC0415

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from got_jax import sharding  # noqa: PLC0415
    from got_jax.got.layout import layout_grid, painted_boxes, render_layout_canvases  # noqa: PLC0415
    from got_jax.models.options import ModelOptions  # noqa: PLC0415

    if _DEMO.value == bool(_CKPT.value):
        raise app.UsageError("give exactly one of --ckpt DIR (converted GoT weights) or --demo")
    cfg = _CONFIG.value
    if _DEMO.value and not flags.FLAGS["config"].present:
        sys.path.insert(0, str(ROOT))
        from configs import sample_demo  # noqa: PLC0415

        cfg = sample_demo.get_config()
        for name in flags.FLAGS:  # keep --config.<field>=... overrides on top of the demo defaults
            if name.startswith("config.") and flags.FLAGS[name].present:
                field = name[len("config."):]
                setattr(cfg, field, getattr(_CONFIG.value, field))
    prompts = list(_PROMPT.value) + (_lines(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else [])
    if not prompts:
        raise app.UsageError("no prompts: pass --prompt (repeatable) or --prompts_file")
    images = list(_IMAGE.value)
    if images and len(images) != len(prompts):
        raise app.UsageError(f"{len(images)} --image for {len(prompts)} prompts: give one source image per prompt")
    plans = list(_GOT_TEXT.value) + [_read(p) for p in _GOT_TEXT_FILE.value]
    if plans and len(plans) != len(prompts):
        raise app.UsageError(f"{len(plans)} GoT texts for {len(prompts)} prompts")
    _check_config(cfg, paint=not _ONLY_GOT.value)
    images = _open_images(images)

    # the shardings are built once, here, from the config: mesh shape and logical-axis rules
    mesh = sharding.make_mesh(tuple(cfg.mesh_shape)) if len(cfg.mesh_shape) else None
    rules = tuple(tuple(r) for r in cfg.rules) if mesh is not None else None
    dtype = jnp.dtype(cfg.dtype)
    attention = cfg.get("attention", "auto")  # configs/sample.py: auto | xla | cudnn | pallas
    if _DEMO.value:
        from got_jax.got.demo import demo_pipeline  # noqa: PLC0415

        logging.warning("--demo: a tiny GoT with RANDOM weights; its chains and images are noise. Convert GoT-6B "
                        "weights (README) and pass --ckpt to sample for real.")
        print("demo: tiny random-weight GoT (no trained weights yet); chains and images are noise")
        pipe = demo_pipeline(options=ModelOptions(dtype=dtype, attention_impl=attention), mesh=mesh, rules=rules)
        pipe.max_boxes = cfg.max_boxes
    else:
        from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415
        from got_jax.got.pipeline import GoTPipeline  # noqa: PLC0415

        # compute in cfg.dtype; parameters keep the checkpoint's dtype
        opts = ModelOptions(dtype=dtype, attention_impl=attention,
                            param_dtype=read_config(_CKPT.value).get("param_dtype") or "float32")
        pipe = GoTPipeline.from_pretrained(_CKPT.value, mesh=mesh, rules=rules, options=opts, max_boxes=cfg.max_boxes)

    out = Path(_OUTDIR.value)
    out.mkdir(parents=True, exist_ok=True)
    bs = max(1, int(cfg.batch_size))
    finals = []
    where = f"{len(prompts)} prompt(s) on {jax.device_count()} {jax.default_backend()} device(s), {cfg.dtype} compute"
    if _ONLY_GOT.value:
        print(f"{where}; reasoning chains only (--only_return_got: nothing is painted)")
    else:
        print(f"{where}; {cfg.height}x{cfg.width}, {cfg.num_inference_steps} {cfg.scheduler} steps"
              + ("; edited images are resized back to each source's aspect ratio" if images else ""))
    if cfg.dtype != "float32":
        print(f"note: {cfg.dtype} compute; --config.dtype=float32 reproduces the released PyTorch numbers "
              f"(chains in {cfg.dtype} can differ)")
    for start in tqdm(range(0, len(prompts), bs), desc="sampling", unit="batch"):
        idx = list(range(start, min(start + bs, len(prompts))))
        res = pipe([prompts[i] for i in idx], images=[images[i] for i in idx] if images else None,
                   got_texts=[plans[i] for i in idx] if plans else None, height=cfg.height, width=cfg.width,
                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   layout_guidance_scale=cfg.layout_guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
                   seed=[cfg.seed + i for i in idx], scheduler=cfg.scheduler, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, max_rounds=cfg.max_rounds, only_return_got=_ONLY_GOT.value,
                   progress=True)
        for j, i in enumerate(idx):
            stem = f"{i:05d}"
            _atomic(out / f"{stem}_got.txt", lambda p, t=res.got_texts[j]: Path(p).write_text(t + "\n"))
            img = res.images[j]
            if img is None:
                continue
            _atomic(out / f"{stem}.png", lambda p, im=img: im.save(p, format="PNG"))
            boxes = painted_boxes(res.plans[j])
            canv = render_layout_canvases(boxes, img.size[1], img.size[0], max_boxes=cfg.max_boxes)
            grid = layout_grid(canv, res.overlay(j))
            _atomic(out / f"{stem}_layout.png", lambda p, g=grid: g.save(p, format="PNG"))
            finals.append(img)
            flag = " (chain ended before <|im_gen_start|>; appended)" if res.forced_image_start[j] else ""
            print(f"[{stem}] {prompts[i]!r}: {len(res.plans[j])} box(es){flag}")
    if finals:
        _atomic(out / "grid.png", lambda p: _grid(finals).save(p, format="PNG"))
    print(f"wrote {out}/ ({len(finals)} image(s))")


if __name__ == "__main__":
    app.run(main)
