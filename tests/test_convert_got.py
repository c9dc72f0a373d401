"""convert/got_checkpoint.py on a tiny GoT-6B-style ``.bin`` (LoRA keys, added-token rows, 12-channel conv_in,
projectors; single file and sharded): converted outputs equal PyTorch's, export round trips bit-identically,
and every malformed input gives a named error and writes nothing."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_helpers import (SCHEDULER, check_close, jax_qwen, qwen_logits, qwen_state_4x, qwen_tokenizer, save_qwen,
                             save_sdxl, tiny_qwen, tiny_unet, tiny_vae, torch_unet_out, unet_inputs, with_params)
from flax import nnx

from got_jax.convert import export_pytorch, got_checkpoint
from got_jax.checkpoint import CheckpointError, open_tensor_folder
from got_jax.got.checkpoint import load_got_checkpoint
from got_jax.got.model import make_projector
from got_jax.got.tokenizer import BUNDLED_TOKENIZER_DIR, GOT_TOKENS, got_token_ids, load_tokenizer
from got_jax.models.sdxl import UNet2DConditionModel, UNetConfig

LORA_SCALE = 2.0  # adapter config r=2, alpha=4
LORA_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
QWEN_VOCAB = len(qwen_tokenizer())  # the stand-in Qwen2.5-VL tokenizer: BPE + Qwen2.5's 22 added tokens
ROWS = QWEN_VOCAB + 66  # GoT's embedding: Qwen's vocabulary + the 66 GoT tokens


def build_inputs(tmp_path, sharded: bool, peft_prefix: bool, rows: int = ROWS):
    """Writes qwen/, sdxl/ and got/ folders; returns the PyTorch reference pieces."""
    qwen = tiny_qwen(tied=True)                     # the base Qwen folder: 61 rows in its config
    save_qwen(qwen, tmp_path / "qwen", "4.x")
    qwen_tokenizer().save_pretrained(str(tmp_path / "qwen"))  # Qwen2.5-VL's tokenizer: no GoT tokens
    got = tiny_qwen(tied=True, seed=1, vocab=rows)  # GoT's reasoner: the embedding holds the added tokens
    base = qwen_state_4x(got)
    rng = np.random.RandomState(3)
    sd, merged = {}, {}
    for k, v in base.items():
        module = k.rsplit(".", 1)[0]
        pre = "mllm." + ("base_model.model." if peft_prefix else "")
        if module in LORA_MODULES and k.endswith(".weight"):
            a = rng.randn(2, v.shape[1]).astype(np.float32)
            b = rng.randn(v.shape[0], 2).astype(np.float32)
            w = v.numpy()
            sd[f"{pre}{module}.base_layer.weight"] = v
            sd[f"{pre}{module}.lora_A.default.weight"] = torch.from_numpy(a)
            sd[f"{pre}{module}.lora_B.default.weight"] = torch.from_numpy(b)
            merged[k] = torch.from_numpy(w + np.float32(LORA_SCALE) * (b @ a))
        elif module in LORA_MODULES:
            sd[f"{pre}{module}.base_layer.bias"] = v
            merged[k] = v
        else:
            sd[pre + k] = v
            merged[k] = v
    with torch.no_grad():
        for k, v in merged.items():
            got.state_dict()[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else
                              k.replace("visual.", "model.visual.", 1)].copy_(v)
    torch.manual_seed(4)
    proj, pooled, unet = torch.nn.Linear(20, 20), torch.nn.Linear(20, 7), tiny_unet(12, seed=5)
    for name, mod in (("output_projector.projector", proj), ("output_projector_add.projector", pooled)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = mod.weight.detach().clone(), mod.bias.detach().clone()
    sd |= {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    gdir = tmp_path / "got"
    os.makedirs(gdir)
    if sharded:
        keys = sorted(sd)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        wm = {}
        for i, ks in enumerate(halves):
            name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in ks}, gdir / name)
            wm.update({k: name for k in ks})
        (gdir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    else:
        torch.save(sd, gdir / "pytorch_model.bin")
    (gdir / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    vae = tiny_vae(seed=6)
    save_sdxl(tmp_path / "sdxl", tiny_unet(4, seed=7), vae)  # SDXL base: 4-channel UNet, VAE, scheduler
    return dict(got=got, proj=proj, pooled=pooled, unet=unet, vae=vae, merged=merged, sd=sd)


def _convert(tmp_path, out="out"):
    return got_checkpoint.convert_got(str(tmp_path / "got"), str(tmp_path / "qwen"), str(tmp_path / "sdxl"),
                                      str(tmp_path / out), progress=False)


@pytest.mark.parametrize("sharded,peft_prefix", [(False, True), (True, False)])
def test_convert_matches_pytorch_and_exports(tmp_path, sharded, peft_prefix):
    ref = build_inputs(tmp_path, sharded, peft_prefix)
    cfg = _convert(tmp_path)
    assert cfg["reasoner"]["text_config"]["vocab_size"] == ROWS and cfg["unet"]["in_channels"] == 12
    _check_got_tokenizer(tmp_path / "out" / "tokenizer", tmp_path / "qwen")
    assert json.loads((tmp_path / "out" / "tokenizer" / "preprocessor_config.json").read_text()) == {"patch_size": 4}
    tree, cfg = load_got_checkpoint(str(tmp_path / "out"))
    assert list(tree) == ["reasoner", "projector", "pooled_projector", "unet", "vae"]
    assert cfg["scheduler"] == SCHEDULER and cfg["format"] == "got-jax"
    ids = np.random.RandomState(0).randint(0, ROWS, (2, 7))
    check_close(jax_qwen(cfg["reasoner"], tree["reasoner"])(ids).logits, qwen_logits(ref["got"], ids))
    h = np.random.RandomState(1).randn(3, 20).astype(np.float32)
    for name, tmod in (("projector", ref["proj"]), ("pooled_projector", ref["pooled"])):
        lin = with_params(lambda: make_projector(20, tmod.out_features, rngs=nnx.Rngs(0)), tree[name])
        with torch.no_grad():
            check_close(lin(jnp.asarray(h)), tmod(torch.tensor(h)).numpy())
    if not sharded:  # the 12-channel UNet end to end (the sharded case checks tensors through the export)
        unet = with_params(lambda: UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]), rngs=nnx.Rngs(0)),
                           tree["unet"])
        x = unet_inputs(12)
        check_close(unet(jnp.asarray(x["sample"]), x["t"], jnp.asarray(x["ctx"]), jnp.asarray(x["text"]),
                         jnp.asarray(x["tid"])), torch_unet_out(ref["unet"], x))
    # export to GoT's .bin layout: LoRA merged, PEFT prefix gone, bit-identical tensors
    export_pytorch.export(str(tmp_path / "out"), str(tmp_path / "bin"), fmt="got_bin",
                          max_shard_mb=0.05 if sharded else None)
    src = open_tensor_folder(str(tmp_path / "bin"), stems=("pytorch_model",))
    want = {"mllm." + k: v for k, v in ref["merged"].items()}
    want |= {k: v for k, v in ref["sd"].items() if not k.startswith("mllm.")}
    want |= {f"vae.{k}": v for k, v in ref["vae"].state_dict().items()}
    assert sorted(src.keys()) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(src.get(k), v.numpy(), err_msg=k)
    assert os.path.isfile(tmp_path / "bin" / ("pytorch_model.bin.index.json" if sharded else "pytorch_model.bin"))
    if sharded:  # the Hugging Face / diffusers export of the same folder
        from convert_helpers import assert_state_dicts_equal
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen

        export_pytorch.export(str(tmp_path / "out"), str(tmp_path / "hf"), fmt="hf")
        assert_state_dicts_equal(HFQwen.from_pretrained(str(tmp_path / "hf" / "reasoner")).state_dict(),
                                 ref["got"].state_dict())
        assert_state_dicts_equal(load_file(str(tmp_path / "hf" / "projectors.safetensors")),
                                 {k: v for k, v in ref["sd"].items() if k.startswith("output_projector")})
        assert json.loads((tmp_path / "hf" / "unet" / "config.json").read_text())["in_channels"] == 12
    # the export converts again to the same parameters
    os.rename(tmp_path / "bin", tmp_path / "got2")
    got_checkpoint.convert_got(str(tmp_path / "got2"), str(tmp_path / "qwen"), str(tmp_path / "sdxl"),
                               str(tmp_path / "out2"), progress=False)
    tree2, _ = load_got_checkpoint(str(tmp_path / "out2"))
    for a, b in zip(*(sorted(_flat(t).items()) for t in (tree, tree2))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def _check_got_tokenizer(folder, qwen_dir):
    """Qwen's tokenizer (same ids for its tokens) plus GoT's 66 tokens in the released order right after."""
    tok, base = load_tokenizer(folder), load_tokenizer(qwen_dir)
    assert [tok.convert_tokens_to_ids(t) for t in GOT_TOKENS] == list(range(QWEN_VOCAB, QWEN_VOCAB + 66))
    assert {k: v for k, v in tok.get_vocab().items() if k not in GOT_TOKENS} == base.get_vocab()
    assert got_token_ids(tok).query[-1] == ROWS - 1
    text = "two red circles<|im_gen_start|><|im_gen_0000|>"
    assert tok(text)["input_ids"][-2:] == [QWEN_VOCAB, QWEN_VOCAB + 2]  # whole tokens, not split into bytes


def test_tokenizer_shipped_with_got_wins(tmp_path):
    """A GoT folder that ships its tokenizer (already holding the GoT tokens) gives the converted one."""
    build_inputs(tmp_path, sharded=False, peft_prefix=False)
    own = load_tokenizer(BUNDLED_TOKENIZER_DIR)  # Qwen2.5's and GoT's tokens, ids 466.. and 488..553
    own.model_max_length = 777
    own.save_pretrained(str(tmp_path / "got" / "tokenizer"))
    _convert(tmp_path)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.model_max_length == 777 and tok.get_vocab() == own.get_vocab()


def _tokenizer_case(tmp_path, kind):
    if kind == "rows":  # the tokenizer's GoT tokens would land past the checkpoint's embedding
        build_inputs(tmp_path, sharded=False, peft_prefix=False, rows=QWEN_VOCAB + 40)
        return rf"token '<\|im_gen_0038\|>' has id {QWEN_VOCAB + 40}, but the checkpoint's token embedding .* has only " \
               rf"{QWEN_VOCAB + 40} rows"
    build_inputs(tmp_path, sharded=False, peft_prefix=False)
    if kind == "partial":
        tok = qwen_tokenizer()
        tok.add_tokens(["<|im_gen_start|>", "<|im_gen_end|>"], special_tokens=True)
        tok.save_pretrained(str(tmp_path / "qwen"))
        return r"has 2 of GoT's 66 tokens but lacks \['<\|im_gen_0000\|>'"
    if kind == "none":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(tmp_path / "qwen" / name)
        return r"no tokenizer found .* pass --qwen_dir"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["rows", "partial", "none"])
def test_tokenizer_errors_write_nothing(tmp_path, kind):
    pattern = _tokenizer_case(tmp_path, kind)
    with pytest.raises(CheckpointError, match=pattern):
        _convert(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["got", "qwen", "sdxl"]


def test_existing_out_fails_before_any_work(tmp_path, capsys):
    """An existing --out is refused first (naming --overwrite), before the inputs are even looked at."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"--out .*out already exists and is not empty: .* --overwrite"):
        got_checkpoint.convert_got(str(tmp_path / "missing"), None, None, str(tmp_path / "out"), progress=False)
    rc = got_checkpoint.main(["--got_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err  # one line, usage-error status
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_converted_folder_mode_follows_umask(tmp_path):
    build_inputs(tmp_path, sharded=False, peft_prefix=False)
    old = os.umask(0o022)
    try:
        _convert(tmp_path)
    finally:
        os.umask(old)
    for d in ("out", "out/params", "out/tokenizer"):
        assert oct((tmp_path / d).stat().st_mode & 0o777) == oct(0o755), d  # not mkdtemp's 0700


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _drop(path, key_part):
    sd = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in sd.items() if key_part not in k}, path)


