"""GoT sampling: prompt (+ image) -> reasoning chain with boxes -> guided SDXL diffusion -> image.

:class:`GoTPipeline` follows the released ``GenCot.generate`` step by step (see
``../shared/reference/GOT_SYSTEM.md``) and adds batching:

1. **Reason.** Each prompt goes through the Qwen2.5-VL chat template (T2I or edit wording; for
   editing the source image, resized to 448x448 bicubic, comes first). All prompts decode together
   (left padding, one compiled program) until ``<|im_gen_start|>``, ``<|vision_start|>`` or
   ``<|endoftext|>``. Interactive generation skips this: the caller's GoT text is appended instead.
2. **Guide.** The 64 ``<|im_gen_NNNN|>`` query tokens are appended and one forward pass gives their
   last hidden states -> context / null context / pooled embeds (:meth:`GoT.semantic_guidance`);
   the boxes of this round's text are painted one canvas per box and VAE-encoded (mean of modes);
   the reference is the source image (or, for T2I, a black image) encoded at the output size.
3. **Paint.** One jit-compiled program per shape runs the whole ``lax.fori_loop`` of the scheduler
   with the four-way guidance (one UNet call on a batch of ``4 * prompts`` per step) and the VAE
   decode. Outputs are resized to the source aspect ratio (short side = output size).
4. **Multi-turn.** With ``max_rounds > 1`` a prompt keeps reasoning after its image; a
   ``<|vision_start|>`` feeds the last generated image back to the reasoner (448x448, its
   ``<|image_pad|>`` tokens appended) and the next ``<|im_gen_start|>`` paints again with the last
   image as the reference, as released.

Randomness: per-prompt integer seeds. The initial latent of prompt ``b`` is
``normal(fold_in(key(seed_b), 0))`` and the variance noise of step ``i`` is
``normal(fold_in(key(seed_b), i + 1))``, so a prompt's image does not depend on its batch mates.
``noise=`` overrides both draws (used by the parity tests to feed PyTorch's draws).

Documented behaviour on edge cases: a plan with no coloured box is painted with one all-black
layout canvas (as released); coordinates outside 0..1000 are clamped (the pixels PIL would paint);
unknown colour names fall back to white (:func:`got_jax.got.text.parse_got`); a chain that ends
(``<|endoftext|>`` or ``max_new_tokens``) before ``<|im_gen_start|>`` and has no image yet gets
``<|im_gen_start|>`` appended so every prompt yields an image (``GoTOutput.forced_image_start``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from got_jax import sharding
from got_jax.diffusion.schedulers import make_scheduler
from got_jax.got.layout import draw_overlay, painted_boxes, render_layout_canvases, to_model_range
from got_jax.got.model import GoT
from got_jax.got.text import Box, parse_got
from got_jax.got.tokenizer import REASONER_IMAGE_SIZE, got_token_ids, load_tokenizer, prompt_ids, reasoner_image
from got_jax.models.qwen2_5_vl import processing
from got_jax.models.qwen2_5_vl.generate import Sampler, forward_hidden

log = logging.getLogger(__name__)

SOURCE_SIZE = REASONER_IMAGE_SIZE  # the reasoner sees source / fed-back images at 448x448 (bicubic)
LENGTH_BUCKET = 32  # prompt lengths are left-padded to a multiple of this (fewer recompiles)
# GoTPipeline.__call__'s three guidance keywords (text g, layout c, reference i); a model folder's config.json may
# record its own under sampling_defaults (got_jax.train.tasks.sampling_defaults)
GUIDANCE_SCALES = ("guidance_scale", "layout_guidance_scale", "image_guidance_scale")
STRIP_TOKENS = ("<|endoftext|>", "<|im_gen_end|>", "<|vision_start|>", "<|vision_end|>")


@dataclasses.dataclass
class GoTOutput:
    """What one :meth:`GoTPipeline.__call__` returns, one entry per prompt.

    ``images``: the last image of each prompt (PIL, resized to the source aspect ratio) or None
    (``only_return_got``); ``all_images``: every image of each prompt (multi-turn);
    ``got_texts``: the reasoning chain as released (generated text with ``<|endoftext|>``,
    ``<|im_gen_end|>``, ``<|vision_start|>``, ``<|vision_end|>`` removed); ``plans``: the parsed
    boxes painted in the last image; ``token_ids``: the full token sequence (prompt + chain).
    ``intermediates`` (with ``return_intermediates=True``): per prompt and image, numpy arrays
    ``hidden`` (64, D), ``layout_latents`` / ``reference_latents`` (h, w, 4) and ``image`` (H, W, 3)
    float in [0, 1] before the final resize.
    """

    got_texts: list[str]
    images: list[Image.Image | None]
    all_images: list[list[Image.Image]]
    plans: list[list[Box]]
    token_ids: list[np.ndarray]
    forced_image_start: list[bool]
    intermediates: list[list[dict[str, np.ndarray]]] | None = None

    def overlay(self, i: int = 0) -> Image.Image:
        """Prompt ``i``'s last image with its plan's boxes and labels drawn on it."""
        if self.images[i] is None:
            raise ValueError(f"prompt {i} has no image (only_return_got?)")
        return draw_overlay(self.images[i], self.plans[i])


@dataclasses.dataclass
class _Row:
    """Per-prompt state across rounds."""

    ids: list[int]
    vision: list[tuple[np.ndarray, np.ndarray]]  # (pixel_values, grid_thw) of the images in ``ids``
    source: Image.Image | None
    reference: Image.Image | None  # image the VAE encodes as G_r (source, then last generated image)
    seed: int
    plan_text: str | None  # interactive: the caller's GoT text for the first round
    got_text: str = ""
    round_text: str = ""
    images: list[Image.Image] = dataclasses.field(default_factory=list)
    intermediates: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    plan: list[Box] = dataclasses.field(default_factory=list)
    forced: bool = False
    done: bool = False


def load_image_processor(folder: str | os.PathLike | None, reasoner_cfg=None):
    """transformers' Qwen2.5-VL image processor from ``preprocessor_config.json`` in ``folder`` (min/max
    pixels, patch / merge / temporal sizes), falling back to the reasoner's vision config and the
    released defaults."""
    kw: dict[str, Any] = {}
    if reasoner_cfg is not None and reasoner_cfg.vision is not None:
        v = reasoner_cfg.vision
        kw.update(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    path = os.path.join(os.fspath(folder), "preprocessor_config.json") if folder is not None else None
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            pc = json.load(f)
        for key in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
            if key in pc:
                kw[key] = pc[key]
    return processing.make_image_processor(**kw)


def _open_image(img, what: str) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"{what}: expected a uint8 (H, W, 3) array, got {img.dtype} {img.shape}")
        return Image.fromarray(img)
    if isinstance(img, (str, os.PathLike)):
        try:
            with Image.open(img) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"{what}: cannot read image file {os.fspath(img)!r} ({type(e).__name__}: {e})") from None
    raise TypeError(f"{what}: expected a PIL image, uint8 array or file path, got {type(img).__name__}")


def _to_model_image(img: Image.Image, height: int, width: int) -> np.ndarray:
    """The released diffusion transform: bicubic resize to (height, width), then [-1, 1] (HWC float32)."""
    arr = np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC), np.uint8)
    return to_model_range(arr)


def _final_size(ori_w: int, ori_h: int, height: int, width: int) -> tuple[int, int]:
    """The released output size: source aspect ratio, short side = output size."""
    if ori_w < ori_h:
        return width, int(height * ori_h / ori_w)
    return int(width * ori_w / ori_h), height


def _bucket(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    length = _bucket(max(len(r) for r in rows), bucket)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def _vision_batch(rows: Sequence[_Row]):
    parts = [v for r in rows for v in r.vision]
    if not parts:
        return None, None
    return np.concatenate([p for p, _ in parts]), np.concatenate([g for _, g in parts])


class GoTPipeline:
    """T2I, editing, interactive and multi-turn GoT sampling (see the module docstring).

    ``model`` is a :class:`GoT`; ``tokenizer`` a GoT / Qwen2.5-VL tokenizer (special tokens are
    looked up by name); ``image_processor`` transformers' Qwen2.5-VL image processor (default: from
    the reasoner's vision config); ``scheduler_config`` the diffusers scheduler config dict (default:
    the model's). ``mesh`` (optional) runs every program under that mesh with ``rules`` (required with a
    mesh: the rules from the config, e.g. ``configs.sharding_rules.RULES``).
    """

    def __init__(self, model: GoT, tokenizer, image_processor=None, *, scheduler_config: dict | None = None,
                 mesh=None, rules=None, max_boxes: int = 32, source_size: int = SOURCE_SIZE):
        sharding.require_rules("GoTPipeline", mesh, rules)
        if int(source_size) <= 0 or int(source_size) % 28:
            raise ValueError(f"source_size {source_size}: the reasoner's view of a source image must be a positive "
                             "multiple of 28 (patch 14 x merge 2)")
        self.source_size = int(source_size)
        self.model = model
        self.tokenizer = tokenizer
        self.ids = got_token_ids(tokenizer)
        rcfg = model.config.reasoner
        if self.ids.image_pad != rcfg.image_token_id:
            raise ValueError(f"tokenizer's <|image_pad|> id {self.ids.image_pad} != reasoner config image_token_id "
                             f"{rcfg.image_token_id}: tokenizer and checkpoint do not belong together")
        rows = rcfg.text.vocab_size
        too_big = [t for t in (self.ids.im_gen_start, *self.ids.query) if t >= rows]
        if too_big:
            raise ValueError(f"tokenizer GoT token id {too_big[0]} >= reasoner embedding rows {rows}: the checkpoint "
                             "lacks the GoT tokens")
        self.image_processor = image_processor if image_processor is not None else load_image_processor(None, rcfg)
        self.scheduler_config = dict(scheduler_config if scheduler_config is not None else model.config.scheduler)
        if not self.scheduler_config:
            raise ValueError("no scheduler config: the checkpoint has none, pass scheduler_config=")
        if "clip_sample" not in self.scheduler_config:
            log.warning("scheduler config has no 'clip_sample' key: the 'ddpm' / 'ddim' samplers then clip the x0 "
                        "estimate to [-1, 1] (diffusers' default), which ruins SDXL-style latents; SDXL's own "
                        "config says \"clip_sample\": false (configs/reference/sdxl_scheduler_config.json)")
        self.mesh, self.rules = mesh, rules
        self.max_boxes = int(max_boxes)
        self._paint_fns: dict[tuple, Any] = {}
        self._feedback_tokens: int | None = None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, mesh=None, rules=None, options=None,
                        **kwargs) -> "GoTPipeline":
        """A pipeline on a converted GoT folder (``convert/got_checkpoint.py`` output); ``options``
        (:class:`~got_jax.models.options.ModelOptions`) default to float32 compute on the stored dtype. The
        reasoner's view of source images is the folder's ``reasoner_source_size`` (config.json; written by
        ``got_jax.train.export`` from the training config's ``data.reasoner_size``), else the released 448."""
        from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415

        sharding.require_rules("GoTPipeline.from_pretrained", mesh, rules)
        folder = os.fspath(folder)
        if "source_size" not in kwargs:
            kwargs["source_size"] = int(read_config(folder).get("reasoner_source_size") or SOURCE_SIZE)
        model = GoT.from_checkpoint(folder, mesh=mesh, rules=rules, options=options)
        tok_dir = os.path.join(folder, "tokenizer")
        tokenizer = load_tokenizer(tok_dir)
        proc = load_image_processor(tok_dir, model.config.reasoner)
        return cls(model, tokenizer, proc, mesh=mesh, rules=rules, **kwargs)

    # ------------------------------------------------------------------------------------ helpers

    def _ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)

    def _vision(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        pv, grid, _ = reasoner_image(img, self.image_processor, self.source_size)
        return pv, grid

    def _image_tokens(self, grid: np.ndarray) -> int:
        return int(np.prod(grid, axis=-1).sum()) // self.image_processor.merge_size ** 2

    def _prompt_ids(self, text: str, source: Image.Image | None) -> tuple[list[int], list]:
        if source is None:
            return prompt_ids(self.tokenizer, text), []
        pv, grid, n = reasoner_image(source, self.image_processor, self.source_size)
        return prompt_ids(self.tokenizer, text, n), [(pv, grid)]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ------------------------------------------------------------------------------------ the call

    def __call__(self, prompts: str | Sequence[str], *, images=None, mode: str | None = None,
                 got_texts: str | Sequence[str | None] | None = None, height: int = 1024, width: int = 1024,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, layout_guidance_scale: float = 4.0,
                 image_guidance_scale: float = 1.0, seed: int | Sequence[int] = 42, scheduler: str = "ddpm",
                 max_new_tokens: int = 1024, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 only_return_got: bool = False, max_rounds: int = 1, crops_coords_top_left=(0, 0),
                 noise: tuple[np.ndarray, np.ndarray] | None = None, return_intermediates: bool = False,
                 progress: bool = False, zero_layout: bool = False, no_chain: bool = False) -> GoTOutput:
        """Sample GoT chains and images for a batch of prompts.

        ``images`` (one per prompt: PIL image, uint8 array or file path; None entries for T2I rows)
        makes those rows edits; ``mode="edit"`` demands an image for every prompt, ``mode="t2i"``
        forbids images. ``got_texts`` (interactive generation): per prompt a GoT text (or
        :class:`~got_jax.got.text.Plan` text) to use instead of sampling one; ``<|im_gen_start|>``
        is appended when missing. ``noise = (initial (B, h, w, 4), steps (S, B, h, w, 4))``
        overrides the random draws (NHWC latents). ``progress`` shows a per-step tqdm bar of the
        denoising loop (a host callback from inside the compiled loop). ``no_chain`` (the no-chain ablation
        of ``config.ablation.no_chain`` in training): no chain is generated, ``<|im_gen_start|>`` and the
        query tokens follow the prompt directly (no plan: one black layout canvas). Scales follow the released names: g text
        (``guidance_scale``), c layout (``layout_guidance_scale``), i reference (``image_guidance_scale``).
        ``zero_layout`` (the paper's "no spatial guidance" ablation): the layout latents are zero, whatever the
        plan's boxes (the chain and its boxes are still generated and returned).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty: give a caption (T2I) or an instruction (edit)")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and len(images) != n:
            raise ValueError(f"{len(images)} images for {n} prompts: give one per prompt (None for T2I rows)")
        if mode not in (None, "t2i", "edit"):
            raise ValueError(f"mode must be 't2i' or 'edit', got {mode!r}")
        if mode == "edit" and (images is None or any(im is None for im in images)):
            missing = list(range(n)) if images is None else [i for i, im in enumerate(images) if im is None]
            raise ValueError(f"mode='edit' needs a source image for every prompt; prompts {missing} have none")
        if mode == "t2i" and images is not None and any(im is not None for im in images):
            raise ValueError("mode='t2i' takes no images; use mode='edit' (or leave mode unset)")
        if isinstance(got_texts, str):
            got_texts = [got_texts]
        if got_texts is not None and len(got_texts) != n:
            raise ValueError(f"{len(got_texts)} GoT texts for {n} prompts")
        seeds = [int(seed)] * n if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        f = self.model.vae_scale * 2 ** (len(self.model.config.unet.block_out_channels) - 1)
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"output size {height}x{width}: height and width must be positive multiples of {f} "
                             f"(VAE factor {self.model.vae_scale} x UNet down-sampling)")
        if num_inference_steps < 1 or max_rounds < 1 or max_new_tokens < 1:
            raise ValueError("num_inference_steps, max_rounds and max_new_tokens must be >= 1")
        scales = np.asarray([[guidance_scale, layout_guidance_scale, image_guidance_scale]] * n, np.float32)

        rows = []
        for i in range(n):
            src = None if images is None or images[i] is None else _open_image(images[i], f"image of prompt {i}")
            ids, vision = self._prompt_ids(prompts[i], src)
            plan = None if got_texts is None or got_texts[i] is None else str(got_texts[i])
            if plan is not None and not plan.strip():
                raise ValueError(f"GoT text of prompt {i} is empty")
            rows.append(_Row(ids, vision, src, src, seeds[i], plan))
        if noise is not None:
            self._check_noise(noise, n, height, width, num_inference_steps)

        with self._ctx():
            for rnd in range(max_rounds):
                active = [i for i, r in enumerate(rows) if not r.done]
                if not active:
                    break
                if no_chain:
                    for i in active:
                        rows[i].plan_text = "<|im_gen_start|>"
                self._reason([rows[i] for i in active], max_new_tokens, temperature, top_k, top_p, rnd)
                if only_return_got:
                    for i in active:
                        rows[i].done = True
                    break
                paint, last_round = [], rnd == max_rounds - 1
                for i in active:
                    r = rows[i]
                    last = r.ids[-1]
                    if last == self.ids.im_gen_start:
                        paint.append(i)
                    elif last == self.ids.vision_start and r.images and not last_round:
                        self._feed_back(r)
                    elif not r.images:  # ended (eos / length) before <|im_gen_start|>: paint anyway
                        r.ids.append(self.ids.im_gen_start)
                        r.forced = True
                        log.warning("prompt %d: chain ended without <|im_gen_start|>; appended it", i)
                        paint.append(i)
                    else:
                        r.done = True
                if paint:
                    self._paint([rows[i] for i in paint], paint, height, width, num_inference_steps, scales[paint],
                                scheduler, crops_coords_top_left, noise, return_intermediates, progress, zero_layout)
                if last_round:
                    break
        return self._output(rows, height, width, return_intermediates)

    def _check_noise(self, noise, n, height, width, steps):
        init, step = (np.asarray(a) for a in noise)
        lat = (height // self.model.vae_scale, width // self.model.vae_scale, self.model.latent_channels)
        if init.shape != (n,) + lat or step.shape != (steps, n) + lat:
            raise ValueError(f"noise shapes {init.shape}, {step.shape}; expected {(n,) + lat} and {(steps, n) + lat}")

    # ------------------------------------------------------------------------------------ reasoning

    def _reason(self, rows: list[_Row], max_new_tokens, temperature, top_k, top_p, rnd):
        starts = [len(r.ids) for r in rows]
        sample_rows = []
        for r in rows:
            if r.plan_text is not None:  # interactive: the caller's chain instead of a sampled one
                plan = list(self.tokenizer(r.plan_text, add_special_tokens=False)["input_ids"])
                if not plan or plan[-1] != self.ids.im_gen_start:
                    plan.append(self.ids.im_gen_start)
                r.ids.extend(plan)
                r.plan_text = None
            else:
                sample_rows.append(r)
        if sample_rows:
            ids, mask = _left_pad([r.ids for r in sample_rows], self.ids.endoftext, LENGTH_BUCKET)
            pv, grid = _vision_batch(sample_rows)
            sampler = Sampler(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              stop_token_ids=(self.ids.im_gen_start, self.ids.vision_start, self.ids.endoftext),
                              pad_token_id=self.ids.endoftext)
            key = jax.random.fold_in(jax.random.key(sample_rows[0].seed), rnd)
            out = sampler(self.model.reasoner, ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, key=key)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for j, r in enumerate(sample_rows):
                r.ids.extend(int(t) for t in tokens[j, :lengths[j]])
        for r, s in zip(rows, starts):
            text = self._decode(r.ids[s:])
            r.round_text = text
            for tok in STRIP_TOKENS:
                text = text.replace(tok, "")
            r.got_text += text

    def _feed_back(self, r: _Row):
        """``<|vision_start|>`` after an image: the last image goes back to the reasoner (multi-turn)."""
        pv, grid = self._vision(r.images[-1])
        r.vision.append((pv, grid))
        r.ids.extend([self.ids.image_pad] * self._image_tokens(grid))

    # ------------------------------------------------------------------------------------ painting

    def _paint(self, rows: list[_Row], index: list[int], height, width, steps, scales, scheduler_name, crop,
               noise, keep, progress, zero_layout=False):
        model = self.model
        q = list(self.ids.query)
        for r in rows:
            r.ids.extend(q)
        ids, mask = _left_pad([r.ids for r in rows], self.ids.endoftext, LENGTH_BUCKET)
        pv, grid = _vision_batch(rows)
        hidden = forward_hidden(model.reasoner, ids, attention_mask=mask, pixel_values=pv,
                                image_grid_thw=grid)[:, -len(q):]

        for r in rows:  # parsed once: painted here, returned (with uncoloured boxes) in GoTOutput.plans
            r.plan = parse_got(r.round_text)
        plans = [painted_boxes(r.plan) for r in rows]
        for i, plan in zip(index, plans):
            if len(plan) > self.max_boxes:
                raise ValueError(f"prompt {i}: GoT plan has {len(plan)} coloured boxes, more than "
                                 f"max_boxes={self.max_boxes}")
        n_boxes = _pow2(max(max(len(p), 1) for p in plans))
        canvases = np.zeros((len(rows), n_boxes, height, width, 3), np.float32)
        box_mask = np.zeros((len(rows), n_boxes), bool)
        refs = np.zeros((len(rows), height, width, 3), np.float32)
        for j, (r, plan) in enumerate(zip(rows, plans)):
            if not plan:
                log.info("GoT plan without coloured boxes: one black layout canvas (as released)")
            c = to_model_range(render_layout_canvases(plan, height, width, max_boxes=self.max_boxes))
            canvases[j, :len(c)] = c
            box_mask[j, :len(c)] = True
            ref = r.reference if r.reference is not None else Image.new("RGB", (width, height))
            refs[j] = _to_model_image(ref, height, width)
        h8, w8, lc = height // model.vae_scale, width // model.vae_scale, model.latent_channels
        if noise is not None:
            init = jnp.asarray(np.asarray(noise[0])[index], jnp.float32)
            step_noise = jnp.asarray(np.asarray(noise[1])[:, index], jnp.float32)
        else:
            init = step_noise = None
        seeds = jnp.asarray([r.seed for r in rows], jnp.uint32)
        time_ids = jnp.asarray([[height, width, crop[0], crop[1], height, width]] * len(rows), jnp.float32)
        fn = self._paint_fn(scheduler_name, steps, progress, zero_layout)
        graphdef, state = nnx.split(model)
        bar = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=steps, desc=f"denoising {len(rows)} image(s) at {height}x{width}", unit="step",
                       leave=False)
            _BARS.append(bar)
        try:
            out = fn(graphdef, state, hidden, jnp.asarray(canvases), jnp.asarray(box_mask), jnp.asarray(refs), seeds,
                     jnp.asarray(scales), time_ids, init, step_noise, (h8, w8, lc))
            images = np.asarray(out["image"])
        finally:
            if bar is not None:
                jax.effects_barrier()  # let the last step callbacks reach the bar
                _BARS.remove(bar)
                bar.close()
        for j, r in enumerate(rows):
            pil = Image.fromarray((images[j] * 255).astype(np.uint8))
            r.images.append(pil)
            r.reference = pil
            if keep:
                r.intermediates.append({"hidden": np.asarray(hidden[j]), "layout_latents": np.asarray(out["layout"][j]),
                                        "reference_latents": np.asarray(out["reference"][j]), "image": images[j]})

    def _paint_fn(self, scheduler_name: str, steps: int, progress: bool, zero_layout: bool = False):
        key = (scheduler_name, steps, progress, bool(zero_layout))
        if key not in self._paint_fns:
            sched = make_scheduler(scheduler_name, self.scheduler_config, steps)
            self._paint_fns[key] = jax.jit(functools.partial(_paint_program, sched, progress, bool(zero_layout)),
                                           static_argnums=(0, 11))
        return self._paint_fns[key]

    # ------------------------------------------------------------------------------------ output

    def _output(self, rows: list[_Row], height, width, keep) -> GoTOutput:
        finals, alls = [], []
        for r in rows:
            ori_w, ori_h = r.source.size if r.source is not None else (width, height)
            target = _final_size(ori_w, ori_h, height, width)
            resized = [im.resize(target) for im in r.images]
            alls.append(resized)
            finals.append(resized[-1] if resized else None)
        return GoTOutput(got_texts=[r.got_text for r in rows], images=finals, all_images=alls,
                         plans=[r.plan if r.images else parse_got(r.round_text) for r in rows],
                         token_ids=[np.asarray(r.ids, np.int32) for r in rows],
                         forced_image_start=[r.forced for r in rows],
                         intermediates=[r.intermediates for r in rows] if keep else None)


_BARS: list = []  # progress bars of running paint programs (host side of the per-step callback)


def _tick(_step):
    if _BARS:
        _BARS[-1].update(1)


def _paint_program(sched, progress, zero_layout, graphdef, state, hidden, canvases, box_mask, refs, seeds, scales,
                   time_ids, init, step_noise, latent_shape):
    """Guidance + the whole denoising loop + VAE decode, one program (jit with ``sched``/shapes static);
    ``zero_layout`` zeroes the layout latents (no spatial guidance)."""
    model = nnx.merge(graphdef, state)
    context, null, pooled = model.semantic_guidance(hidden)
    layout = model.layout_latents(canvases, box_mask)
    if zero_layout:
        layout = jnp.zeros_like(layout)
    reference = model.encode_mode_each(refs)

    keys = jax.vmap(jax.random.key)(seeds)
    if init is None:
        init = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape))(keys)
    timesteps = jnp.asarray(sched.timesteps)
    x = init * sched.init_noise_sigma
    sstate = sched.init_state(x)

    def body(i, carry):
        x, sstate = carry
        if step_noise is None:
            nz = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), latent_shape))(keys)
        else:
            nz = step_noise[i]
        if progress:
            jax.debug.callback(_tick, i)
        x_in = sched.scale_model_input(x, i)
        e = model.guided_noise(x_in, timesteps[i], context, null, pooled, reference, layout, time_ids, scales)
        return sched.step(e, i, x, noise=nz, state=sstate)

    x, _ = jax.lax.fori_loop(0, len(sched.timesteps), body, (x, sstate))
    return {"image": model.decode(x), "layout": layout, "reference": reference}
