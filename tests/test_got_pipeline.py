"""End-to-end parity of the GoT pipeline with the released ``generate`` (tests/got_reference.py).

A tiny GoT is assembled in PyTorch (transformers' Qwen2.5-VL with the bundled GoT tokenizer's ids,
diffusers' 12-channel UNet and VAE, two ``nn.Linear`` projectors), written as a GoT-6B-style
``pytorch_model.bin`` + Qwen / SDXL folders, converted with ``convert/got_checkpoint.py`` and loaded
by :class:`GoTPipeline`. The reference's Gaussian draws are fed to ours (``noise=``).

A random tiny reasoner would rarely emit ``<|im_gen_start|>``; the fixture therefore adds
``alpha * m`` to that token's LM-head row, ``m`` the mean direction of the model's final
hidden states, with the smallest ``alpha`` on a grid for which greedy decoding of both test
prompts stops at ``<|im_gen_start|>`` after a few free tokens. The weights stay random otherwise.

Tolerances (float32, highest matmul precision): hidden states, layout and reference latents max abs
error <= 1e-4 x max(1, output scale); images within 2/255 per pixel (the issue's bar).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from convert_helpers import qwen_state_4x, tiny_unet_config
from flax import nnx
from got_reference import TorchGoT, released_layout_canvases
from PIL import Image
from transformers import Qwen2_5_VLConfig as HFQwenConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen

from convert import got_checkpoint
from got_jax.got import pipeline as gp
from got_jax.got.text import Box, format_got, parse_got
from got_jax.got.tokenizer import BUNDLED_TOKENIZER_DIR, chat_prompt, got_token_ids, load_tokenizer
from got_jax.models.qwen2_5_vl.processing import make_image_processor

HIDDEN = 32
SIZE = 64
STEPS = 4
MAX_NEW = 16
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"}
PROC = dict(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)
T2I_PROMPT = "two red circles to the left of a blue square"
EDIT_PROMPT = "make the square green"
PLAN = ("The image shows two objects. " + format_got(
    [Box(50, 100, 400, 600, "a red circle", "red"), Box(500, 200, 950, 900, "a blue square", "blue")],
    separator=" and ") + ".<|im_gen_start|>")


def close(ours, ref, what, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x scale {scale:.3g}"


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


class ProcessorShim:
    """The parts of ``Qwen2_5_VLProcessor`` the released generate uses (the real class needs torchvision)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def apply_chat_template(self, messages, **kw):
        return self.tokenizer.apply_chat_template(messages, **kw)

    def __call__(self, text, images=None, padding=False, return_tensors="pt"):
        text = list(text)
        if images:
            grid = self.image_processor(images=images, return_tensors="pt").image_grid_thw
            counts = iter((grid.prod(-1) // self.image_processor.merge_size ** 2).tolist())
            out = []
            for t in text:
                parts = t.split("<|image_pad|>")
                out.append(parts[0] + "".join("<|image_pad|>" * next(counts) + p for p in parts[1:]))
            text = out
        return SimpleNamespace(input_ids=self.tokenizer(text, return_tensors="pt").input_ids)


def source_image() -> Image.Image:
    rng = np.random.RandomState(7)
    arr = (rng.rand(48, 80, 3) * 255).astype(np.uint8)  # non-square: the output keeps its aspect ratio
    arr[10:30, 20:50] = (0, 0, 255)
    return Image.fromarray(arr)


def _hf_qwen(tok, seed=1, *, hidden=HIDDEN, intermediate=37, layers=2, heads=4, kv_heads=2,
             mrope_section=(2, 1, 1)) -> HFQwen:
    """The random reasoner (benchmarks/pipeline.py builds larger ones with the same code)."""
    ids = got_token_ids(tok)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)}, eos_token_id=ids.endoftext,
                pad_token_id=ids.endoftext)
    vision = dict(depth=2, hidden_size=16, intermediate_size=12, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[1], window_size=16, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    hf = HFQwen(HFQwenConfig(text_config=text, vision_config=vision, image_token_id=ids.image_pad,
                             video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                             vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
                             tie_word_embeddings=False)).eval().float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 1.0 if ("embed_tokens" in name or "lm_head" in name) else 0.2
            p.copy_(scale * torch.randn_like(p) + (1.0 if "norm" in name or "ln_q" in name else 0.0))
        # near-zero head rows: greedy never emits vision tokens (they would need pixel values) nor the
        # query tokens (the released code finds the query positions by id)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_gen_end|>",
                  *(f"<|im_gen_{i:04d}|>" for i in range(64))):
            hf.lm_head.weight[tok.convert_tokens_to_ids(t)] *= 0.01
    return hf