def _corrupt(tmp_path, kind):
    g = tmp_path / "got"
    one = g / "pytorch_model.bin"
    if kind == "missing key":
        _drop(one, "layers.1.post_attention_layernorm")
        return r"missing tensor for .*layers\.1\.post_attention_layernorm"
    if kind == "extra key":
        sd = torch.load(one, weights_only=True)
        sd["mllm.model.layers.0.extra.weight"] = torch.zeros(2)
        torch.save(sd, one)
        return r"unexpected tensor 'model\.layers\.0\.extra\.weight'"
    if kind == "stray prefix":
        sd = torch.load(one, weights_only=True)
        sd["text_encoder.w"] = torch.zeros(2)
        torch.save(sd, one)
        return r"unexpected tensor 'text_encoder\.w'"
    if kind == "wrong shape":
        sd = torch.load(one, weights_only=True)
        sd["mllm.model.layers.1.mlp.up_proj.weight"] = torch.zeros(23, 19)
        torch.save(sd, one)
        return r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight': checkpoint shape \(23, 19\)"
    if kind == "projector width":
        sd = torch.load(one, weights_only=True)
        sd["output_projector_add.projector.weight"] = torch.zeros(7, 19)
        torch.save(sd, one)
        return r"'output_projector_add\.projector\.weight' has 19 input features, the reasoner's hidden size is 20"
    if kind == "lora without base":
        _drop(one, "q_proj.base_layer.weight")
        return r"LoRA tensors .*q_proj\.lora_A.* have no base weight"
    if kind == "wrong folder":
        return None
    shard = g / "pytorch_model-00002-of-00002.bin"
    if kind == "truncated shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        return r"pytorch_model-00002-of-00002\.bin: cannot read PyTorch checkpoint"
    if kind == "index names missing shard":
        os.remove(shard)
        return r"names shard 'pytorch_model-00002-of-00002\.bin', which is missing"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing key", "extra key", "stray prefix", "wrong shape", "projector width", "lora without base",
                                  "wrong folder", "truncated shard", "index names missing shard"])
