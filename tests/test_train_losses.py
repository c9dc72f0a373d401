"""Training pieces that need no full GoT: the LM cross-entropy (chunked and not) against torch, the random
draws of the diffusion loss (timesteps, offset noise, CFG-branch dropout), the batch -> reasoner-inputs
function against transformers' M-RoPE, the weight-decay mask and the learning-rate schedule.

Tolerances (float32, highest matmul precision): cross-entropy 1e-6 relative, its gradients 1e-5 relative
to their scale; draw frequencies within 5 binomial standard deviations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_fixtures import hf_reasoner, pipeline_batch
from train_reference import learning_rate

from got_jax.got.tokenizer import got_token_ids, load_tokenizer
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.train import losses
from got_jax.train.batch import reasoner_inputs
from got_jax.train.step import OptimConfig, decay_mask, learning_rate_schedule


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("chunk", [None, 16, 37, 1000])
def test_lm_cross_entropy_matches_torch(chunk):
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 7, 5, 101  # 101 is prime: the last chunk is ragged for every chunk size
    h = rng.standard_normal((b, t, d)).astype(np.float32)
    w = rng.standard_normal((d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.6
    mask[0, 0] = True

    def ours(h, w):
        return losses.lm_cross_entropy(h, w, jnp.asarray(targets), jnp.asarray(mask), vocab_chunk=chunk)

    loss, (gh, gw) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
    th, tw = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    labels = torch.where(torch.tensor(mask), torch.tensor(targets).long(), torch.tensor(-100))
    ref = F.cross_entropy((th @ tw).reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    ref = float(ref.detach())
    assert abs(float(loss) - ref) <= 1e-6 * abs(ref)
    assert _rel(gh, th.grad.numpy()) <= 1e-5 and _rel(gw, tw.grad.numpy()) <= 1e-5


def test_chunked_cross_entropy_never_builds_full_logits():
    """With a vocabulary chunk no (B, T, V) array appears in the jaxpr of the loss or its gradient."""
    b, t, d, v = 2, 3, 4, 64
    f = jax.grad(lambda h, w: losses.lm_cross_entropy(h, w, jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool),
                                                      vocab_chunk=16), argnums=(0, 1))
    jaxpr = jax.make_jaxpr(f)(jnp.ones((b, t, d)), jnp.ones((d, v)))
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            shapes.update(tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert (b, t, v) not in shapes and (b, t, 16) in shapes


def test_draws_follow_the_recipe():
    cfg = losses.LossConfig(cond_dropout_prob=0.3, cond_branch_probs=(0.5, 0.3, 0.2))
    n = 20000
    d = losses.draw(jax.random.key(1), (n, 2, 2, 4), 1000, cfg)
    t = np.asarray(d.timesteps)
    assert t.min() >= 0 and t.max() <= 999 and len(np.unique(t)) > 900
    assert d.noise.shape == (n, 2, 2, 4) and d.offset.shape == (n, 4)
    assert abs(float(np.std(d.offset)) - 1.0) < 0.03
    combos = np.stack([d.drop_text, d.drop_layout, d.drop_reference], -1)
    # only the four-way CFG branches ever appear
    allowed = {tuple(c) for c in losses.CFG_BRANCHES}
    assert {tuple(c) for c in combos.tolist()} <= allowed
    expected = [1 - 0.3, 0.3 * 0.5, 0.3 * 0.3, 0.3 * 0.2]
    for branch, p in zip(losses.CFG_BRANCHES, expected):
        freq = float(np.mean(np.all(combos == np.asarray(branch), axis=-1)))
        assert abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n), (branch, freq, p)
    same = losses.draw(jax.random.key(1), (n, 2, 2, 4), 1000, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(same)))


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="cond_branch_probs"):
        losses.LossConfig(cond_branch_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="cond_dropout_prob"):
        losses.LossConfig(cond_dropout_prob=1.5)
    with pytest.raises(ValueError, match="vae_encode_passes"):
        losses.LossConfig(vae_encode_passes=-1)


def test_vae_encodes_in_passes_give_the_same_latents_sharded_or_not():
    """conditioning_latents with the target / reference encodes split into passes (LossConfig.vae_encode_passes,
    the memory knob of pod-scale steps) equals the one-pass result, float32, to 1e-5 relative (measured 1.2e-6: a
    conv over fewer images rounds differently; examples put back in the wrong order differ by O(1)); also jitted with the batch split over 8 devices; a count that does not divide
    the batch is an error naming it."""
    from flax import nnx

    from got_jax import sharding
    from got_jax.got.demo import demo_config, random_model

    model = random_model(demo_config(), 0)
    rng = np.random.default_rng(0)
    batch = {"target_image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
             "reference_image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
             "layout_canvases": rng.integers(0, 255, (8, 2, 32, 32, 3)).astype(np.uint8),
             "layout_mask": np.array([[1, 0], [1, 1]] * 4, bool)}
    want = [np.asarray(x) for x in losses.conditioning_latents(model, batch)]
    assert np.abs(want[0]).max() > 0.1 and np.abs(want[1]).max() > 0.1
    for passes in (2, 4, 8):
        got = losses.conditioning_latents(model, batch, passes)
        for w, g in zip(want, got):
            assert _rel(np.asarray(g), w) < 1e-5, passes
    with pytest.raises(ValueError, match="vae_encode_passes 3 does not divide the \\(micro\\)batch of 8 images"):
        losses.conditioning_latents(model, batch, 3)

    mesh = sharding.make_mesh((1, 8, 1), devices=jax.devices()[:8])
    from configs.sharding_rules import RULES

    with sharding.use_mesh(mesh, RULES):
        placed = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
                  for k, v in batch.items()}
        got = nnx.jit(lambda m, b: losses.conditioning_latents(m, b, 4))(model, placed)
    for w, g in zip(want, got):
        assert _rel(np.asarray(g), w) < 1e-5


@pytest.mark.parametrize("kind", ["generation", "editing"])
def test_reasoner_inputs_teacher_forcing_and_mrope(tok, kind):
    batch = pipeline_batch(tok, kind)
    hf = hf_reasoner(tok, tied=False, seed=0)
    cfg = Qwen2_5_VLConfig.from_hf_config(hf.config.to_dict())
    inp = reasoner_inputs(batch, cfg)
    ids = got_token_ids(tok)
    # the LM predicts exactly the answer tokens (GoT text + <|im_gen_start|>), each from the previous position
    for row in range(len(batch["input_ids"])):
        predicted = inp.target_ids[row][inp.target_mask[row]]
        assert np.array_equal(predicted, batch["input_ids"][row][batch["loss_mask"][row]])
        assert predicted[-1] == ids.im_gen_start
        assert ids.image_pad not in predicted and ids.query[0] not in predicted
        # the 64 query tokens, in order, right after <|im_gen_start|>
        q = inp.query_index[row]
        assert np.array_equal(batch["input_ids"][row][q], ids.query[:64])
        assert batch["input_ids"][row][q[0] - 1] == ids.im_gen_start
    # M-RoPE positions (image tokens by their grid) equal transformers' on the real tokens
    kw = {}
    if kind == "editing":
        grids = torch.tensor(batch["image_grid_thw"]).long()
        kw = {"image_grid_thw": grids}
        n_img = int((inp.input_ids == ids.image_pad).sum())
        assert inp.pixel_values.shape == (len(grids) * 16, 1176) and n_img == int(grids.prod(-1).sum()) // 4
        assert inp.vision_aux.num_patches == inp.pixel_values.shape[0]
    else:
        assert inp.pixel_values is None and inp.vision_aux is None
    ref, _ = hf.model.get_rope_index(torch.tensor(inp.input_ids).long(), torch.tensor(inp.mm_token_type_ids),
                                     attention_mask=torch.tensor(batch["attention_mask"]).long(), **kw)
    m = inp.attention_mask
    assert np.array_equal(ref.numpy()[:, m], inp.positions[:, m])


def test_reasoner_inputs_errors_name_the_key(tok):
    batch = pipeline_batch(tok, "generation")
    cfg = Qwen2_5_VLConfig.from_hf_config(hf_reasoner(tok, tied=False, seed=0).config.to_dict())
    with pytest.raises(KeyError, match="query_mask"):
        reasoner_inputs({k: v for k, v in batch.items() if k != "query_mask"}, cfg)
    bad = dict(batch, query_mask=np.roll(batch["query_mask"], 1, axis=1) & batch["query_mask"])
    with pytest.raises(ValueError, match="query tokens"):
        reasoner_inputs(bad, cfg)
    with pytest.raises(ValueError, match="attention_mask"):
        reasoner_inputs(dict(batch, attention_mask=batch["attention_mask"][:, :-1]), cfg)


def test_weight_decay_mask_and_schedule():
    params = {"proj": {"kernel": np.ones((3, 4)), "bias": np.ones((4,))}, "q": {"kernel": np.ones((3, 2, 2)),
              "bias": np.ones((2, 2))}, "norm": {"weight": np.ones((3,))}, "embed": {"embedding": np.ones((5, 3))}}
    mask = decay_mask(params)
    assert mask == {"proj": {"kernel": True, "bias": False}, "q": {"kernel": True, "bias": False},
                    "norm": {"weight": False}, "embed": {"embedding": True}}
    cfg = OptimConfig(learning_rate=3e-4, warmup_steps=10, total_steps=50, end_learning_rate=1e-5)
    sched = learning_rate_schedule(cfg)
    for s in (0, 1, 9, 10, 11, 30, 49, 50, 70):
        want = learning_rate(s, peak=3e-4, warmup=10, total=50, end=1e-5)
        assert abs(float(sched(s)) - want) <= 1e-6 * 3e-4, s


def test_dropout_streams_reseeded_per_step():
    """The step reseeds every RNG stream (LoRA dropout) from its key: same key same mask, new key new mask."""
    from flax import nnx

    from got_jax.models.options import ModelOptions
    from got_jax.models.qwen2_5_vl.model import DenseGeneral
    from got_jax.train.step import _reseed_dropout

    m = DenseGeneral("BTD,DF->BTF", (4, 6), ("embed", "mlp"), options=ModelOptions(lora_rank=2, lora_dropout=0.5),
                     rngs=nnx.Rngs(0), lora=True)
    m.lora_b[...] = jnp.ones_like(m.lora_b[...])
    x = jnp.ones((1, 8, 4))
    outs = []
    for k in (1, 1, 2):
        _reseed_dropout(m, jax.random.key(k))
        outs.append(np.asarray(m(x)))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_gradient_accumulation_averages_microbatches():
    """grad_accum=2 over two equal microbatches = one step on the whole batch for a mean-reduced loss
    (same loss, gradients and updated parameters), through the real TrainStep / AdamW chain."""
    from flax import nnx

    from got_jax.train import step as S

    class Toy(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
            self.frozen = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

    def loss_fn(m, inputs, images, draws, schedule, cfg):
        err = m.frozen(m.lin(inputs["x"])) - images["y"] * draws
        loss = jnp.mean(jnp.square(err))
        return loss, {"loss": loss}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = rng.standard_normal((4, 2)).astype(np.float32)
    d = rng.standard_normal((4, 1)).astype(np.float32)
    cfg = S.OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, clip_norm=0.5)
    results = []
    for accum in (1, 2):
        ts = S.TrainState(Toy(), S.make_tx(cfg), nnx.PathContains("lin"))
        step, state = S.TrainStep.create(ts, schedule=None, loss_cfg=None, optim_cfg=cfg, return_grads=True,
                                         loss_fn=loss_fn)
        split = lambda a: a.reshape((accum, -1) + a.shape[1:])  # noqa: E731
        state, m = step(state, {"inputs": {"x": split(x)}, "images": {"y": split(y)}}, jax.random.key(0), split(d))
        results.append((m, nnx.to_pure_dict(state)))
    (m1, s1), (m2, s2) = results
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(m1["grads"])), jax.tree.leaves(nnx.to_pure_dict(m2["grads"]))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(m1["grad_norm"]) > 0.5  # clipping was active
    frozen = s1["model"]["frozen"]["kernel"]
    np.testing.assert_array_equal(frozen, nnx.to_pure_dict(nnx.state(Toy()))["frozen"]["kernel"])
