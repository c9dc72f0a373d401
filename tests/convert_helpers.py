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
