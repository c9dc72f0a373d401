"""A PyTorch reference of one GoT train step, written from the paper's recipe (GOT_SYSTEM.md, "Training recipe").

GoT's training code was never released; this is the recipe on the torch components the released
model is made of: transformers' Qwen2.5-VL with a ``peft`` LoRA on the decoder projections (embeddings,
LM head and the decoder's RMSNorms trained fully, vision tower frozen), the two SSGM projectors as
``nn.Linear``, diffusers' UNet (trained) and VAE (frozen), ``DDPMScheduler.add_noise``, and
``torch.optim.AdamW`` after ``clip_grad_norm_``. One forward of the reasoner on the teacher-forced
sequence (prompt, GoT text, ``<|im_gen_start|>``, 64 query tokens) gives both the LM loss (answer
tokens only, HF's shifted cross-entropy with -100 labels) and the query hidden states that
condition the UNet. All random values (timesteps, noise, noise offset, condition dropout) are passed
in, so the JAX step can be fed the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULLY_TRAINED = ("embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "language_model.norm")


@dataclass
class TorchGoTParts:
    """The torch modules of a GoT (``mllm`` is the peft-wrapped Qwen2.5-VL when LoRA is used)."""

    mllm: torch.nn.Module
    projector: torch.nn.Linear
    pooled_projector: torch.nn.Linear
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # diffusers DDPMScheduler

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by name (``reasoner.``/``projector.``/... prefixed, peft names kept)."""
        out = {}
        for prefix, mod in (("reasoner", self.mllm), ("projector", self.projector),
                            ("pooled_projector", self.pooled_projector), ("unet", self.unet), ("vae", self.vae)):
            for n, p in mod.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{n}"] = p
        return out


def add_lora(hf, rank: int, alpha: float, *, use_rslora: bool = False, init_b_scale: float = 0.0, seed: int = 0):
    """``peft`` LoRA (dropout 0) on the language model's decoder projections; B drawn with ``init_b_scale``
    (0: PEFT's zero init) so that a test sees non-zero gradients of A."""
    from peft import LoraConfig, get_peft_model

    targets = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(DECODER_PROJECTIONS) + ")"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_rslora=use_rslora,
                     bias="none")
    torch.manual_seed(seed)
    model = get_peft_model(hf, cfg)
    if init_b_scale:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * init_b_scale)
    return model


