"""``train.py --config``: runs, resumes, survives kill -9 / SIGTERM, changes topology, runs on two processes.

All runs train ``configs/tiny_test.py`` (2-layer hidden-32 reasoner with LoRA r=4, 2-block UNet, 32 px) on the
synthetic shapes set written to a temp dir, with 2 logical data shards (global batch 8), in float32 at the
highest matmul precision (the test session's setting, passed to the CLIs through the environment) and the test
session's persistent compilation cache, so each distinct program compiles once for the whole module. The
reference is one uninterrupted single-process run ``U`` of 6 steps on 8 fake devices (mesh 2x2x2), which also
evaluates and samples at the end.

What needs a process of its own runs ``train.py`` (kill -9, SIGTERM on two processes); resuming, restoring and
a single process's SIGTERM (after the kill -9 resume) run ``run.train_and_evaluate`` in the test process (the
same program on the same 8 devices: a subprocess launch costs ~1 min of imports, tokenizer, data setup and
cached-program loads on a 2-core CI machine). A single-process ``train.py`` does not initialise
``jax.distributed``, so its numbers are the test process's bit for bit (with it, XLA:CPU reduces across devices
with other collectives; at LLVM -O0, the tests' setting, a step's gradients then differed in their last bits).

Tolerances: same topology (kill -9 + resume) - bit-identical losses (float32 equality). New topology (1 process
on 8 devices at 2x2x2 -> 2 processes on 2 devices each at 1x4x1 -> 1 process on 8 devices) - the continued
losses vs U: rtol 2e-5 (the continued steps reduce in another order).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import configs.tiny_test as tiny
from cpu_env import LLVM_O0, xla_flags
from got_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("train_run")  # one worker: the uninterrupted run U is shared
STEPS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # GOT_TRAIN_TEST_DIR (development): keep data and the reference run U between sessions
    base = os.environ.get("GOT_TRAIN_TEST_DIR")
    base = pathlib.Path(base) if base else tmp_path_factory.mktemp("train_run")
    data = shapes.write_shapes(base / "shapes", size=32, num_generation=48, num_editing=0, seed=0)
    return {"base": base, "sources": f"file:{data}/annotations/generation.jsonl@shapes"}


def _overrides(env, **kw) -> dict:
    o = {"data.sources": env["sources"], "mesh_shape": "(2,2,2)", "data.num_shards": 2, "total_steps": STEPS,
         "eval_every": -1, "sample_every": -1}
    o.update(kw)
    return o


def _train(workdir, overrides: dict, *, flags=(), env_vars=None, wait=True):
    """``train.py`` in a subprocess: the test session's matmul precision and compilation cache (tests/conftest.py
    caches every program, so launches after the first skip the many small compiles)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_test.py"),
           f"--workdir={workdir}", *flags, *[f"--config.{k}={v}" for k, v in overrides.items()]]
    e = dict(os.environ, PYTHONPATH=ROOT, JAX_DEFAULT_MATMUL_PRECISION=str(jax_precision()),
             **(env_vars or {}))
    if not wait:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=1800)


def jax_precision():
    import jax

    return jax.config.jax_default_matmul_precision or "default"


def _in_process(workdir, env, **kw):
    """``run.train_and_evaluate`` in this process (the same program as ``train.py`` on these 8 fake devices)."""
    from ml_collections import ConfigDict

    from got_jax.train import run

    c = ConfigDict(tiny.get_config().to_dict())
    for k, v in _overrides(env, **kw).items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = tuple(int(x) for x in v.strip("()").split(",")) if k == "mesh_shape" else v
    return run.train_and_evaluate(c, str(workdir))


def _losses(workdir) -> dict[int, dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r
    return out


def _last_logged(workdir) -> int:
    """The newest step in ``metrics.jsonl`` while a run writes it (0: none yet, or a line being written)."""
    try:
        return max(_losses(workdir), default=0) if os.path.exists(workdir / "metrics.jsonl") else 0
    except ValueError:
        return 0


def _steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _fresh(env, name):
    shutil.rmtree(env["base"] / name, ignore_errors=True)
    return env["base"] / name


def _ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def _close(got: dict, want: dict, steps, rtol):
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=rtol, err_msg=f"step {s}")


