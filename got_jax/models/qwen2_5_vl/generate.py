"""Decoding for the Qwen2.5-VL reasoner: prefill + fixed-size KV cache + ``lax.while_loop``, one jit.

:class:`Sampler` is a frozen dataclass of static settings (gemma style); calling it runs one
compiled program per (batch, prompt length, patch count, settings) that prefills the prompt (image
features scattered in), then samples one token per loop step with ``jax.random.fold_in(key, step)``.
Prompts are left-padded (``attention_mask`` 0 on the left). Generated tokens continue the M-RoPE
positions after the prompt's largest position (transformers' ``rope_deltas``).

:func:`forward` / :func:`forward_hidden` are the cache-free jitted forwards (logits and / or last
hidden states after the final norm for every input position). Both split the model once
(:func:`split_model`) and reuse jitted functions closed over its graphdef, so a call costs no graph walk.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax.models.qwen2_5_vl.model import KVCache, ModelOutput, Qwen2_5_VLForConditionalGeneration


@flax.struct.dataclass
class GenerateOutput:
    """``tokens`` (B, N) int32 (``pad_token_id`` after a row stopped; the stop token itself is kept),
    ``lengths`` (B,) tokens generated per row (including the stop token), and ``hidden_states``
    (B, N, D) or None: for each generated token, the last-layer hidden state (after the final norm) at
    the position that predicted it (the last prompt token for token 0, generated token j-1 for j)."""

    tokens: Any
    lengths: Any
    hidden_states: Any = None


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """One token per row of ``logits`` (B, V): greedy when ``temperature == 0``, else top-k / top-p sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each token
        drop_sorted = before > top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static decoding settings; ``sampler(model, input_ids, ...)`` generates.

    ``temperature`` 0 means greedy. ``stop_token_ids``: a row stops after emitting one of them.
    ``cache_length`` (default prompt + ``max_new_tokens``) fixes the KV-cache size.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    return_hidden_states: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampler: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"Sampler: bad settings temperature={self.temperature} top_k={self.top_k} "
                             f"top_p={self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def __call__(self, model: Qwen2_5_VLForConditionalGeneration, input_ids, *, attention_mask=None,
                 pixel_values=None, image_grid_thw=None, key: jax.Array | None = None,
                 cache_length: int | None = None) -> GenerateOutput:
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
        positions, _, mask, aux = model.prepare(ids, image_grid_thw, attention_mask)
        if not mask[:, -1].all():
            raise ValueError("generate needs left padding: attention_mask must be 1 at the last position of every row")
        if self.temperature > 0 and key is None:
            raise ValueError("sampling with temperature > 0 needs an explicit PRNG key")
        length = ids.shape[1] + self.max_new_tokens if cache_length is None else int(cache_length)
        if length < ids.shape[1] + self.max_new_tokens:
            raise ValueError(f"cache_length {length} < prompt {ids.shape[1]} + max_new_tokens {self.max_new_tokens}")
        split = split_model(model)
        key = jax.random.key(0) if key is None else key
        pv = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
        run = split.jitted("generate", lambda g: jax.jit(functools.partial(_generate, g), static_argnums=(0, 1)))
        return run(self, length, split.state, jnp.asarray(ids, jnp.int32), jnp.asarray(positions),
                   jnp.asarray(mask), pv, aux, key)


class SplitModel:
    """A model's ``nnx.split`` done once, with jitted functions that close over its graphdef.

    ``nnx.split`` walks the whole module graph and a static graphdef is hashed by every jitted call: a few
    ms per call, as much as a small model's prefill on CPU. The state's leaves are the model's own
    ``Variable`` objects, so in-place updates (``var.value = ...``, ``nnx.update``, a training step) are
    seen; replacing modules or variables of a model after its first call needs :func:`clear_split_cache`.
    """

    def __init__(self, model: nnx.Module):
        self.graphdef, self.state = nnx.split(model)
        self._fns: dict[str, Callable] = {}

    def jitted(self, name: str, build: Callable[[Any], Callable]) -> Callable:
        """The function ``build(graphdef)`` made once per model and ``name``."""
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = build(self.graphdef)
        return fn


_SPLITS: "weakref.WeakKeyDictionary[nnx.Module, SplitModel]" = weakref.WeakKeyDictionary()


def split_model(model: nnx.Module) -> SplitModel:
    """The cached :class:`SplitModel` of ``model`` (made on first use, dropped with the model)."""
    split = _SPLITS.get(model)
    if split is None:
        split = _SPLITS[model] = SplitModel(model)
    return split