def _plant_image_start(hf, ref: TorchGoT, tok, cases=None, max_new=MAX_NEW, grid=(2.0, 12.0)) -> float:
    """Boosts <|im_gen_start|>'s LM-head row along the mean final-hidden direction (see module doc).

    ``cases``: (prompt, image, kind) triples that must all stop at it (default: the two test prompts).
    """
    cases = cases or ((T2I_PROMPT, None, "t2i"), (EDIT_PROMPT, source_image(), "edit"))
    boi = got_token_ids(tok).im_gen_start
    emb = hf.lm_head.weight
    with torch.no_grad():
        ids = torch.tensor([tok(chat_prompt(tok, cases[0][0], False))["input_ids"]])
        h = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        m = h.mean(0) / h.mean(0).norm()
        base = emb[boi].clone()
        for alpha in np.arange(*grid, 0.5).tolist():
            emb[boi] = base + alpha * m
            ok = True
            for prompt, image, kind in cases:
                r = ref.generate(prompt, image, max_new_tokens=max_new, prompt_type=kind, only_return_got=True)
                new = r.input_ids[0].tolist()
                if new[-1] != boi or len(new) - r.prompt_len - 1 < 3:
                    ok = False
                    break
            if ok:
                return alpha
    raise AssertionError("no alpha on the grid makes the tiny reasoner emit <|im_gen_start|> after >= 3 tokens")