@pytest.fixture(scope="module")
def uninterrupted(env):
    """U: 6 steps in one go on 8 devices (2x2x2), evaluating and sampling at the end."""
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices (tests/conftest.py)")
    w = env["base"] / "U"
    if not (os.environ.get("GOT_TRAIN_TEST_DIR") and os.path.exists(w / "metrics.jsonl")
            and len(_losses(w)) == STEPS):
        shutil.rmtree(w, ignore_errors=True)
        out = _in_process(w, env, eval_every=0, sample_every=0)
        assert out["start"] == 0 and out["step"] == STEPS
    return w


@pytest.mark.slow
def test_run_writes_events_checkpoint_eval_and_samples(env, uninterrupted):
    """U wrote TensorBoard events (train and eval scalars, one sample image per prompt), the final Orbax
    checkpoint and the eval loss; resuming is tested below (kill -9, SIGTERM, two processes, new topology)."""
    w = uninterrupted
    assert _steps(w)[-1] == STEPS and sorted(_losses(w)) == list(range(1, STEPS + 1))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(w / "tensorboard"))
    _check_eval_and_samples(w)


def _check_eval_and_samples(workdir):
    """The final eval loss in metrics.jsonl, and TensorBoard scalars + one sample image summary per prompt."""
    evals = [json.loads(x) for x in open(workdir / "metrics.jsonl") if "eval_loss" in x]
    assert evals and evals[-1]["step"] == STEPS and np.isfinite(evals[-1]["eval_loss"])
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "samples/0" in tags and "train/loss" in tags and "eval/loss" in tags, tags
    img = acc.Tensors("samples/0")[-1]
    assert img.step == STEPS
    w, h = (int(x) for x in img.tensor_proto.string_val[:2])
    assert w >= 2 * 32 * tiny.get_config().sample.scale and h > 32 * tiny.get_config().sample.scale  # image|overlay + text


@contextlib.contextmanager
def _sigterm_once_logged(workdir, step: int):
    """Sends this process SIGTERM from a watcher thread once ``step`` is in ``workdir/metrics.jsonl``."""
    sent = threading.Event()

    def watch():
        while not sent.is_set():
            if _last_logged(workdir) >= step:
                os.kill(os.getpid(), signal.SIGTERM)
                sent.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        sent.set()
        watcher.join()


@pytest.mark.slow
def test_kill9_right_after_checkpoint_then_resume_is_bit_identical_until_sigterm(env, uninterrupted):
    """train.py killed (-9) right after checkpoint 2 was written. The resumed run (this process, 1000 steps to go
    on U's schedule: ``optim.decay_steps=6``) gets SIGTERM once step 6 is logged: it saves the step it reached and
    returns ``preempted`` (a single process catches SIGTERM itself; the previous handler is back afterwards).
    Its steps 3..6 equal U's exactly."""
    w = _fresh(env, "K")
    p = _train(w, _overrides(env, debug_sigkill_after_save=2))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert _steps(w)[-1] == 2  # (Orbax's default policy also saves the first step)
    assert sorted(_losses(w)) == [1]  # step 2's log line died with the process
    before = signal.getsignal(signal.SIGTERM)
    with _sigterm_once_logged(w, STEPS):  # the run goes on to step 1000 unless SIGTERM stops it
        out = _in_process(w, env, total_steps=1000, save_every=1000, **{"optim.decay_steps": STEPS})
    assert signal.getsignal(signal.SIGTERM) is before
    assert out["preempted"] and out["start"] == 2 and STEPS <= out["step"] < 1000, out["step"]
    assert _steps(w)[-1] == out["step"]
    got, want = _losses(w), _losses(uninterrupted)
    assert sorted(got) == [1] + list(range(3, out["step"] + 1))
    for s in range(3, STEPS + 1):
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])


