"""The bundled GoT test tokenizer: special tokens in the released order, chat template, round trips."""

import json

import pytest

from got_jax.got.text import parse_got
from got_jax.got.tokenizer import (
    BUNDLED_TOKENIZER_DIR,
    GOT_TOKENS,
    QWEN2_5_ADDED_TOKENS,
    TokenizerError,
    chat_prompt,
    got_token_ids,
    load_tokenizer,
    make_image_processor,
    make_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_autotokenizer_loads_bundled_folder(tok):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR))
    assert type(auto).__name__ == "Qwen2Tokenizer" and auto.get_vocab() == tok.get_vocab()
    assert 400 <= len(tok) <= 1000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_special_tokens_released_order(tok):
    vocab = tok.get_vocab()
    names = [name for name, _ in QWEN2_5_ADDED_TOKENS] + list(GOT_TOKENS)
    ids = [vocab[name] for name in names]
    assert ids == list(range(ids[0], ids[0] + 22 + 66))  # Qwen's 22 added tokens then the 66 GoT tokens
    assert ids[-1] == len(tok) - 1
    g = got_token_ids(tok)
    assert g.im_gen_start == vocab["<|file_sep|>"] + 1 and g.im_gen_end == g.im_gen_start + 1
    assert g.query == tuple(range(g.im_gen_end + 1, g.im_gen_end + 65))
    named = [g.im_gen_start, g.im_gen_end, g.box_start, g.box_end, g.object_ref_start, g.object_ref_end,
             g.vision_start, g.vision_end, g.image_pad, g.im_start, g.im_end, g.endoftext, *g.query]
    assert len(set(named)) == len(named)
    assert tok.convert_ids_to_tokens([g.box_start, g.image_pad, g.endoftext]) == [
        "<|box_start|>", "<|image_pad|>", "<|endoftext|>"]


def test_missing_token_is_named():
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer(vocab={"a": 0, "b": 1}, merges=[], unk_token=None)
    with pytest.raises(TokenizerError, match=r"<\|im_gen_start\|>"):
        got_token_ids(base)


def test_missing_got_tokens_say_how_to_fix():
    """A plain Qwen2.5-VL tokenizer (GoT's tokens missing): the error names the converter to rerun."""
    from convert_helpers import qwen_tokenizer  # tests/ is on the path (pytest's rootdir-relative imports)

    with pytest.raises(TokenizerError, match=r"has no token '<\|im_gen_start\|>': GoT's 66 tokens are missing.*"
                                             r"python -m got_jax\.convert\.got_checkpoint .*--overwrite"):
        got_token_ids(qwen_tokenizer())


def test_got_text_round_trip_keeps_special_tokens_single(tok):
    text = ("Plan: <|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|> (red)"
            " and <|object_ref_start|>a cup<|object_ref_end|><|box_start|>(500,100),(900,950)<|box_end|> (blue)"
            "<|im_gen_start|>" + "".join(GOT_TOKENS[2:]) + "<|im_gen_end|><|im_end|>")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    g = got_token_ids(tok)
    assert ids.count(g.box_start) == 2 and ids.count(g.object_ref_end) == 2 and ids.count(g.im_gen_start) == 1
    assert [i for i in ids if i in g.query] == list(g.query)
    tokens = tok.convert_ids_to_tokens(ids)
    assert all(t in tokens for t in GOT_TOKENS)
    assert parse_got(tok.decode(ids)) == parse_got(text)


def test_chat_prompts_match_qwen2_5_vl_template(tok):
    t2i = chat_prompt(tok, "a red apple on a table", with_image=False)
    assert t2i == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nFollow the caption to generate an image through a chain of thought process: "
                   "a red apple on a table<|im_end|>\n<|im_start|>assistant\n")
    edit = chat_prompt(tok, "make the apple green", with_image=True)
    assert edit == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Follow the instruction to edit the "
                    "given image through a chain of thought process: make the apple green<|im_end|>\n"
                    "<|im_start|>assistant\n")
    g = got_token_ids(tok)
    ids = tok(edit)["input_ids"]
    assert ids.count(g.image_pad) == 1 and ids.index(g.vision_start) + 2 == ids.index(g.vision_end)
    # string content and an explicit system turn follow the same template
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def test_make_tokenizer_is_deterministic(tmp_path):
    out = make_tokenizer(tmp_path / "tok")
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        assert json.loads((out / name).read_text()) == json.loads((BUNDLED_TOKENIZER_DIR / name).read_text()), name
    assert load_tokenizer(out).chat_template == load_tokenizer().chat_template


def test_image_processor_defaults():
    import numpy as np

    proc = make_image_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (14, 2, 2)
    np.testing.assert_allclose(proc.image_mean, [0.48145466, 0.4578275, 0.40821073])
    np.testing.assert_allclose(proc.image_std, [0.26862954, 0.26130258, 0.27577711])
    out = proc(images=[np.zeros((100, 60, 3), np.uint8)], return_tensors="np")
    t, h, w = out["image_grid_thw"][0]
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and 4 * 4 <= h * w <= 16 * 4
    assert out["pixel_values"].shape == (h * w, 3 * 2 * 14 * 14)