@pytest.fixture(scope="module")
def got(tmp_path_factory):
    import diffusers

    tmp = tmp_path_factory.mktemp("got")
    tok = load_tokenizer()
    proc = make_image_processor(**PROC)
    hf = _hf_qwen(tok)
    torch.manual_seed(4)
    proj, pooled = torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, 7)
    unet = diffusers.UNet2DConditionModel(**dict(tiny_unet_config(12), cross_attention_dim=HIDDEN)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  latent_channels=4, norm_num_groups=4, sample_size=SIZE).eval()
    with torch.no_grad():  # diffusers zero-inits some layers: make every tensor random
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    sched = diffusers.DDPMScheduler.from_config(SCHEDULER)
    ref = TorchGoT(hf, proj, pooled, sched, vae, unet, ProcessorShim(tok, proc))
    alpha = _plant_image_start(hf, ref, tok)

    qdir, sdir, gdir = tmp / "qwen", tmp / "sdxl", tmp / "got"
    hf.config.save_pretrained(str(qdir))
    tok.save_pretrained(str(qdir))
    (qdir / "preprocessor_config.json").write_text(json.dumps(PROC))
    unet.save_pretrained(str(sdir / "unet"))
    vae.save_pretrained(str(sdir / "vae"))
    os.makedirs(sdir / "scheduler")
    (sdir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    sd = {"mllm." + k: v for k, v in qwen_state_4x(hf).items()}
    for name, mod in (("output_projector.projector", proj), ("output_projector_add.projector", pooled)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = mod.weight.detach().clone(), mod.bias.detach().clone()
    sd |= {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    os.makedirs(gdir)
    torch.save(sd, gdir / "pytorch_model.bin")
    got_checkpoint.convert_got(str(gdir), str(qdir), str(sdir), str(tmp / "out"), progress=False)
    pipe = gp.GoTPipeline.from_pretrained(str(tmp / "out"))
    return SimpleNamespace(ref=ref, pipe=pipe, tok=tok, alpha=alpha, folder=tmp / "out")


def _run_both(got, prompt, image=None, kind="t2i", got_input=None, plan=None):
    r = got.ref.generate(prompt, image, max_new_tokens=MAX_NEW, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                         prompt_type=kind, got_input=got_input)
    assert len(r.images) == 1 and len(r.step_noises[0]) == STEPS
    noise = (nchw_to_nhwc(r.initial_latents[0]), np.stack([nchw_to_nhwc(z) for z in r.step_noises[0]]))
    out = got.pipe(prompt, images=None if image is None else [image], got_texts=plan, height=SIZE, width=SIZE,
                   num_inference_steps=STEPS, max_new_tokens=MAX_NEW, noise=noise, return_intermediates=True)
    return r, out


def _check_parity(r, out):
    np.testing.assert_array_equal(out.token_ids[0], r.input_ids[0].numpy())
    assert out.got_texts[0] == r.got_text
    inter = out.intermediates[0][0]
    close(inter["hidden"], r.gen_hidden_states[0][0].numpy(), "query hidden states")
    close(inter["reference_latents"], nchw_to_nhwc(r.reference_latents[0])[0], "reference latents")
    close(inter["layout_latents"], nchw_to_nhwc(r.layout_latents[0])[0], "layout latents")
    err = np.abs(inter["image"] - r.image_arrays[0]).max()
    assert err <= 2 / 255, f"image max abs error {err:.4f} > 2/255"
    assert out.images[0].size == r.images[0].size


def test_t2i_matches_released_generate(got):
    r, out = _run_both(got, T2I_PROMPT)
    assert not out.forced_image_start[0]
    _check_parity(r, out)
    assert out.images[0].size == (SIZE, SIZE)


def test_edit_matches_released_generate(got):
    src = source_image()
    r, out = _run_both(got, EDIT_PROMPT, src, "edit")
    _check_parity(r, out)
    assert out.images[0].size == (int(SIZE * 80 / 48), SIZE)  # source aspect ratio, short side = output size
    # the reference latent really is the source image (not the black T2I reference)
    t2i = got.pipe(EDIT_PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, max_new_tokens=MAX_NEW,
                   return_intermediates=True)
    assert np.abs(t2i.intermediates[0][0]["reference_latents"]
                  - out.intermediates[0][0]["reference_latents"]).max() > 1e-2


def test_interactive_plan_matches_released_and_moves_layout(got):
    prompt_text = chat_prompt(got.tok, T2I_PROMPT, False)
    r, out = _run_both(got, T2I_PROMPT, got_input=prompt_text + PLAN, plan=PLAN)
    _check_parity(r, out)
    assert [b.coords for b in out.plans[0]] == [(50, 100, 400, 600), (500, 200, 950, 900)]
    # the layout latents are exactly those of the plan's painted canvases
    canv = released_layout_canvases(PLAN, SIZE, SIZE)
    assert len(canv) == 2 and np.asarray(canv[0])[20, 10].tolist() == [255, 0, 0]
    # a user-edited plan (square moved, recoloured) changes the layout latents as the boxes say
    edited = PLAN.replace("(500,200),(950,900)<|box_end|> (blue)", "(0,0),(300,300)<|box_end|> (green)")
    assert edited != PLAN
    o2 = got.pipe(T2I_PROMPT, got_texts=edited, height=SIZE, width=SIZE, num_inference_steps=1,
                  return_intermediates=True)
    want = got.pipe.model.layout_latents(
        *_canvases(edited))  # our renderer + VAE on the edited boxes
    close(o2.intermediates[0][0]["layout_latents"], np.asarray(want)[0], "edited layout latents")
    r2 = got.ref.generate(T2I_PROMPT, max_new_tokens=MAX_NEW, num_inference_steps=1, height=SIZE, width=SIZE,
                          got_input=prompt_text + edited)
    close(o2.intermediates[0][0]["layout_latents"], nchw_to_nhwc(r2.layout_latents[0])[0], "edited vs released")
    assert np.abs(o2.intermediates[0][0]["layout_latents"] - out.intermediates[0][0]["layout_latents"]).max() > 1e-2


def _canvases(text):
    from got_jax.got.layout import render_layout_canvases, to_model_range

    c = to_model_range(render_layout_canvases(parse_got(text), SIZE, SIZE))
    return c[None], np.ones((1, len(c)), bool)


def test_batch_of_prompts_matches_single_runs(got):
    """Two prompts in one call (padding, per-prompt seeds) give each prompt's single-call result."""
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, max_new_tokens=MAX_NEW, return_intermediates=True)
    both = got.pipe([T2I_PROMPT, "a cat"], seed=[3, 5], **kw)
    for i, (p, s) in enumerate(((T2I_PROMPT, 3), ("a cat", 5))):
        one = got.pipe(p, seed=s, **kw)
        np.testing.assert_array_equal(both.token_ids[i], one.token_ids[0])
        close(both.intermediates[i][0]["image"], one.intermediates[0][0]["image"], f"batched image {i}", tol=1e-4)


def test_only_return_got_and_sampling_keys(got):
    out = got.pipe(T2I_PROMPT, only_return_got=True, max_new_tokens=MAX_NEW)
    assert out.images == [None] and out.got_texts[0]
    r = got.ref.generate(T2I_PROMPT, max_new_tokens=MAX_NEW, only_return_got=True)
    np.testing.assert_array_equal(out.token_ids[0], r.input_ids[0].numpy())


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=""), "prompt 0 is empty"),
    (dict(prompts="x", mode="edit"), "needs a source image"),
    (dict(prompts="x", images=["/nonexistent/source.png"]), "cannot read image file '/nonexistent/source.png'"),
    (dict(prompts="x", height=72), "multiples of 16"),
    (dict(prompts=["a", "b"], images=[None]), "1 images for 2 prompts"),
    (dict(prompts="x", got_texts="  "), "GoT text of prompt 0 is empty"),
])
def test_bad_input(got, kwargs, match):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=match):
        got.pipe(prompts, **kwargs)


