"""Qwen2.5-VL decoding: greedy and seeded sampled ids equal transformers' ``generate``; hidden states.

Uses the tiny random model of ``test_qwen_model`` (saved with ``save_pretrained``, loaded with
``load_hf_checkpoint``). Hidden states are compared float32 at highest matmul precision with
``max abs err <= 1e-4 * max(1, max |reference|)``; token ids must be equal. Sampled decoding is
compared under the same Gumbel noise with transformers' own logits warpers (tests/got_reference.py).
"""

import jax
import numpy as np
import pytest
import torch

from got_jax.models.qwen2_5_vl import Sampler, forward_hidden, generate, load_hf_checkpoint, sample_logits
from got_reference import sampling_processors
from test_qwen_model import IMG, build_hf, check, image_inputs, image_span

N = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_gen")
    hf = build_hf(path, tied=False, seed=2)
    return hf, load_hf_checkpoint(path)


def _hf_generate(hf, ids, mask, pv=None, grid=None, **kw):
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N, do_sample=False,
                pad_token_id=0)
    if pv is not None:
        args.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                    mm_token_type_ids=torch.tensor((np.asarray(ids) == IMG).astype(np.int64)))
    with torch.no_grad():
        out = hf.generate(**args, **kw)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_batch_with_image_and_padding_matches_hf(tiny):
    hf, model = tiny
    pv, grid = image_inputs([(48, 32)])
    row0 = [5, 6] + image_span(grid[0]) + [7, 8, 9]
    row1 = [11, 12, 13, 14, 15]
    t = len(row0)
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    ids[0], mask[0] = row0, 1
    ids[1, t - len(row1):], mask[1, t - len(row1):] = row1, 1  # left padding
    ref = _hf_generate(hf, ids, mask, pv, grid, eos_token_id=None)
    out = generate(model, ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, max_new_tokens=N,
                   stop_token_ids=(), return_hidden_states=True)
    tokens = np.asarray(out.tokens)
    assert ref.shape == (2, N) and len(set(ref[0].tolist())) > 3  # a real sequence, not one repeated token
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_array_equal(np.asarray(out.lengths), [N, N])
    # hidden states: HF forward over prompt + generated ids; the state that predicted token j sits at t - 1 + j
    full = np.concatenate([ids, tokens], 1)
    fmask = np.concatenate([mask, np.ones_like(tokens)], 1)
    with torch.no_grad():
        r = hf(input_ids=torch.tensor(full), attention_mask=torch.tensor(fmask), pixel_values=torch.tensor(pv),
               image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor((full == IMG).astype(np.int64)),
               output_hidden_states=True)
    ref_hidden = r.hidden_states[-1].numpy()  # last layer after the final norm
    check(out.hidden_states, ref_hidden[:, t - 1:t - 1 + N])
    # the cache-free hidden-state forward (what GoT uses for appended query tokens)
    fh = forward_hidden(model, full, attention_mask=fmask, pixel_values=pv, image_grid_thw=grid)
    check(fh, ref_hidden, fmask.astype(bool))


def test_stop_tokens_text_only(tiny):
    hf, model = tiny
    ids = np.array([[21, 22, 23, 24, 25, 26]])
    mask = np.ones_like(ids)
    free = _hf_generate(hf, ids, mask, eos_token_id=None)[0]
    stop = int(free[4])
    first = int(np.nonzero(free == stop)[0][0])
    ref = _hf_generate(hf, ids, mask, eos_token_id=stop)[0]
    out = generate(model, ids, max_new_tokens=N, stop_token_ids=(stop, 209), pad_token_id=0)
    tokens = np.asarray(out.tokens)[0]
    np.testing.assert_array_equal(tokens[:len(ref)], ref)
    assert (tokens[first + 1:] == 0).all() and int(out.lengths[0]) == first + 1


SETTINGS = [(1.0, 1, 1.0), (1.0, 0, 1e-6), (5.0, 3, 1.0), (1.0, 0, 0.5), (0.7, 10, 0.8), (2.0, 0, 1.0)]


def _warped(logits, temperature, top_k, top_p) -> np.ndarray:
    """transformers' logits warpers (its sampling order: temperature, top-k, top-p) on (B, V) logits."""
    scores = torch.from_numpy(np.array(logits, np.float32))
    for proc in sampling_processors(temperature, top_k, top_p, np.zeros((1,) + scores.shape, np.float32)):
        scores = proc(torch.zeros((scores.shape[0], 1), dtype=torch.long), scores)
    return scores.numpy()


def test_sampling_matches_transformers_warpers():
    """``sample_logits`` draws ``categorical(key, processed)``, i.e. ``argmax(processed + gumbel(key))``:
    for each setting and 40 keys it equals the argmax of transformers' warped logits plus the same Gumbel
    noise, so its temperature / top-k / top-p processing is transformers' (greedy at temperature 0)."""
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    np.testing.assert_array_equal(np.asarray(sample_logits(logits, jax.random.key(1), 0.0, 0, 1.0)),
                                  np.argmax(np.asarray(logits), -1))
    for setting in SETTINGS:
        warped = _warped(logits, *setting)
        draws = []
        for i in range(40):
            key = jax.random.key(i)
            want = np.argmax(warped + np.asarray(jax.random.gumbel(key, logits.shape)), -1)
            draws.append(np.asarray(sample_logits(logits, key, *setting)))
            np.testing.assert_array_equal(draws[-1], want, err_msg=f"{setting} key {i}")
        if setting[0] >= 2:
            assert all(len(set(np.stack(draws)[:, r])) > 1 for r in range(4)), setting  # it really samples


def test_sampled_generation_matches_hf_under_the_same_noise(tiny):
    """A seeded sampled decode (left-padded batch of 2, one row with an image): the same key repeats it,
    another key changes it, and it equals transformers' ``generate`` with its own warpers when that is fed
    the Gumbel noise ours draws at token ``i`` (``gumbel(fold_in(key, i))``)."""
    hf, model = tiny
    pv, grid = image_inputs([(32, 48)])
    row0 = [5] + image_span(grid[0]) + [7, 8]
    row1 = [21, 22, 23, 24]
    t = len(row0)
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    ids[0], mask[0] = row0, 1
    ids[1, t - len(row1):], mask[1, t - len(row1):] = row1, 1
    setting = dict(temperature=1.3, top_k=30, top_p=0.95)
    sampler = Sampler(max_new_tokens=N, **setting)
    run = lambda key: np.asarray(sampler(model, ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,  # noqa: E731
                                         key=key).tokens)
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    vocab = model.cfg.text.vocab_size
    for key, ours in ((0, a), (7, c)):
        gumbel = np.stack([np.asarray(jax.random.gumbel(jax.random.fold_in(jax.random.key(key), i), (2, vocab)))
                           for i in range(N)])
        ref = _hf_generate(hf, ids, mask, pv, grid, eos_token_id=None,
                           logits_processor=sampling_processors(**setting, gumbel=gumbel))
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError, match="explicit PRNG key"):
        sampler(model, ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, np.array([[21, 22, 23, 24, 25, 26]]), attention_mask=np.array([[1, 1, 1, 1, 1, 0]]),
                 max_new_tokens=4)