def clear_split_cache(model: nnx.Module | None = None) -> None:
    """Forget the cached split of ``model`` (all models when None): call after changing its structure."""
    if model is None:
        _SPLITS.clear()
    else:
        _SPLITS.pop(model, None)


def _generate(graphdef, sampler: Sampler, length: int, state, input_ids, positions, mask, pixel_values, aux, key):
    model = nnx.merge(graphdef, state)
    cfg = model.cfg.text
    b, t = input_ids.shape
    n = sampler.max_new_tokens
    cache = KVCache.zeros(cfg, b, length, model.dtype)
    cache = cache._replace(valid=cache.valid.at[:, :t].set(mask))
    slots = jnp.arange(length)
    prefill_mask = (slots[None, :] <= jnp.arange(t)[:, None])[None] & cache.valid[:, None, :]
    x = model.embed(input_ids, pixel_values, aux)
    hidden, cache = model.language_model(x, positions, prefill_mask, cache, 0, kv_valid=cache.valid)
    last = hidden[:, -1]
    start = jnp.max(positions, axis=(0, 2)) + 1  # (B,) next M-RoPE position of each row
    stops = jnp.asarray(sampler.stop_token_ids or (-1,), jnp.int32)

    tokens = jnp.full((b, n), sampler.pad_token_id, jnp.int32)
    hiddens = jnp.zeros((b, n, cfg.hidden_size), hidden.dtype) if sampler.return_hidden_states else None
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)
    carry = (jnp.int32(0), tokens, hiddens, lengths, done, model.logits(last[:, None])[:, 0], last, cache)

    def cond(c):
        i, _, _, _, done, *_ = c
        return (i < n) & ~jnp.all(done)

    def body(c):
        i, tokens, hiddens, lengths, done, logits, last, cache = c
        tok = sample_logits(logits, jax.random.fold_in(key, i), sampler.temperature, sampler.top_k, sampler.top_p)
        tok = jnp.where(done, sampler.pad_token_id, tok)
        tokens = tokens.at[:, i].set(tok)
        if hiddens is not None:
            hiddens = hiddens.at[:, i].set(last)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        slot = t + i
        valid = cache.valid.at[:, slot].set(True)
        cache = cache._replace(valid=valid)
        step_mask = (valid & (slots <= slot)[None])[:, None, :]
        pos = jnp.broadcast_to((start + i)[None, :, None], (3, b, 1))
        h, cache = model.language_model(model.embed(tok[:, None]), pos, step_mask, cache, slot)
        return i + 1, tokens, hiddens, lengths, done, model.logits(h)[:, 0], h[:, 0], cache

    _, tokens, hiddens, lengths, *_ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens=tokens, lengths=lengths, hidden_states=hiddens)


def generate(model: Qwen2_5_VLForConditionalGeneration, input_ids, *, max_new_tokens: int, attention_mask=None,
             pixel_values=None, image_grid_thw=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_token_ids=None, pad_token_id: int = 0, return_hidden_states: bool = False,
             key: jax.Array | None = None, cache_length: int | None = None) -> GenerateOutput:
    """Convenience wrapper: builds a :class:`Sampler` (stop ids default to the config's eos ids) and runs it."""
    stops = model.cfg.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
    sampler = Sampler(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      stop_token_ids=stops, pad_token_id=pad_token_id, return_hidden_states=return_hidden_states)
    return sampler(model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                   image_grid_thw=image_grid_thw, key=key, cache_length=cache_length)


def _forward(graphdef, with_logits, state, input_ids, positions, mask, pixel_values, aux) -> ModelOutput:
    return nnx.merge(graphdef, state).forward(input_ids, positions, mask, pixel_values, aux, with_logits)


def forward(model: Qwen2_5_VLForConditionalGeneration, input_ids, *, attention_mask=None, pixel_values=None,
            image_grid_thw=None, with_logits: bool = True) -> ModelOutput:
    """Jitted cache-free forward: logits (B, T, V) float32 (None with ``with_logits=False``) and last
    hidden states (B, T, D) after the final norm. One compile per input shape."""
    positions, _, mask, aux = model.prepare(input_ids, image_grid_thw, attention_mask)
    split = split_model(model)
    run = split.jitted("forward", lambda g: jax.jit(functools.partial(_forward, g), static_argnums=0))
    pv = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    return run(with_logits, split.state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(positions),
               jnp.asarray(mask), pv, aux)


def forward_hidden(model: Qwen2_5_VLForConditionalGeneration, input_ids, *, attention_mask=None, pixel_values=None,
                   image_grid_thw=None) -> jax.Array:
    """Last-layer hidden states (B, T, D) after the final norm for every input position (cache-free)."""
    return forward(model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                   image_grid_thw=image_grid_thw, with_logits=False).hidden_states