def test_plan_edge_cases(got):
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=1, return_intermediates=True)
    # no boxes: one black canvas (as released) -> layout latents = VAE mode of a black image
    none = got.pipe(T2I_PROMPT, got_texts="nothing to draw<|im_gen_start|>", **kw)
    black = got.pipe.model.encode_mode(np.full((1, SIZE, SIZE, 3), -1.0, np.float32))
    close(none.intermediates[0][0]["layout_latents"], np.asarray(black)[0], "no-box layout")
    # out-of-range coordinates are clamped to 0..1000 (the pixels PIL paints)
    wide = got.pipe(T2I_PROMPT, got_texts="<|box_start|>(0,0),(1500,500)<|box_end|> (red)<|im_gen_start|>", **kw)
    clamped = got.pipe(T2I_PROMPT, got_texts="<|box_start|>(0,0),(1000,500)<|box_end|> (red)<|im_gen_start|>", **kw)
    close(wide.intermediates[0][0]["layout_latents"], clamped.intermediates[0][0]["layout_latents"], "clamped box")
    # more coloured boxes than max_boxes
    many = format_got([Box(0, 0, 10 + i, 10 + i, None, "red") for i in range(40)]) + "<|im_gen_start|>"
    with pytest.raises(ValueError, match="more than max_boxes=32"):
        got.pipe(T2I_PROMPT, got_texts=many, **kw)


def test_bundled_tokenizer_is_the_loaded_one(got):
    assert os.path.isfile(BUNDLED_TOKENIZER_DIR / "tokenizer_config.json")
    assert got_token_ids(got.pipe.tokenizer) == got_token_ids(got.tok)


