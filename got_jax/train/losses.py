"""GoT's training losses (the paper's recipe; see ``GOT_SYSTEM.md``, "Training recipe").

``total = lm_weight * CE + diffusion_weight * MSE`` from ONE reasoner forward per example:

* **LM cross-entropy** (:func:`lm_cross_entropy`) on the answer tokens only (the ground-truth GoT
  text and ``<|im_gen_start|>``; prompt, image, query and padding tokens masked), mean over the
  batch's answer tokens, in float32. With ``vocab_chunk`` the log-sum-exp runs over vocabulary chunks
  (rematerialised in the backward pass), so (batch x length x vocab) logits never exist at once.
* **Diffusion MSE** (:func:`diffusion_loss`): epsilon prediction. The hidden states of the 64 query
  tokens (which follow the ground-truth text in the same forward, so gradients reach the reasoner
  through them) give the context / null context / pooled embeds as at sampling
  (:meth:`GoT.semantic_guidance`). Target latents = VAE posterior mean x scaling factor; the layout
  latent is the mean of the per-box VAE modes and the reference latent the VAE mode of the source
  (black image for T2I), both unscaled, exactly as at sampling (:meth:`GoT.layout_latents`,
  :meth:`GoT.encode_mode`). Noise ``eps + noise_offset * offset`` (``offset`` one normal draw per
  sample and channel, the common SDXL recipe) is added with the DDPM training schedule at a timestep
  uniform in ``[0, num_train_timesteps)``; the UNet predicts it.
* **Condition dropout**: with probability ``cond_dropout_prob`` an example trains under one of the
  other guidance branches of the four-way CFG (``GoT.guided_noise``): (2) context, G_r, zero layout;
  (3) null context, G_r, zero layout; (4) null context, zero reference, zero layout, chosen with
  ``cond_branch_probs``. The null context is ``projector(zeros)``; the pooled embeds stay the
  conditional ones in every branch, as at sampling.

All random draws are in :class:`Draws`, made by :func:`draw` from one key or given by the caller
(tests feed PyTorch the very same values).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from got_jax.diffusion.schedulers import TrainSchedule

# A batch's image fields the frozen VAE encodes, and the latents they become (conditioning_latents; a batch from
# got_jax.train.latent_cache.LatentCache carries the latents instead)
IMAGE_FIELDS = ("target_image", "reference_image", "layout_canvases", "layout_mask")
LATENT_FIELDS = ("target_latents", "reference_latents", "layout_latents")

# Guidance branches of GoT.guided_noise as (drop_text, drop_layout, drop_reference); branch 1 is the full one.
CFG_BRANCHES = ((False, False, False), (False, True, False), (True, True, False), (True, True, True))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights, noise offset, condition dropout and LM chunking (defaults: the paper's recipe)."""

    lm_weight: float = 1.0
    diffusion_weight: float = 1.0
    noise_offset: float = 0.1
    cond_dropout_prob: float = 0.05
    cond_branch_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # branches (2), (3), (4)
    vocab_chunk: int | None = None  # None: whole-vocabulary logits
    vae_encode_passes: int = 0  # frozen-VAE encodes of target / reference images in this many passes; 0 / 1: one

    def __post_init__(self):
        if not 0.0 <= self.cond_dropout_prob <= 1.0:
            raise ValueError(f"LossConfig.cond_dropout_prob must be in [0, 1], got {self.cond_dropout_prob}")
        p = tuple(float(x) for x in self.cond_branch_probs)
        if len(p) != 3 or min(p) < 0 or not np.isclose(sum(p), 1.0):
            raise ValueError(f"LossConfig.cond_branch_probs must be 3 non-negative numbers summing to 1 (branches "
                             f"(2) ctx/G_r/0, (3) null/G_r/0, (4) null/0/0), got {self.cond_branch_probs}")
        object.__setattr__(self, "cond_branch_probs", p)
        if self.vocab_chunk is not None and int(self.vocab_chunk) <= 0:
            raise ValueError(f"LossConfig.vocab_chunk must be positive or None, got {self.vocab_chunk}")
        if int(self.vae_encode_passes) < 0:
            raise ValueError(f"LossConfig.vae_encode_passes must be >= 0 (0 or 1: the whole batch in one pass), got "
                             f"{self.vae_encode_passes}")


@flax.struct.dataclass
class Draws:
    """The random values of one diffusion-loss evaluation (all float32 / int32 / bool, batch-leading).

    ``timesteps`` (B,); ``noise`` (B, h, w, C) standard normal; ``offset`` (B, C) standard normal
    (scaled by ``noise_offset`` and broadcast over space); ``drop_text`` / ``drop_layout`` /
    ``drop_reference`` (B,) the guidance combination each example trains under.
    """

    timesteps: Any
    noise: Any
    offset: Any
    drop_text: Any
    drop_layout: Any
    drop_reference: Any


