"""Tiny random PyTorch models and checks shared by the converter tests (tests/test_convert_*.py)."""

import json
import os

import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig as HFQwenConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen

QWEN_TEXT = dict(vocab_size=61, hidden_size=20, intermediate_size=23, num_hidden_layers=2, num_attention_heads=5,
                 num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 0, 1]},
                 rope_theta=10000.0, rms_norm_eps=1e-6)
QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=12, num_heads=2, out_hidden_size=20,
                   fullatt_block_indexes=[0], window_size=16, patch_size=4, temporal_patch_size=2,
                   spatial_merge_size=2)
TOKENIZER_STUB = {"tokenizer_config.json": {"model_max_length": 64}, "preprocessor_config.json": {"patch_size": 4}}


def tiny_qwen(tied: bool, seed: int = 0, vocab: int | None = None) -> HFQwen:
    """A random tiny Qwen2.5-VL (weights scaled so logits are not flat)."""
    torch.manual_seed(seed)
    text = dict(QWEN_TEXT, vocab_size=vocab or QWEN_TEXT["vocab_size"])
    hf = HFQwen(HFQwenConfig(text_config=text, vision_config=dict(QWEN_VISION), image_token_id=55, video_token_id=56,
                             vision_start_token_id=57, vision_end_token_id=58, tie_word_embeddings=tied)).eval().float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 1.0 if ("embed_tokens" in name or "lm_head" in name) else 0.2
            p.copy_(scale * torch.randn_like(p) + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return hf


def qwen_state_4x(hf: HFQwen) -> dict:
    """The transformers-4.x key layout (``model.layers.*``, ``visual.*``) of ``hf``'s weights."""
    out = {}
    for k, v in hf.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[k] = v.detach().clone().contiguous()
    if hf.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_qwen(hf: HFQwen, folder, layout: str) -> None:
    """Saves ``hf`` as a Hugging Face folder in the given key layout, with stub tokenizer files."""
    os.makedirs(folder, exist_ok=True)
    hf.config.save_pretrained(str(folder))
    if layout == "4.x":
        sd = qwen_state_4x(hf)
    else:
        sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
    save_file(sd, os.path.join(str(folder), "model.safetensors"), metadata={"format": "pt"})
    for name, content in TOKENIZER_STUB.items():
        with open(os.path.join(str(folder), name), "w") as f:
            json.dump(content, f)


def qwen_logits(hf: HFQwen, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits.numpy()


def jax_qwen(reasoner_cfg: dict, pure: dict):
    """Our Qwen2.5-VL model with the restored pure parameter dict."""
    from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from got_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig.from_hf_config(reasoner_cfg)
    return with_params(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), pure)


def check_close(out, ref) -> None:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    err, scale = float(np.abs(out - ref).max()), max(1.0, float(np.abs(ref).max()))
    assert err <= 1e-4 * scale, (err, scale)


def assert_state_dicts_equal(got: dict, want: dict) -> None:
    """Bit-identical tensors under the same keys."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:10]
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def tiny_unet_config(in_channels: int = 4) -> dict:
    """An SDXL-shaped (text_time, linear projections, cross-attention only in the last level) tiny UNet."""
    return dict(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(16, 24),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=20,
                norm_num_groups=4, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=4, projection_class_embeddings_input_dim=7 + 6 * 4)


def tiny_unet(in_channels: int = 4, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    m = diffusers.UNet2DConditionModel(**tiny_unet_config(in_channels)).eval()
    with torch.no_grad():  # diffusers zero-inits some layers: make every tensor random
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def tiny_vae(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"}


def save_sdxl(folder, unet, vae, *, vae_fp16: bool = False, unet_shard: str | None = None) -> None:
    """A diffusers-style SDXL folder: unet/ (optionally sharded), vae/ (optionally fp16 variant), scheduler/."""
    os.makedirs(folder, exist_ok=True)
    kw = {"max_shard_size": unet_shard} if unet_shard else {}
    unet.save_pretrained(os.path.join(str(folder), "unet"), **kw)
    if vae_fp16:
        vae.half().save_pretrained(os.path.join(str(folder), "vae"), variant="fp16")
        vae.float()
    else:
        vae.save_pretrained(os.path.join(str(folder), "vae"))
    os.makedirs(os.path.join(str(folder), "scheduler"), exist_ok=True)
    with open(os.path.join(str(folder), "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)


def unet_inputs(in_channels: int, seed: int = 1) -> dict:
    g = np.random.default_rng(seed)
    return dict(sample=g.standard_normal((1, 8, 8, in_channels)).astype(np.float32), t=np.array([17], np.int64),
                ctx=g.standard_normal((1, 5, 20)).astype(np.float32), text=g.standard_normal((1, 7)).astype(np.float32),
                tid=np.array([[1024.0, 768.0, 32.0, 96.0, 896.0, 640.0]], np.float32))  # not a palindrome


def torch_unet_out(m, x) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2)), torch.from_numpy(x["t"]),
                 torch.from_numpy(x["ctx"]), added_cond_kwargs=dict(text_embeds=torch.from_numpy(x["text"]),
                                                                    time_ids=torch.from_numpy(x["tid"]))
                 ).sample.numpy().transpose(0, 2, 3, 1)


def with_params(build, pure: dict):
    """The module ``build()`` makes, created abstractly and filled with the restored pure dict (no init cost)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------ stand-ins in the released layouts


def qwen_tokenizer():
    """A Qwen2.5-VL-style tokenizer *without* GoT's tokens: the bundled tokenizer's byte-level BPE and
    Qwen2.5's 22 added tokens in vocabulary order, the real chat template (what Qwen2.5-VL-3B-Instruct ships)."""
    from transformers import AddedToken, Qwen2Tokenizer

    from got_jax.got.tokenizer import BUNDLED_TOKENIZER_DIR, QWEN2_5_ADDED_TOKENS, QWEN2_5_VL_CHAT_TEMPLATE

    with open(BUNDLED_TOKENIZER_DIR / "tokenizer.json") as f:
        spec = json.load(f)
    first_added = min(t["id"] for t in spec["added_tokens"])
    vocab = {k: v for k, v in spec["model"]["vocab"].items() if v < first_added}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    for name, _ in QWEN2_5_ADDED_TOKENS:
        vocab[name] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, bos_token=None, errors="replace", model_max_length=32768)
    for name, special in QWEN2_5_ADDED_TOKENS:
        tok.add_tokens([AddedToken(name, special=special, normalized=False)], special_tokens=special)
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tok