def test_multi_round_continues_like_released(got):
    """max_rounds=2: after the image the reasoner continues from the query tokens, as released (a new
    <|im_gen_start|> paints again with the last image as the reference). Same token ids and chain; every
    image within 2/255."""
    prompt_text = chat_prompt(got.tok, T2I_PROMPT, False)
    r = got.ref.generate(T2I_PROMPT, max_new_tokens=MAX_NEW, num_inference_steps=2, height=SIZE, width=SIZE,
                         got_input=prompt_text + PLAN, max_rounds=2)
    assert len(r.images) >= 1
    noise = (nchw_to_nhwc(r.initial_latents[0]), np.stack([nchw_to_nhwc(z) for z in r.step_noises[0]]))
    for k in range(1, len(r.images)):  # the released code re-seeds its generator for every image
        np.testing.assert_array_equal(nchw_to_nhwc(r.initial_latents[k]), noise[0])
    out = got.pipe(T2I_PROMPT, got_texts=PLAN, max_rounds=2, height=SIZE, width=SIZE, num_inference_steps=2,
                   max_new_tokens=MAX_NEW, noise=noise, return_intermediates=True)
    np.testing.assert_array_equal(out.token_ids[0], r.input_ids[0].numpy())
    assert out.got_texts[0] == r.got_text
    assert len(out.all_images[0]) == len(r.images) == len(out.intermediates[0])
    for k, inter in enumerate(out.intermediates[0]):
        assert np.abs(inter["image"] - r.image_arrays[k]).max() <= 2 / 255, f"image {k}"
        # image k >= 1 is painted over image k-1 as uint8, where a pixel within 2/255 may land one level
        # apart: its reference latents carry that, hence 5e-3 (relative) instead of 1e-4
        close(inter["reference_latents"], nchw_to_nhwc(r.reference_latents[k])[0], f"reference latents {k}",
              tol=1e-4 if k == 0 else 5e-3)


def test_sharded_pipeline_matches_single_device(got):
    """The converted folder restored onto a (data 2, fsdp 4) mesh of fake CPU devices samples the same
    chains and images (max abs error <= 1e-4) as the single-device pipeline, with parameters sharded."""
    from got_jax import sharding

    mesh = sharding.make_mesh((2, 4, 1))
    pipe = gp.GoTPipeline.from_pretrained(str(got.folder), mesh=mesh)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(nnx.state(pipe.model)) if hasattr(leaf, "sharding")]
    assert any("fsdp" in tuple(s) for s in specs), "no parameter is sharded over fsdp"
    kw = dict(got_texts=[PLAN, None], height=SIZE, width=SIZE, num_inference_steps=2, max_new_tokens=MAX_NEW,
              seed=[1, 2], return_intermediates=True)
    a = pipe([T2I_PROMPT, "a cat"], **kw)
    b = got.pipe([T2I_PROMPT, "a cat"], **kw)
    for i in range(2):
        np.testing.assert_array_equal(a.token_ids[i], b.token_ids[i])
        close(a.intermediates[i][0]["image"], b.intermediates[i][0]["image"], f"sharded image {i}")


@pytest.mark.parametrize("name,cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                      ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_other_schedulers_match_diffusers(got, name, cls):
    """The released generate with another diffusers scheduler (same config dict) vs ours by name: image within
    2/255 (4 steps, interactive plan, the reference's initial latents fed to ours; these draw no step noise).
    Swapping two schedulers' names makes the error about 0.98."""
    import diffusers

    prompt_text = chat_prompt(got.tok, T2I_PROMPT, False)
    saved = got.ref.scheduler
    got.ref.scheduler = getattr(diffusers, cls).from_config(SCHEDULER)
    try:
        r = got.ref.generate(T2I_PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                             got_input=prompt_text + PLAN)
    finally:
        got.ref.scheduler = saved
    assert r.step_noises[0] == []
    init = nchw_to_nhwc(r.initial_latents[0])
    out = got.pipe(T2I_PROMPT, got_texts=PLAN, scheduler=name, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   noise=(init, np.zeros((STEPS,) + init.shape, np.float32)), return_intermediates=True)
    err = np.abs(out.intermediates[0][0]["image"] - r.image_arrays[0]).max()
    assert err <= 2 / 255, f"{name}: image max abs error {err:.4f} > 2/255"