def draw(key: jax.Array, latent_shape: tuple[int, int, int, int], num_train_timesteps: int,
         cfg: LossConfig) -> Draws:
    """Draws for a batch of latents ``(B, h, w, C)`` from ``key`` (see :class:`Draws`)."""
    b, _, _, c = latent_shape
    k_t, k_n, k_o, k_d, k_b = jax.random.split(key, 5)
    dropped = jax.random.uniform(k_d, (b,)) < cfg.cond_dropout_prob
    branch = 1 + jax.random.choice(k_b, 3, (b,), p=jnp.asarray(cfg.cond_branch_probs, jnp.float32))
    branch = jnp.where(dropped, branch, 0)
    table = jnp.asarray(CFG_BRANCHES, bool)[branch]
    return Draws(timesteps=jax.random.randint(k_t, (b,), 0, num_train_timesteps, jnp.int32),
                 noise=jax.random.normal(k_n, latent_shape, jnp.float32),
                 offset=jax.random.normal(k_o, (b, c), jnp.float32),
                 drop_text=table[:, 0], drop_layout=table[:, 1], drop_reference=table[:, 2])


# --------------------------------------------------------------------------------------------------
# LM cross-entropy
# --------------------------------------------------------------------------------------------------


def lm_head_weight(reasoner) -> jax.Array:
    """The reasoner's output projection as a (D, V) array (tied: the embedding transposed)."""
    if reasoner.lm_head is None:
        return reasoner.language_model.embed_tokens.embedding[...].T
    return reasoner.lm_head.kernel[...]