def test_malformed_inputs_write_nothing(tmp_path, kind):
    build_inputs(tmp_path, sharded=kind in ("truncated shard", "index names missing shard"), peft_prefix=False)
    pattern = _corrupt(tmp_path, kind)
    if kind == "wrong folder":  # the Qwen folder where the GoT folder belongs
        with pytest.raises(CheckpointError, match=r"no weights found"):
            got_checkpoint.convert_got(str(tmp_path / "sdxl"), str(tmp_path / "qwen"), str(tmp_path / "sdxl"),
                                       str(tmp_path / "out"), progress=False)
        with pytest.raises(CheckpointError, match=r"no mllm\.\* tensors: not a GoT checkpoint"):
            got_checkpoint.convert_got(str(tmp_path / "qwen"), str(tmp_path / "qwen"), str(tmp_path / "sdxl"),
                                       str(tmp_path / "out"), progress=False)
    else:
        with pytest.raises(CheckpointError, match=pattern):
            _convert(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["got", "qwen", "sdxl"]


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        got_checkpoint.main(["--help"])
    assert e.value.code == 0 and "--got_dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        export_pytorch.main(["--help"])
    assert e.value.code == 0 and "got_bin" in capsys.readouterr().out
    rc = got_checkpoint.main(["--got_dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--got_dir" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")