@pytest.mark.slow
def test_cached_latents_run_matches_the_uncached_run_and_resumes_exactly(env, uninterrupted):
    """``loss.cache_latents`` on U's config: U's losses (the cached latents are U's in-step encodes up to float32
    rounding, so rtol 1e-5), and a cached run stopped at step 3 and resumed - with an empty cache, so every latent
    is encoded again, in other chunks - continues with exactly the cached run's losses."""
    cached = {"loss.cache_latents": True}
    c = _fresh(env, "C")
    assert _in_process(c, env, **cached)["step"] == STEPS
    _close(_losses(c), _losses(uninterrupted), range(1, STEPS + 1), rtol=1e-5)
    r = _fresh(env, "CR")
    assert _in_process(r, env, stop_at_step=3, **cached)["step"] == 3
    out = _in_process(r, env, **cached)
    assert out["start"] == 3 and out["step"] == STEPS
    got, want = _losses(r), _losses(c)
    for s in range(4, STEPS + 1):
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir, overrides, devices_each: int):
    port = _free_port()
    return [_train(workdir, overrides, wait=False,
                   flags=(f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
                   env_vars={"XLA_FLAGS": xla_flags(devices_each, LLVM_O0)}) for i in range(2)]


@pytest.mark.slow
def test_new_topology_two_processes_sigterm_then_one_process_continues(env, uninterrupted):
    """U's checkpoint 2 (1 process, 8 devices, mesh 2x2x2) resumed by two train.py processes with 2 devices each
    (4 devices, mesh 1x4x1; 1000 steps on U's schedule: ``optim.decay_steps=6``); once step 3 is logged both
    get SIGTERM (a pod preemption), agree on a step, save it and exit 0; one process on 8 devices (2x2x2)
    then resumes that checkpoint to step 6. Every loss after step 2 equals U's within rtol 2e-5 (the continued
    steps reduce in another order on the other mesh)."""
    import jax

    w = _fresh(env, "MP")
    shutil.copytree(uninterrupted / "checkpoints" / "2", w / "checkpoints" / "2")
    procs = _two_processes(w, _overrides(env, total_steps=1000, save_every=1000, mesh_shape="(1,4,1)",
                                         **{"optim.decay_steps": STEPS}), devices_each=2)
    deadline = time.time() + 900
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if _last_logged(w) >= 3:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert all("resumed from" in o and "at step 2" in o for o in outs), [o[-2000:] for o in outs]
    assert all("on 4 devices (2 processes)" in o for o in outs), [o[-2000:] for o in outs]
    last = max(_losses(w))
    assert all(f"preemption signal: saved step {last}" in o for o in outs), [o[-2000:] for o in outs]
    assert _steps(w)[-1] == last and 3 <= last < 1000, (last, _steps(w))
    want = _losses(uninterrupted)
    _close({s: r for s, r in _losses(w).items() if s <= STEPS}, want, range(3, min(last, STEPS) + 1), rtol=2e-5)
    # 2 processes -> 1, 4 devices -> 8: the data state (2 logical shards) and the weights continue
    out = _in_process(w, env, total_steps=max(STEPS, last + 1), **{"optim.decay_steps": STEPS})
    assert out["start"] == last and out["step"] == max(STEPS, last + 1)
    assert len(jax.tree.leaves(out["state"])[0].sharding.device_set) == 8
    _close({s: r for s, r in _losses(w).items() if s <= STEPS}, want, range(3, STEPS + 1), rtol=2e-5)


@pytest.mark.slow
def test_trained_checkpoint_exports_to_got_bin_and_pytorch_loads_it(env, uninterrupted, tmp_path):
    """U's final checkpoint -> converted folder (LoRA merged) -> GoT .bin; transformers / diffusers / nn.Linear load
    every tensor (strict), and the torch reasoner's logits equal our trained (unmerged LoRA) reasoner's."""
    import diffusers
    import jax.numpy as jnp
    import torch
    from ml_collections import ConfigDict
    from transformers import Qwen2_5_VLConfig as HFQwenConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen

    from got_jax.train.export import export_run, restore_trained_model

    c = ConfigDict(tiny.get_config().to_dict())
    c.data.sources = env["sources"]
    paths = export_run(c, str(uninterrupted), str(tmp_path / "export"))
    sd = torch.load(os.path.join(paths["got_bin"], "pytorch_model.bin"), weights_only=True)
    cfg = json.load(open(os.path.join(paths["got-jax"], "config.json")))
    assert cfg["source"]["step"] == STEPS
    parts = {p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
             for p in ("mllm", "unet", "vae", "output_projector", "output_projector_add")}
    assert sum(len(v) for v in parts.values()) == len(sd)
    hf = HFQwen(HFQwenConfig.from_dict(cfg["reasoner"])).float().eval()
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else
               k.replace("visual.", "model.visual.", 1): v for k, v in parts["mllm"].items()}
    missing, unexpected = hf.load_state_dict(renamed, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    unet = diffusers.UNet2DConditionModel.from_config(cfg["unet"])
    unet.load_state_dict(parts["unet"], strict=True)
    diffusers.AutoencoderKL.from_config(cfg["vae"]).load_state_dict(parts["vae"], strict=True)
    for name, feats in (("output_projector", "projector"), ("output_projector_add", "pooled_projector")):
        lin = torch.nn.Linear(cfg["projectors"][feats]["in_features"], cfg["projectors"][feats]["out_features"])
        lin.load_state_dict({k.split(".", 1)[1]: v for k, v in parts[name].items()}, strict=True)
    model, _, _, step = restore_trained_model(c, str(uninterrupted))
    assert step == STEPS
    ids = np.random.RandomState(0).randint(0, 500, (2, 9))
    ours = np.asarray(model.reasoner(jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(np.abs(theirs).max()))
    adapter = json.load(open(os.path.join(paths["peft_adapter"], "adapter_config.json")))
    assert adapter["r"] == tiny.get_config().model.lora_rank


# --------------------------------------------------------------------------------------------------
# fast checks: full-size shapes and bad inputs
# --------------------------------------------------------------------------------------------------


def test_got_6b_abstract_state_has_released_and_recipe_counts():
    """got_6b built with nnx.eval_shape: released base counts, and the trainable count of the recipe computed
    from the reference config (LoRA r=32 on 7 projections x 36 layers, embeddings, LM head if untied, the
    decoder's norms, both projectors, the UNet). The optimizer's moments are checked on the tiny run's state
    below (the same filters; an abstract AdamW over 6B parameters costs ~1.5 min of tracing on CI)."""
    import configs.got_6b as got_6b
    from flax import nnx

    from got_jax.got.model import GoT
    from got_jax.train import setup, summaries
    from got_jax.train.trainable import frozen_filter, trainable_filter

    c = setup.resolve(got_6b.get_config())
    got_cfg, options = setup.got_config(c), setup.model_options(c)
    assert (options.lora_rank, options.lora_alpha, options.lora_dropout) == (32, 32.0, 0.05)
    model = nnx.eval_shape(lambda: GoT(got_cfg, options=options, rngs=nnx.Rngs(0)))
    counts = summaries.parameter_counts(model, trainable_filter(options), frozen_filter(options))
    t = got_cfg["reasoner"]["text_config"] if "text_config" in got_cfg["reasoner"] else got_cfg["reasoner"]
    h, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    q, kv = h, t["num_key_value_heads"] * (h // t["num_attention_heads"])
    r = options.lora_rank
    lora = layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    vocab = t["vocab_size"]
    tied = got_cfg["reasoner"].get("tie_word_embeddings", t.get("tie_word_embeddings"))
    fully = vocab * h * (1 if tied else 2) + (2 * layers + 1) * h
    projectors = 2048 * 2048 + 2048 + 2048 * 1280 + 1280
    reasoner_base, unet, vae = 3_754_622_976, 2_567_486_724, 83_653_863
    assert counts["reasoner"]["trainable"] == lora + fully
    assert counts["reasoner"]["frozen"] == reasoner_base - fully
    assert counts["unet"] == {"trainable": unet, "frozen": 0} and counts["vae"] == {"trainable": 0, "frozen": vae}
    assert counts["total"]["trainable"] == lora + fully + projectors + unet
    # the frozen VAE's target / reference encodes in passes that divide a v5e-64 chip's examples (benchmarks/vae_encodes.py)
    from got_jax.train import run

    passes = run.loss_config(c).vae_encode_passes
    assert passes == 2 and (c.global_batch_size // 64) % passes == 0 and (c.global_batch_size // 16) % passes == 0


def test_optimizer_holds_two_moments_of_exactly_the_trainable_parameters():
    """The tiny run's TrainState (abstract): AdamW's mu and nu cover exactly the trainable parameters (LoRA
    adapters, the reasoner's embeddings and norms, the projectors, the UNet), nothing frozen (the base
    reasoner, the VAE)."""
    from flax import nnx

    from got_jax.got.model import GoT
    from got_jax.train import run, setup, summaries
    from got_jax.train.step import TrainState, make_tx
    from got_jax.train.trainable import frozen_filter, trainable_filter

    c = setup.resolve(tiny.get_config())
    got_cfg, options = setup.got_config(c), setup.model_options(c)
    assert options.lora_rank > 0
    ts = nnx.eval_shape(lambda: TrainState(GoT(got_cfg, options=options, rngs=nnx.Rngs(0)),
                                           make_tx(run.optim_config(c)), trainable_filter(options)))
    counts = summaries.parameter_counts(ts.model, trainable_filter(options), frozen_filter(options))
    assert counts["reasoner"]["frozen"] > 0 and counts["vae"] == {"trainable": 0, "frozen": counts["vae"]["frozen"]}
    assert counts["unet"]["frozen"] == 0 and counts["total"]["trainable"] > counts["unet"]["trainable"]
    moments = [v for p, v in nnx.to_flat_state(nnx.state(ts.optimizer.opt_state)) if "mu" in p or "nu" in p]
    assert sum(int(np.prod(v.get_value().shape)) for v in moments) == 2 * counts["total"]["trainable"]


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)


def test_missing_workdir_and_unknown_override_fail_at_flag_parsing():
    cfg = f"--config={os.path.join(ROOT, 'configs', 'tiny_test.py')}"
    p = _cli(cfg)
    assert p.returncode != 0 and "--workdir" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = _cli(cfg, "--workdir=/tmp/never", "--config.optim.learnin_rate=1")
    assert p.returncode != 0 and "learnin_rate" in p.stderr, p.stderr[-2000:]
    assert not os.path.exists("/tmp/never")


@pytest.mark.parametrize("case", ["init_from_not_converted", "init_from_missing", "no_records", "no_tfds",
                                  "bad_source"])
def test_bad_inputs_fail_before_compiling(case, env, tmp_path, monkeypatch):
    from got_jax.train import run, step
    from got_jax.train.setup import ConfigError

    def no_compile(*a, **k):
        raise AssertionError("the train step was built before the config error was found")

    monkeypatch.setattr(step.TrainStep, "__init__", no_compile)
    c = tiny.get_config()
    c.data.sources = env["sources"]
    if case == "init_from_not_converted":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
        c.init_from, match = str(tmp_path / "ckpt"), "not a converted got-jax folder|format"
    elif case == "init_from_missing":
        c.init_from, match = str(tmp_path / "nothing"), "no such folder"
    elif case == "no_records":
        (tmp_path / "empty.jsonl").write_text("")
        c.data.sources, match = f"file:{tmp_path / 'empty.jsonl'}@shapes", "holds no records"
    elif case == "no_tfds":
        c.data.sources, c.data.data_dir, match = "tfds:got_generation/shapes", str(tmp_path), "nothing built at"
    else:
        c.data.sources, match = "file:/x.jsonl@nomapping", "unknown mapping 'nomapping'"
    with pytest.raises(ConfigError, match=match):
        run.train_and_evaluate(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
