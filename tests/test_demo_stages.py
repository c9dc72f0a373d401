"""The demo's two training stages (configs/demo_shapes.py at tiny sizes), the ablation switches and the shipped demo.

* A 2-step ``vae`` stage then a 2-step ``got`` stage from it (``model.vae_from``), in-process
  ``train_and_evaluate``, on a shapes set with T2I and editing examples (the seed makes the two steps one of
  each kind): the GoT's VAE equals the VAE stage's newest checkpoint bit for bit after training (frozen), and
  it is not the seeded random VAE; the UNet did train.
* Export of the GoT run + :func:`load_demo` round trip: every parameter equals the trained one, the folder is
  <= 25 MB, the sampling size and (ablation) ``sampling_defaults`` come from its config.json.
* Ablations: ``no_chain`` batches hold prompt + ``<|im_gen_start|>`` + queries exactly as the pipeline builds
  them with ``no_chain=True`` (which never calls the sampler), no LM targets, one black canvas;
  ``no_layout`` draws zero every example's layout latents.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo_shapes
from got_jax.checkpoint.mapping import path_str
from got_jax.data import shapes
from got_jax.got import demo
from got_jax.got.tokenizer import got_token_ids, load_tokenizer, prompt_ids
from got_jax.train import run, setup, tasks
from got_jax.train import vae as V
from got_jax.train.batch import drop_chain

pytestmark = pytest.mark.xdist_group("demo_stages")  # one worker: the two training runs are shared
MAX_DEMO_BYTES = 25 * 2**20


DEMO_GUIDANCE = {"guidance_scale": 2.0, "layout_guidance_scale": 2.0}  # configs/demo_shapes.py's sample.*


def tiny(stage: str, workdir_data: str, seed: int, **over):
    c = demo_shapes.get_config()
    c.stage = stage
    c.seed = seed
    c.num_devices = 1
    c.total_steps = 2
    c.global_batch_size = 2
    c.optim.warmup_steps = 1
    c.eval_every = -1
    c.sample_every = -1
    c.eval_batches = 0
    c.save_every = 1
    c.async_checkpoints = False
    c.log_every = 1
    c.model.demo_hidden = 32
    c.model.demo_vae_blocks = 2  # (16, 16): 32 px -> 16x16 latents
    c.data.shapes_dir = workdir_data
    c.data.generation_weight = 1.0
    c.data.editing_weight = 1.0
    c.data.image_size = 32
    c.data.buckets = ((32, 32),)
    c.data.max_text_len = 256
    c.data.max_text_len_edit = 320
    c.data.max_boxes = 3
    c.eval_examples = 2
    c.sample.size = 32
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _both_kinds_seed() -> int:
    w = np.asarray([0.5, 0.5])
    return next(s for s in range(100)
                if {run.kind_for_step(["editing", "generation"], w, s, i) for i in (0, 1)} == {"editing", "generation"})


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_stages")
    data = str(root / "shapes")
    shapes.main(["--out", data, "--size", "32", "--num-generation", "12", "--num-editing", "8", "--seed", "0"])
    seed = _both_kinds_seed()
    vae_dir, got_dir = str(root / "vae"), str(root / "got")
    vae_out = run.train_and_evaluate(tiny("vae", data, seed), vae_dir)
    got_cfg = tiny("got", data, seed, **{"model.vae_from": vae_dir})
    got_out = run.train_and_evaluate(got_cfg, got_dir)
    return dict(root=root, data=data, seed=seed, vae_dir=vae_dir, got_dir=got_dir, vae_out=vae_out, got_out=got_out,
                got_cfg=got_cfg)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _flat(module):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.slow
def test_vae_then_got_stage_with_frozen_vae(stages):
    s = stages
    for d in (s["vae_dir"], s["got_dir"]):
        m = _metrics(d)
        assert [r["step"] for r in m] == [1, 2] and {r["kind"] for r in m} == {"generation", "editing"}
        assert all(np.isfinite(r["loss"]) for r in m)
    assert {"rec_loss", "kl"} <= set(_metrics(s["vae_dir"])[0])
    assert {"lm_loss", "diffusion_loss"} <= set(_metrics(s["got_dir"])[0])
    stored = V.read_vae_config(s["vae_dir"])
    assert stored["block_out_channels"] == [16, 16] and stored["scaling_factor"] > 0

    trained = nnx.merge(s["got_out"]["graphdef"], s["got_out"]["state"]).model
    c = setup.resolve(s["got_cfg"])
    got_cfg = setup.got_config(c, load_tokenizer())
    assert trained.config.vae.scaling_factor == stored["scaling_factor"]
    fresh = demo.random_model(got_cfg, int(c.seed))
    random_vae = _flat(fresh.vae)
    V.load_vae_into(fresh, s["vae_dir"], got_cfg["vae"])
    want, got = _flat(fresh.vae), _flat(trained.vae)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # frozen: bit-identical to the VAE stage
    assert any(not np.array_equal(want[k], random_vae[k]) for k in want)  # and not the random init
    unet_now, unet_init = _flat(trained.unet), _flat(fresh.unet)
    assert any(not np.array_equal(unet_now[k], unet_init[k]) for k in unet_now)


@pytest.mark.slow
def test_export_and_load_demo_round_trip(stages, tmp_path):
    s = stages
    folder = str(tmp_path / "demo")
    from got_jax.train.export import export_folder

    export_folder(s["got_cfg"], s["got_dir"], folder)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    assert size <= MAX_DEMO_BYTES, size
    pipe, kw = demo.load_demo(folder)
    assert kw == {"height": 32, "width": 32, **DEMO_GUIDANCE}  # the size it was trained at, demo_shapes' scales
    # editing sources are seen as in training (tiny_test: data.reasoner_size 56, not the released 448)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["reasoner_source_size"] == 56
    assert pipe.source_size == 56
    trained = nnx.merge(s["got_out"]["graphdef"], s["got_out"]["state"]).model
    want, got = _flat(trained), _flat(pipe.model)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    abl = str(tmp_path / "no_layout")
    export_folder(tiny("got", s["data"], s["seed"], **{"model.vae_from": s["vae_dir"], "ablation.no_layout": True,
                                                      "ablation.no_chain": True}), s["got_dir"], abl)
    with open(os.path.join(abl, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["ablation"] == {"no_layout": True, "no_chain": True}
    assert cfg["sampling_defaults"] == {"zero_layout": True, "no_chain": True, **DEMO_GUIDANCE}


def test_load_demo_without_weights_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no demo GoT weights in {tmp_path}"):
        demo.load_demo(str(tmp_path))


def test_vae_from_mismatch_is_a_config_error(tmp_path):
    with open(tmp_path / V.VAE_CONFIG, "w") as f:
        json.dump({"block_out_channels": [16, 16, 32], "latent_channels": 4, "scaling_factor": 1.0}, f)
    c = setup.resolve(tiny("got", "", 0, **{"model.vae_from": str(tmp_path)}))
    with pytest.raises(setup.ConfigError, match=r"block_out_channels: VAE stage \[16, 16, 32\] vs GoT \[16, 16\]"):
        setup.got_config(c, load_tokenizer())


def test_demo_unet_overrides_reach_the_unet_config_and_unknown_keys_are_errors():
    from configs import demo_shapes_xattr16  # noqa: PLC0415

    tok = load_tokenizer()
    plain = setup.got_config(setup.resolve(tiny("got", "", 0)), tok)["unet"]
    assert plain["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]  # the shipped demo's UNet
    xattr = demo_shapes_xattr16.get_config().model.demo_unet.to_dict()
    c = setup.resolve(tiny("got", "", 0, **{"model.demo_unet": xattr}))
    cfg = setup.got_config(c, tok)["unet"]
    assert cfg["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]  # recipe 5's try
    assert cfg == plain | {"up_block_types": cfg["up_block_types"]}  # nothing else changed
    c = setup.resolve(tiny("got", "", 0, **{"model.demo_unet": {"up_blocks": ("UpBlock2D",)}}))
    with pytest.raises(setup.ConfigError, match=r"demo_unet: unknown UNet config key\(s\) \['up_blocks'\]"):
        setup.got_config(c, load_tokenizer())


def test_demo_reasoner_overrides_reach_the_reasoner_config_and_unknown_keys_are_errors():
    from configs import demo_shapes_deep  # noqa: PLC0415

    tok = load_tokenizer()
    plain = setup.got_config(setup.resolve(tiny("got", "", 0)), tok)["reasoner"]["text_config"]
    assert plain["num_hidden_layers"] == 2  # the shipped demo's reasoner
    deep = demo_shapes_deep.get_config().model.demo_reasoner.to_dict()
    cfg = setup.got_config(setup.resolve(tiny("got", "", 0, **{"model.demo_reasoner": deep})), tok)
    assert cfg["reasoner"]["text_config"] == plain | {"num_hidden_layers": 4}  # recipe 7's try
    c = setup.resolve(tiny("got", "", 0, **{"model.demo_reasoner": {"num_hidden_layers": 4,
                                                                    "intermediate_size": 96}}))
    cfg = setup.got_config(c, tok)["reasoner"]["text_config"]
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"]) == (4, 96) != (plain["num_hidden_layers"],
                                                                              plain["intermediate_size"])
    assert cfg == plain | {"num_hidden_layers": 4, "intermediate_size": 96}  # nothing else changed
    for key in ("num_layers", "hidden_size"):  # a typo; the width, which demo_hidden sets everywhere
        c = setup.resolve(tiny("got", "", 0, **{"model.demo_reasoner": {key: 4}}))
        with pytest.raises(setup.ConfigError, match=rf"text_config key\(s\) \['{key}'\]; known: "):
            setup.got_config(c, tok)


# ------------------------------------------------------------------------------------------ ablations


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _pipeline_batch(tok, kind, tmp):
    from got_jax.data import pipeline as P
    from got_jax.train import data as D

    data = os.path.join(tmp, "shapes")
    if not os.path.isdir(data):
        shapes.main(["--out", data, "--size", "32", "--num-generation", "4", "--num-editing", "4", "--seed", "1"])
    name = "generation" if kind == "generation" else "editing"
    spec = D.parse_sources(f"file:{data}/annotations/{name}.jsonl@{'shapes' if kind == 'generation' else 'shapes_edit'}")
    src = D.open_source(spec[0], None, kind)
    c = tiny("got", data, 0)
    pcfg = setup.pipeline_config(setup.resolve(c), kind)
    import dataclasses

    pcfg = dataclasses.replace(pcfg, batch_size=2, cond_dropout_prob=0.0)
    return next(iter(P.make_dataset(src, pcfg, tok)))


@pytest.mark.parametrize("kind", ["generation", "editing"])
def test_no_chain_batches_follow_the_prompt_like_sampling(tok, kind, tmp_path_factory):
    batch = _pipeline_batch(tok, kind, str(tmp_path_factory.getbasetemp() / "abl"))
    ids = got_token_ids(tok)
    with open(str(tmp_path_factory.getbasetemp() / "abl" / "shapes" / "annotations" / "generation.jsonl")) as f:
        captions = [prompt_ids(tok, json.loads(line)["caption"]) for line in f]
    out = drop_chain(batch)
    for i in range(2):
        real = out["input_ids"][i][out["attention_mask"][i].astype(bool)].tolist()
        orig = batch["input_ids"][i][batch["attention_mask"][i].astype(bool)].tolist()
        n_prompt = int(np.argmax(batch["loss_mask"][i]))  # the chain starts right after the prompt
        prompt = orig[:n_prompt]
        if kind == "generation":  # the very tokens GoTPipeline(no_chain=True) feeds the reasoner for a caption
            assert prompt in captions
        assert real == prompt + [ids.im_gen_start] + list(ids.query[:64])
        assert len(real) < len(orig)  # a chain was there and is gone
        q = np.nonzero(out["query_mask"][i])[0]
        assert q.tolist() == list(range(n_prompt + 1, n_prompt + 65))
    assert not out["loss_mask"].any() and (out["labels"] == -100).all()
    assert (out["layout_canvases"] == 0).all() and out["layout_mask"].tolist() == [[True, False, False]] * 2
    np.testing.assert_array_equal(out["target_image"], batch["target_image"])
    # the GoT task applies it, and the reasoner inputs have no LM targets
    c = tiny("got", "", 0, **{"ablation.no_chain": True})
    cfg = setup.got_config(setup.resolve(c), tok)
    task = tasks.GoTTask(setup.resolve(c), cfg, tok, setup.model_options(setup.resolve(c)))
    prepared = task.prepare(batch, 1)
    assert not prepared["inputs"].target_mask.any()
    np.testing.assert_array_equal(prepared["inputs"].input_ids[0], out["input_ids"])


def test_no_layout_zeroes_every_layout_latent(tok):
    import jax.numpy as jnp

    c = setup.resolve(tiny("got", "", 0, **{"ablation.no_layout": True, "loss.cond_dropout_prob": 0.0}))
    cfg = setup.got_config(c, tok)
    task = tasks.GoTTask(c, cfg, tok, setup.model_options(c))
    from got_jax.got.model import GoT

    model = nnx.eval_shape(lambda: GoT(cfg, rngs=nnx.Rngs(0)))  # draws need only the latent geometry
    prepared = {"images": {"target_image": jnp.zeros((1, 4, 32, 32, 3))}}
    d = task.draws(jax.random.key(0), prepared, model, _schedule(cfg), task.loss_cfg)
    assert bool(jnp.all(d.drop_layout)) and not bool(jnp.any(d.drop_text)) and not bool(jnp.any(d.drop_reference))
    plain = tasks.GoTTask(setup.resolve(tiny("got", "", 0, **{"loss.cond_dropout_prob": 0.0})), cfg, tok,
                          setup.model_options(c))
    assert not bool(jnp.any(plain.draws(jax.random.key(0), prepared, model, _schedule(cfg), plain.loss_cfg).drop_layout))
    assert tasks.sampling_defaults(c) == {"zero_layout": True, **DEMO_GUIDANCE}
    # guidance scales set in config.sample go with the export (None, tiny_test's: the paper's, nothing recorded)
    tuned = setup.resolve(tiny("got", "", 0, **{"sample.guidance_scale": 1.5, "sample.image_guidance_scale": 1.2}))
    assert tasks.sampling_defaults(tuned) == {"guidance_scale": 1.5, "layout_guidance_scale": 2.0,
                                              "image_guidance_scale": 1.2}
    from configs import tiny_test  # noqa: PLC0415

    assert tasks.sampling_defaults(tiny_test.get_config()) == {}


def _schedule(cfg):
    from got_jax.diffusion.schedulers import TrainSchedule

    return TrainSchedule.from_config(cfg["scheduler"])


def test_pipeline_no_chain_never_generates(monkeypatch):
    from got_jax.got import pipeline as gp

    def boom(*a, **k):
        raise AssertionError("no_chain sampling called the reasoner's generate")

    monkeypatch.setattr(gp, "Sampler", boom)
    pipe = demo.demo_pipeline(0)
    out = pipe(["two red circles"], no_chain=True, only_return_got=True)
    assert out.got_texts[0] == "<|im_gen_start|>"
    with pytest.raises(AssertionError, match="called the reasoner"):
        pipe(["two red circles"], only_return_got=True, max_new_tokens=2)