def set_trainable(parts: TorchGoTParts, lora: bool) -> None:
    """The recipe's trainable set: LoRA + embeddings / LM head / decoder norms (or the whole language model
    without LoRA), projectors, UNet; vision tower and VAE frozen."""
    for n, p in parts.mllm.named_parameters():
        if "visual" in n:
            p.requires_grad_(False)
        elif lora:
            p.requires_grad_("lora_" in n or any(k in n for k in FULLY_TRAINED))
        else:
            p.requires_grad_(True)
    for mod in (parts.projector, parts.pooled_projector, parts.unet):
        mod.requires_grad_(True)
    parts.vae.requires_grad_(False)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def losses(parts: TorchGoTParts, batch: dict, draws: dict, *, lm_weight=1.0, diffusion_weight=1.0,
           noise_offset=0.1, image_token_id: int) -> dict[str, torch.Tensor]:
    """LM, diffusion and total loss of one batch (pipeline keys, numpy) under ``draws`` (numpy, NHWC noise)."""
    ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
    am = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
    labels = torch.from_numpy(np.asarray(batch["labels"], np.int64))
    b = ids.shape[0]
    kw = {}
    grids = np.asarray(batch.get("image_grid_thw", np.zeros((b, 3))), np.int64)
    has = grids.prod(-1) > 0
    if has.any():  # real patches only, images in batch order (what the processor returns for the batch)
        pv = np.concatenate([np.asarray(batch["pixel_values"])[i, :grids[i].prod()] for i in range(b) if has[i]])
        kw = {"pixel_values": torch.from_numpy(pv.astype(np.float32)), "image_grid_thw": torch.from_numpy(grids[has]),
              "mm_token_type_ids": (ids == image_token_id).long()}
    out = parts.mllm(input_ids=ids, attention_mask=am, output_hidden_states=True, return_dict=True, **kw)
    logits = out.logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    hidden = out.hidden_states[-1]
    qmask = torch.from_numpy(np.asarray(batch["query_mask"], bool))
    q = hidden[qmask].view(b, -1, hidden.shape[-1])
    context = parts.projector(q)
    null = parts.projector(torch.zeros_like(q))
    pooled = parts.pooled_projector(q).mean(dim=1)

    vae = parts.vae
    with torch.no_grad():
        target = vae.encode(_nchw(batch["target_image"])).latent_dist.mean * vae.config.scaling_factor
        reference = vae.encode(_nchw(batch["reference_image"])).latent_dist.mode()
        canv = np.asarray(batch["layout_canvases"])
        if canv.dtype == np.uint8:
            canv = canv.astype(np.float32) / 255.0 * 2.0 - 1.0
        layout = []
        for i in range(b):  # released: each canvas encoded alone, modes averaged
            n = int(np.asarray(batch["layout_mask"])[i].sum())
            modes = torch.cat([vae.encode(_nchw(canv[i, j:j + 1])).latent_dist.mode() for j in range(n)])
            layout.append(modes.mean(dim=0))
        layout = torch.stack(layout)
    drop_t = torch.from_numpy(np.asarray(draws["drop_text"], bool))
    drop_l = torch.from_numpy(np.asarray(draws["drop_layout"], bool))
    drop_r = torch.from_numpy(np.asarray(draws["drop_reference"], bool))
    context = torch.where(drop_t[:, None, None], null, context)
    layout = torch.where(drop_l[:, None, None, None], torch.zeros_like(layout), layout)
    reference = torch.where(drop_r[:, None, None, None], torch.zeros_like(reference), reference)
    noise = _nchw(draws["noise"])
    offset = torch.from_numpy(np.asarray(draws["offset"], np.float32))
    noise = noise + noise_offset * offset[:, :, None, None]  # SDXL recipe: randn((B, C, 1, 1)) * offset
    t = torch.from_numpy(np.asarray(draws["timesteps"], np.int64))
    noisy = parts.scheduler.add_noise(target, noise, t)
    unet_in = torch.cat([noisy, reference, layout], dim=1)
    time_ids = torch.from_numpy(np.asarray(batch["time_ids"], np.float32))
    eps = parts.unet(unet_in, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    mse = F.mse_loss(eps.float(), noise.float())
    total = lm_weight * ce + diffusion_weight * mse
    return {"loss": total, "lm_loss": ce, "diffusion_loss": mse}


def learning_rate(step: int, *, peak: float, warmup: int, total: int, end: float = 0.0) -> float:
    """Linear warmup from 0, then cosine to ``end`` (HF's ``get_cosine_schedule_with_warmup`` shape)."""
    if step < warmup:
        return peak * step / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def train_step(parts: TorchGoTParts, batch: dict, draws: dict, *, lr: float, betas=(0.9, 0.98), eps=1e-6,
               weight_decay=0.05, clip_norm: float | None = 1.0, image_token_id: int, **loss_kw) -> dict:
    """One step: losses, backward, global-norm clipping, AdamW (decay on matrices only).

    Returns ``losses`` (floats), ``grads`` (unclipped, by :meth:`TorchGoTParts.named_trainable` name) and
    ``params`` (after the update, same names)."""
    params = parts.named_trainable()
    for p in params.values():
        p.grad = None
    out = losses(parts, batch, draws, image_token_id=image_token_id, **loss_kw)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    unique = list({id(p): p for p in params.values()}.values())  # tied embeddings appear once
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(unique, clip_norm)
    decay = [p for p in unique if p.ndim >= 2]
    no_decay = [p for p in unique if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)
    opt.step()
    return {"losses": {k: float(v.detach()) for k, v in out.items()}, "grads": grads,
            "params": {n: p.detach().clone() for n, p in params.items()}}