def lm_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array, *,
                     vocab_chunk: int | None = None, dtype=None) -> jax.Array:
    """Mean over ``mask`` of ``-log softmax(hidden @ weight)[targets]`` in float32.

    ``hidden`` (B, T, D) final-norm hidden states; ``weight`` (D, V); ``targets`` (B, T) int; ``mask``
    (B, T) bool. The matmul takes its inputs in ``dtype`` (default: ``hidden``'s) and accumulates in
    float32. With ``vocab_chunk`` the log-sum-exp is accumulated chunk by chunk (a rematerialised scan):
    no (B, T, V) array is ever live, in the forward or the backward pass.
    """
    dtype = dtype or hidden.dtype
    h = hidden.astype(dtype)
    w = weight.astype(dtype)
    d, v = w.shape
    # the target's logit: one column of the head per token
    cols = jnp.take(w.T, targets, axis=0)  # (B, T, D)
    target_logit = jnp.einsum("BTD,BTD->BT", h, cols, preferred_element_type=jnp.float32)
    if vocab_chunk is None or vocab_chunk >= v:
        logits = jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
    else:
        c = int(vocab_chunk)
        n = -(-v // c)
        wc = jnp.pad(w, ((0, 0), (0, n * c - v))).reshape(d, n, c).transpose(1, 0, 2)  # (n, D, C)
        valid = (jnp.arange(n * c) < v).reshape(n, c)

        @jax.checkpoint
        def body(carry, xs):
            m, s = carry
            w_i, ok = xs
            logits = jnp.einsum("BTD,DC->BTC", h, w_i, preferred_element_type=jnp.float32)
            logits = jnp.where(ok, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
            return (m_new, s), None

        init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), jnp.zeros(targets.shape, jnp.float32))
        (m, s), _ = jax.lax.scan(body, init, (wc, valid))
        lse = m + jnp.log(s)
    mask = mask.astype(jnp.float32)
    return jnp.sum((lse - target_logit) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# --------------------------------------------------------------------------------------------------
# Diffusion
# --------------------------------------------------------------------------------------------------


def canvases_to_model_range(canvases: jax.Array) -> jax.Array:
    """uint8 layout canvases -> float32 [-1, 1] (on device; the arithmetic of ``layout.to_model_range``)."""
    if canvases.dtype == jnp.uint8:
        return canvases.astype(jnp.float32) / jnp.float32(255.0) * jnp.float32(2.0) - jnp.float32(1.0)
    return canvases.astype(jnp.float32)


def in_passes(fn, x: jax.Array, passes: int) -> jax.Array:
    """``fn(x)`` computed in ``passes`` sequential passes (``lax.map``: the temporaries of one pass, not of the
    batch). Pass ``j`` takes examples ``j, j + passes, j + 2 * passes, ...``, so on a mesh that splits the batch
    into contiguous blocks every device works in every pass (when ``passes`` divides its block). ``passes`` 0 or
    1: one call. The batch must divide into the passes."""
    b = x.shape[0]
    if passes <= 1:
        return fn(x)
    if b % passes:
        raise ValueError(f"vae_encode_passes {passes} does not divide the (micro)batch of {b} images")
    pieces = jnp.swapaxes(x.reshape((b // passes, passes) + x.shape[1:]), 0, 1)
    y = jax.lax.map(fn, pieces)
    return jnp.swapaxes(y, 0, 1).reshape((b,) + y.shape[2:])


def conditioning_latents(model, batch: Mapping[str, Any], encode_passes: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(target latents x scaling factor, reference latents, layout latents) of a batch; no gradient (VAE frozen).

    ``target_image`` / ``reference_image`` (B, H, W, 3) in [-1, 1] (the pipeline gives an all-black
    reference for T2I); ``layout_canvases`` (B, K, H, W, 3) uint8 or [-1, 1] with ``layout_mask`` (B, K).
    ``encode_passes`` (``LossConfig.vae_encode_passes``): target and reference images go through the VAE in
    that many passes (:func:`in_passes`; 0: one), which bounds the encodes' memory; layout canvases always go
    one at a time (:meth:`GoT.layout_latents`). A batch that carries ``target_latents`` / ``reference_latents`` /
    ``layout_latents`` (from :class:`got_jax.train.latent_cache.LatentCache`: these encodes, done once per example
    on the host) is not encoded again.
    """
    if LATENT_FIELDS[0] in batch:
        return tuple(jax.lax.stop_gradient(jnp.asarray(batch[k], jnp.float32)) for k in LATENT_FIELDS)
    vae_cfg = model.config.vae
    target = in_passes(lambda im: model.vae.encode(im.astype(model.dtype)).mean, batch["target_image"],
                       encode_passes) * vae_cfg.scaling_factor
    reference = in_passes(model.encode_mode, batch["reference_image"], encode_passes)
    layout = model.layout_latents(canvases_to_model_range(batch["layout_canvases"]), batch["layout_mask"])
    return tuple(jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (target, reference, layout))


def diffusion_loss(model, query_hidden: jax.Array, latents: tuple[jax.Array, jax.Array, jax.Array],
                   time_ids: jax.Array, draws: Draws, schedule: TrainSchedule, cfg: LossConfig) -> jax.Array:
    """Epsilon-prediction MSE (float32, mean over all elements) of the UNet under the SSGM guidance."""
    target, reference, layout = latents
    context, null, pooled = model.semantic_guidance(query_hidden)
    context = jnp.where(draws.drop_text[:, None, None], null, context)
    zeros = jnp.zeros((), jnp.float32)
    layout = jnp.where(draws.drop_layout[:, None, None, None], zeros, layout)
    reference = jnp.where(draws.drop_reference[:, None, None, None], zeros, reference)
    noise = draws.noise + jnp.float32(cfg.noise_offset) * draws.offset[:, None, None, :]
    noisy = schedule.add_noise(target, noise, draws.timesteps)
    eps = model.unet(model.unet_input(noisy, reference, layout), draws.timesteps, context, pooled,
                     time_ids.astype(model.dtype))
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))


def query_hidden_states(hidden: jax.Array, query_index: jax.Array) -> jax.Array:
    """Hidden states (B, T, D) at the query positions (B, Q) -> (B, Q, D)."""
    return jnp.take_along_axis(hidden, query_index[:, :, None], axis=1)


def got_loss(model, inputs, batch: Mapping[str, Any], draws: Draws, schedule: TrainSchedule,
             cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts for one (micro)batch: one reasoner forward gives the LM loss and the
    query-token hidden states that condition the UNet.

    ``inputs`` is :class:`got_jax.train.batch.ReasonerInputs` (device arrays); ``batch`` holds the
    image fields (``target_image``, ``reference_image``, ``layout_canvases``, ``layout_mask``,
    ``time_ids``). Returns ``(total, {"loss", "lm_loss", "diffusion_loss"})``.
    """
    reasoner = model.reasoner
    out = reasoner.forward(inputs.input_ids, inputs.positions, inputs.attention_mask, inputs.pixel_values,
                           inputs.vision_aux, with_logits=False)
    hidden = out.hidden_states
    ce = lm_cross_entropy(hidden, lm_head_weight(reasoner), inputs.target_ids, inputs.target_mask,
                          vocab_chunk=cfg.vocab_chunk, dtype=model.dtype)
    q = query_hidden_states(hidden, inputs.query_index)
    mse = diffusion_loss(model, q, conditioning_latents(model, batch, int(cfg.vae_encode_passes)), batch["time_ids"],
                         draws, schedule, cfg)
    total = jnp.float32(cfg.lm_weight) * ce + jnp.float32(cfg.diffusion_weight) * mse
    return total, {"loss": total, "lm_loss": ce, "diffusion_loss": mse}