# the reasoner's image processor for the stand-ins: tiny patches, few pixels (fast vision tower)
STANDIN_PROCESSOR = dict(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)


def standin_qwen(tok, vocab: int, seed: int = 0) -> HFQwen:
    """A random tiny Qwen2.5-VL whose special-token ids are ``tok``'s (untied head; vision and GoT query tokens
    get near-zero head rows so greedy chains never emit them)."""
    ids = {n: tok.convert_tokens_to_ids(n) for n in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|endoftext|>")}
    torch.manual_seed(seed)
    text = dict(QWEN_TEXT, vocab_size=vocab, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                bos_token_id=ids["<|endoftext|>"])
    hf = HFQwen(HFQwenConfig(text_config=text, vision_config=dict(QWEN_VISION), image_token_id=ids["<|image_pad|>"],
                             video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                             vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)).eval().float()
    quiet = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_gen_end|>",
             *(f"<|im_gen_{i:04d}|>" for i in range(64))]
    vocab_of = tok.get_vocab()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 1.0 if ("embed_tokens" in name or "lm_head" in name) else 0.2
            p.copy_(scale * torch.randn_like(p) + (1.0 if "norm" in name or "ln_q" in name else 0.0))
        for t in quiet:
            if t in vocab_of and vocab_of[t] < vocab:
                hf.lm_head.weight[vocab_of[t]] *= 0.01
    return hf


def save_standins(root, *, lora_rank: int = 2) -> dict:
    """The three released input folders, tiny, under ``root``; returns their paths.

    * ``qwen/``: a Qwen2.5-VL-3B-Instruct-style folder saved by transformers (config, safetensors weights,
      tokenizer without GoT's tokens, ``preprocessor_config.json``);
    * ``sdxl/``: a diffusers SDXL folder whose ``unet/`` and ``vae/`` hold only the ``fp16`` variant,
      plus ``scheduler/scheduler_config.json``;
    * ``got/``: GoT-6B's ``pytorch_model.bin`` (``mllm.base_model.model.*`` with PEFT LoRA keys on the
      attention / MLP projections, the embedding grown by GoT's 66 rows, projectors, a 12-channel UNet,
      no VAE, no tokenizer, no adapter config).
    """
    import diffusers

    root = str(root)
    tok = qwen_tokenizer()
    base_vocab = len(tok)
    qdir, sdir, gdir = (os.path.join(root, n) for n in ("qwen", "sdxl", "got"))
    qwen = standin_qwen(tok, base_vocab, seed=0)
    qwen.save_pretrained(qdir)
    tok.save_pretrained(qdir)
    with open(os.path.join(qdir, "preprocessor_config.json"), "w") as f:
        json.dump(dict(STANDIN_PROCESSOR, image_processor_type="Qwen2VLImageProcessor"), f)
    unet = tiny_unet(4, seed=7)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  latent_channels=4, norm_num_groups=4, sample_size=64).eval()
    torch.manual_seed(8)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.half().save_pretrained(os.path.join(sdir, "unet"), variant="fp16")
    vae.half().save_pretrained(os.path.join(sdir, "vae"), variant="fp16")
    os.makedirs(os.path.join(sdir, "scheduler"), exist_ok=True)
    with open(os.path.join(sdir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)
    # GoT: the reasoner with 66 more embedding rows, LoRA on two projections, PEFT-wrapped keys
    got = standin_qwen(tok, base_vocab + 66, seed=1)
    rng = np.random.RandomState(3)
    sd = {}
    for k, v in qwen_state_4x(got).items():
        module = k.rsplit(".", 1)[0]
        pre = "mllm.base_model.model."
        if module.endswith(("self_attn.q_proj", "mlp.down_proj")) and module.startswith("model.layers."):
            leaf = k.rsplit(".", 1)[1]
            sd[f"{pre}{module}.base_layer.{leaf}"] = v
            if leaf == "weight":
                sd[f"{pre}{module}.lora_A.default.weight"] = torch.from_numpy(
                    rng.randn(lora_rank, v.shape[1]).astype(np.float32) * 0.1)
                sd[f"{pre}{module}.lora_B.default.weight"] = torch.from_numpy(
                    rng.randn(v.shape[0], lora_rank).astype(np.float32) * 0.1)
        else:
            sd[pre + k] = v
    torch.manual_seed(4)
    hidden = QWEN_TEXT["hidden_size"]
    proj, pooled = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 7)
    for name, mod in (("output_projector.projector", proj), ("output_projector_add.projector", pooled)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = mod.weight.detach().clone(), mod.bias.detach().clone()
    sd |= {f"unet.{k}": v.detach().clone() for k, v in tiny_unet(12, seed=5).state_dict().items()}
    os.makedirs(gdir, exist_ok=True)
    torch.save(sd, os.path.join(gdir, "pytorch_model.bin"))
    return {"qwen": qdir, "sdxl": sdir, "got": gdir, "base_vocab": base_vocab}
