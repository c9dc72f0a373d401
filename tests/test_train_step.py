"""The GoT train step against a PyTorch reference step (tests/train_reference.py) on the same tiny GoT.

Two cases, each one compiled step reused by every assertion on it:

* T2I: untied reasoner, LoRA r=4 with rsLoRA, batch of 4 real pipeline examples (shapes data);
* editing: tied embeddings, LoRA r=4, batch of 2 with a source image (vision tower + M-RoPE grid).

Both fed the same batch, timesteps, noise, noise offset and condition-dropout choices (one example
per case trains under a dropped-condition CFG branch). Tolerances (float32, highest matmul precision):
losses 1e-5 relative; gradients of every trainable tensor 1e-4 relative to that tensor's gradient
scale; parameters after one AdamW step 1e-5 x max(1, |param|); sharded (data 2 x fsdp 2 x tensor 2 on
8 fake CPU devices) vs single-device step 1e-5 on losses and updated parameters. Also: the optimizer
holds exactly the trainable parameters, frozen parts (VAE, vision tower, LoRA base weights) do not move
over several steps, and bfloat16 compute with the recipe's LoRA dropout lowers the loss on shapes data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
import train_reference as ref
from flax import nnx
from configs.sharding_rules import RULES

from got_jax import sharding
from got_jax.checkpoint.mapping import path_str
from got_jax.diffusion.schedulers import TrainSchedule
from got_jax.got.model import GoT
from got_jax.got.tokenizer import got_token_ids, load_tokenizer
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl.lora import materialize
from got_jax.train import losses
from got_jax.train import step as S
from got_jax.train.latent_cache import LatentCache
from got_jax.train.trainable import frozen_filter, trainable_filter

pytestmark = pytest.mark.slow

LR = 1e-3
OPTIM = S.OptimConfig(learning_rate=LR, warmup_steps=0, total_steps=100, clip_norm=1.0)
LOSS = losses.LossConfig()


@dataclasses.dataclass
class Case:
    parts: ref.TorchGoTParts
    mapping: dict
    options: ModelOptions
    batch: dict
    draws: dict
    prepared: dict
    step: S.TrainStep
    initial: nnx.State  # host copy of the state before the step
    graphdef: object
    ref: dict
    metrics: dict
    after: nnx.State

    def fresh_state(self):
        return jax.tree.map(jnp.array, self.initial)  # copies: the step donates its state


def _draws(b: int, editing: bool) -> dict:
    rng = np.random.default_rng(11)
    drop = np.zeros((b, 3), bool)
    drop[-1] = losses.CFG_BRANCHES[3 if editing else 2]  # last example: a dropped-condition branch
    return dict(timesteps=rng.integers(0, 1000, b).astype(np.int32),
                noise=rng.standard_normal((b, fx.SIZE // 2, fx.SIZE // 2, 4)).astype(np.float32),
                offset=rng.standard_normal((b, 4)).astype(np.float32),
                drop_text=drop[:, 0], drop_layout=drop[:, 1], drop_reference=drop[:, 2])


def _stacked(draws: dict) -> losses.Draws:
    return losses.Draws(**{k: np.asarray(v)[None] for k, v in draws.items()})


def _build(tok, kind: str, *, tied: bool, rslora: bool, batch_size: int) -> Case:
    parts = fx.torch_got(tok, tied=tied, lora_rank=4, lora_alpha=8.0, seed=3, rslora=rslora)
    options = ModelOptions(lora_rank=4, lora_alpha=8.0, use_rslora=rslora)
    model, mapping = fx.to_jax(parts, options)
    batch = fx.pipeline_batch(tok, kind, batch_size=batch_size)
    draws = _draws(batch_size, kind == "editing")
    ts = S.TrainState(model, S.make_tx(OPTIM), trainable_filter(options))
    step, state = S.TrainStep.create(ts, schedule=TrainSchedule.from_config(fx.SCHEDULER), loss_cfg=LOSS,
                                     optim_cfg=OPTIM, return_grads=True)
    initial = jax.device_get(state)
    prepared = S.prepare_batch(batch, model.config.reasoner)
    after, metrics = step(state, prepared, jax.random.key(0), _stacked(draws))
    reference = ref.train_step(parts, batch, draws, lr=LR, image_token_id=got_token_ids(tok).image_pad)
    return Case(parts, mapping, options, batch, draws, prepared, step, initial, step.graphdef, reference,
                jax.device_get(metrics), after)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def t2i(tok):
    return _build(tok, "generation", tied=False, rslora=True, batch_size=4)


@pytest.fixture(scope="module")
def edit(tok):
    return _build(tok, "editing", tied=True, rslora=False, batch_size=2)


def _flat(state) -> dict:
    return {path_str(p): np.array(v.get_value() if hasattr(v, "get_value") else v, copy=True)
            for p, v in nnx.to_flat_state(state)}


def _check_parity(case: Case):
    for k in ("loss", "lm_loss", "diffusion_loss"):
        want = case.ref["losses"][k]
        assert abs(float(case.metrics[k]) - want) <= 1e-5 * abs(want), (k, float(case.metrics[k]), want)
    grads = _flat(case.metrics["grads"])
    assert all(p in case.mapping for p in grads)
    torch_names = {case.mapping[p][0] for p in grads}
    assert torch_names == set(case.ref["grads"]), sorted(torch_names ^ set(case.ref["grads"]))[:10]
    after = _flat(case.after)
    for path, g in grads.items():
        name, hook = case.mapping[path]
        tg = np.asarray(hook.to_jax(case.ref["grads"][name].numpy()))
        scale = float(np.abs(tg).max())
        assert scale > 0, f"{path}: zero torch gradient (the test would not see a wrong one)"
        err = float(np.abs(g - tg).max())
        assert err <= 1e-4 * scale, f"gradient of {path}: max error {err:.3g} vs scale {scale:.3g}"
        tp = np.asarray(hook.to_jax(case.ref["params"][name].numpy()))
        err = float(np.abs(after["model." + path] - tp).max())
        assert err <= 1e-5 * max(1.0, float(np.abs(tp).max())), f"{path} after AdamW: max error {err:.3g}"


def test_t2i_step_matches_pytorch(t2i):
    _check_parity(t2i)


def test_editing_step_matches_pytorch(edit):
    assert edit.prepared["inputs"].pixel_values is not None  # the vision tower and image M-RoPE are in play
    _check_parity(edit)


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_step_on_cached_latents_matches_pytorch(name, request):
    """``loss.cache_latents``: the same step with the frozen-VAE encodes done beforehand by
    :class:`got_jax.train.latent_cache.LatentCache` (the step skips them) against the same PyTorch step."""
    case = request.getfixturevalue(name)
    model = nnx.merge(case.graphdef, case.fresh_state()).model
    cached = LatentCache(model).attach(case.batch)
    prepared = S.prepare_batch(cached, model.config.reasoner)
    assert "target_image" not in prepared["images"]
    after, metrics = case.step(case.fresh_state(), prepared, jax.random.key(0), _stacked(case.draws))
    _check_parity(dataclasses.replace(case, metrics=jax.device_get(metrics), after=after))


def test_optimizer_holds_only_trainable_parameters(edit):
    state = nnx.merge(edit.graphdef, edit.fresh_state())
    model = state.model
    trainable = set(_flat(nnx.state(model, trainable_filter(edit.options))))
    frozen = set(_flat(nnx.state(model, frozen_filter(edit.options))))
    assert trainable and frozen and not trainable & frozen
    assert trainable | frozen == set(_flat(nnx.state(model, nnx.Param)))
    assert any(p.startswith("vae.") for p in frozen) and any(".visual." in f".{p}" for p in frozen)
    assert not any(p.startswith(("vae.", "reasoner.visual.")) for p in trainable)
    assert any(p.endswith("lora_a") for p in trainable) and "reasoner.language_model.layers.0.self_attn.q_proj.kernel" in frozen
    mu = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(state.optimizer.opt_state))]
    for p in mu:
        if p.endswith(("count",)):
            continue
        assert any(p.endswith("." + t) for t in trainable), f"optimizer state entry {p} is not a trainable parameter"
    for t in trainable:  # AdamW's first and second moments for every trainable tensor
        assert sum(p.endswith("." + t) for p in mu) == 2, t


def test_frozen_parts_do_not_move(edit, tok):
    state = edit.fresh_state()
    before = _flat(nnx.state(nnx.merge(edit.graphdef, state).model, frozen_filter(edit.options)))
    trained_before = _flat(nnx.state(nnx.merge(edit.graphdef, state).model, trainable_filter(edit.options)))
    model = nnx.merge(edit.graphdef, state).model
    for i in range(3):
        d = jax.jit(lambda k: S.draws_for(k, edit.prepared, model, edit.step.schedule, LOSS))(jax.random.key(i))
        state, _ = edit.step(state, edit.prepared, jax.random.key(100 + i), jax.device_get(d))
    m = nnx.merge(edit.graphdef, state).model
    after = _flat(nnx.state(m, frozen_filter(edit.options)))
    for p, v in before.items():
        assert np.array_equal(v, after[p]), f"frozen {p} changed"
    trained = _flat(nnx.state(m, trainable_filter(edit.options)))
    moved = [p for p, v in trained_before.items() if not np.array_equal(v, trained[p])]
    assert len(moved) == len(trained_before), sorted(set(trained_before) - set(moved))[:10]


def test_sharded_step_equals_single_device(t2i):
    devices = jax.devices()
    assert len(devices) >= 8, "tests/conftest.py sets 8 fake CPU devices (XLA_FLAGS overridden?)"
    mesh = sharding.make_mesh((2, 2, 2), devices[:8])
    step = S.TrainStep(t2i.graphdef, t2i.initial, schedule=t2i.step.schedule, loss_cfg=LOSS, optim_cfg=OPTIM,
                       mesh=mesh, rules=RULES)
    state = step.place_state(t2i.fresh_state())
    after, metrics = step(state, t2i.prepared, jax.random.key(0), _stacked(t2i.draws))
    for k in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
        assert abs(float(metrics[k]) - float(t2i.metrics[k])) <= 1e-5 * abs(float(t2i.metrics[k])), k
    single = _flat(t2i.after)
    sharded_axes = set()
    for p, var in nnx.to_flat_state(after):
        key = path_str(p)
        value = var.get_value()
        names = sharding.variable_names(var)
        want = sharding.logical_to_spec(names, RULES, mesh, value.shape) if names else jax.sharding.PartitionSpec()
        assert value.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), value.ndim), \
            f"{key}: sharding {value.sharding.spec} != {want} from names {names}"
        sharded_axes |= {a for s in want for a in ((s,) if isinstance(s, str) else (s or ()))}
        got = np.asarray(value)
        err = float(np.abs(got - single[key]).max()) if got.size else 0.0
        assert err <= 1e-5 * max(1.0, float(np.abs(single[key]).max())), f"{key}: sharded vs single {err:.3g}"
    assert {"fsdp", "tensor"} <= sharded_axes  # the rules really shard parameters and optimizer state


def test_bf16_training_with_lora_dropout_lowers_the_loss(t2i, tok):
    """The recipe's LoRA dropout (0.05) and bfloat16 compute over float32 master weights, from the T2I case's
    weights: a few dozen steps on fresh shapes batches (same static shapes) lower the loss; parameters and
    optimizer state stay float32. Draws and dropout keys are made inside the jitted step."""
    from got_jax.data import pipeline as P

    options = ModelOptions(dtype=jnp.bfloat16, lora_rank=4, lora_alpha=8.0, use_rslora=True, lora_dropout=0.05)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GoT(fx.got_config(t2i.parts), options=options,
                                                              rngs=nnx.Rngs(0))))
    source = _flat(nnx.state(nnx.merge(t2i.graphdef, t2i.fresh_state()).model))
    flat = nnx.to_flat_state(abstract)
    for p, var in flat:
        if path_str(p) in source:
            var.set_value(jnp.asarray(source[path_str(p)]))
    model = materialize(nnx.merge(graphdef, nnx.from_flat_state(flat)), jax.random.key(0))
    assert any(isinstance(v, nnx.RngKey) for _, v in nnx.to_flat_state(nnx.state(model)))  # dropout streams
    ts = S.TrainState(model, S.make_tx(OPTIM), trainable_filter(options))
    step, state = S.TrainStep.create(ts, schedule=t2i.step.schedule, loss_cfg=LOSS, optim_cfg=OPTIM)

    # same static shapes as the compiled step: examples with longer text or more boxes are skipped
    recs = [fx.generation_record(i) for i in range(64)]
    cfg = P.PipelineConfig(kind="generation", batch_size=4, max_text_len=256, seed=5, max_bad_fraction=0.6, **fx.PIPE)
    it = iter(P.make_dataset(P.records_source(recs), cfg, tok))
    totals = []
    for i in range(30):
        prepared = S.prepare_batch(next(it), model.config.reasoner)
        state, m = step(state, prepared, jax.random.key(1000 + i))
        totals.append(float(m["loss"]))
    assert np.all(np.isfinite(totals))
    first, last = np.mean(totals[:5]), np.mean(totals[-5:])
    assert last < 0.7 * first, totals
    for p, var in nnx.to_flat_state(state):
        v = var.get_value()
        if jnp.issubdtype(v.dtype, jnp.floating):
            assert v.dtype == jnp.float32, (path_str(p), v.dtype)
